# Bayesian optimisation: one Optuna study per (dataset, fold, backbone) on validation data only.
# tune.workers jobs share each study (every worker its own GPU job) and together run it to
# exactly tune.n_trials finished trials; collect_study then writes its tables. The study lives in
# study.journal next to the outputs (or in the tune.storage database); it is mutated in place
# (resumable), so it is not a declared output. A rerun after a crash or kill tops the study up; a
# change of its search space, settings or data sets the old one aside (study.<hash>.journal.bak)
# and starts afresh. Watch it live:
# optuna-dashboard results/tune/<dataset>/fold<fold>/<backbone>/study.journal


rule tune_backbone:
    input:
        unpack(tuning_data),
        split=f"{RESULTS}/splits/{{dataset}}.json",
        store=ancient(STORE),
    output:
        record=f"{RESULTS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}/worker{{worker}}.json",
    log:
        f"{LOGS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}/worker{{worker}}.log",
    benchmark:
        f"{JOBSTATS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}/worker{{worker}}.tsv"
    conda:
        "../envs/train.yaml"
    threads: keras_threads
    resources:
        gpu=GPU,
        mem_mb=memory_of("study"),
        runtime=runtime_of("study"),
        tf_threads=tf_threads,
    params:
        base=study_base_of,
        tune=tune_of,
        fold=fold_of,
        worker=worker_of,
        deterministic=S.deterministic,
        gpu_locks=GPU_LOCKS,
    script:
        f"{SCRIPTS}/tune_backbone.py"


rule collect_study:
    input:
        workers=study_workers,
        split=f"{RESULTS}/splits/{{dataset}}.json",
        store=ancient(STORE),
    output:
        best=f"{RESULTS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}/best_params.json",
        trials=f"{RESULTS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}/trials.csv",
    log:
        f"{LOGS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}/collect_study.log",
    conda:
        "../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        tune=tune_of,
        fold=fold_of,
    script:
        f"{SCRIPTS}/collect_study.py"
