# Bayesian optimisation: one Optuna study per (dataset, fold, backbone) on validation data only.
# A study with one worker (tune.workers: 1, the default) is one job, tune_backbone: it runs the
# study's trials, then writes its tables (best_params.json, trials.csv) in the same process. With
# tune.workers: N, N tune_worker jobs share the study (every worker its own GPU job) and together
# run it to exactly tune.n_trials finished trials; collect_study then writes its tables. The
# study lives in study.journal next to the outputs (or in the tune.storage database); it is
# mutated in place (resumable), so it is not a declared output. A rerun after a crash or kill
# tops the study up; a change of its search space, settings or data sets the old one aside
# (study.<hash>.journal.bak) and starts afresh. Watch it live:
# optuna-dashboard results/tune/<dataset>/fold<fold>/<backbone>/study.journal


rule tune_backbone:
    input:
        unpack(tuning_data),
        split=f"{RESULTS}/splits/{{dataset}}.json",
        store=ancient(STORE),
    output:
        record=f"{RESULTS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}/worker0.json",
        best=f"{RESULTS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}/best_params.json",
        trials=f"{RESULTS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}/trials.csv",
    log:
        f"{LOGS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}/worker0.log",
    benchmark:
        f"{JOBSTATS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}/worker0.tsv"
    wildcard_constraints:
        backbone=study_backbones(several=False),
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


# One worker of a study of tune.workers > 1 workers: the same job, writing only its record.
use rule tune_backbone as tune_worker with:
    output:
        record=f"{RESULTS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}/worker{{worker}}.json",
    log:
        f"{LOGS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}/worker{{worker}}.log",
    benchmark:
        f"{JOBSTATS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}/worker{{worker}}.tsv"
    wildcard_constraints:
        backbone=study_backbones(several=True),


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
    wildcard_constraints:
        backbone=study_backbones(several=True),
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
