# The classical baseline: hand-made colour and grey-grid features of the cached images and one
# scikit-learn estimator, fitted on the training subset of the same split and fold as the
# hybrids; one CPU job per (dataset, fold), its own MLflow run (level baseline).


rule train_baseline:
    input:
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.csv",
        images=f"{RESULTS}/data/{{dataset}}/images.npy",
        split=f"{RESULTS}/splits/{{dataset}}.json",
        store=ancient(STORE),
    output:
        predictions=f"{RESULTS}/baseline/{{dataset}}/fold{{fold}}/predictions.csv",
        run=f"{RESULTS}/baseline/{{dataset}}/fold{{fold}}/run.json",
    log:
        f"{LOGS}/baseline/{{dataset}}/fold{{fold}}.log",
    benchmark:
        f"{JOBSTATS}/baseline/{{dataset}}/fold{{fold}}.tsv"
    conda:
        "../envs/evaluate.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        settings=S.baseline.as_params(),
        fold=fold_of,
    script:
        f"{SCRIPTS}/train_baseline.py"
