# Bayesian optimisation: one Optuna study per (dataset, fold, backbone) on validation data only. The
# study lives in study.db next to the outputs; it is mutated in place (resumable), so it is not a
# declared output. A rerun after a crash or kill tops the study up to tune.n_trials; a change of
# its search space, settings or data moves the old file aside (study.<hash>.db.bak) and starts
# afresh. Watch it live: optuna-dashboard sqlite:///results/tune/<dataset>/fold<fold>/<backbone>/study.db


rule tune_backbone:
    input:
        unpack(tuning_data),
        split=f"{RESULTS}/splits/{{dataset}}.json",
        store=ancient(STORE),
    output:
        best=f"{RESULTS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}/best_params.json",
        trials=f"{RESULTS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}/trials.csv",
    log:
        f"{LOGS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}.log",
    benchmark:
        f"{JOBSTATS}/tune/{{dataset}}/fold{{fold}}/{{backbone}}.tsv"
    conda:
        "../envs/train.yaml"
    threads: 4
    resources:
        gpu=GPU,
        mem_mb=memory_of("study"),
        runtime=runtime_of("study"),
        tf_threads=tf_threads,
    params:
        base=study_base_of,
        tune=tune_of,
        fold=fold_of,
        deterministic=S.deterministic,
        gpu_locks=GPU_LOCKS,
    script:
        f"{SCRIPTS}/tune_backbone.py"
