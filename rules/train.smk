# Deep-ensemble members: one job per (dataset, fold, backbone, seed), each its own GPU job.


rule train_member:
    input:
        unpack(training_data),
        split=f"{RESULTS}/splits/{{dataset}}.json",
        best=best_params_input,
        parent=ancient(
            f"{RESULTS}/members/{{dataset}}/fold{{fold}}/{{backbone}}/parent_run.json"
        ),
        store=ancient(STORE),
    output:
        model=f"{RESULTS}/members/{{dataset}}/fold{{fold}}/{{backbone}}/seed{{seed}}/model.keras",
        predictions=f"{RESULTS}/members/{{dataset}}/fold{{fold}}/{{backbone}}/seed{{seed}}/predictions.csv",
        history=f"{RESULTS}/members/{{dataset}}/fold{{fold}}/{{backbone}}/seed{{seed}}/history.csv",
        run=f"{RESULTS}/members/{{dataset}}/fold{{fold}}/{{backbone}}/seed{{seed}}/run.json",
    log:
        f"{LOGS}/members/{{dataset}}/fold{{fold}}/{{backbone}}/seed{{seed}}.log",
    benchmark:
        f"{JOBSTATS}/members/{{dataset}}/fold{{fold}}/{{backbone}}/seed{{seed}}.tsv"
    conda:
        "../envs/train.yaml"
    threads: keras_threads
    resources:
        gpu=GPU,
        mem_mb=memory_of("member"),
        runtime=runtime_of("member"),
        tf_threads=tf_threads,
    params:
        settings=hybrid_of,
        fold=fold_of,
        deterministic=S.deterministic,
        gpu_locks=GPU_LOCKS,
    script:
        f"{SCRIPTS}/train_member.py"
