# MLflow: one local job creates the store and the experiment before any parallel job logs to
# them (concurrent first writers race in sqlite schema creation), and one parent run per
# (dataset, fold, backbone) ensemble, so that member runs in other processes can nest under it.
# Training rules depend on these outputs through ancient(), so changing the experiment name or
# URI retrains nothing; tracking.retry_seconds is no param at all (jobs read it from the config).
#
# A tracking server (http(s) URI) is checked once before any job runs (not on a dry run: onstart
# runs only when Snakemake is about to execute jobs, in the main process).


onstart:
    check_tracking_server()


localrules:
    init_tracking,


rule init_tracking:
    input:
        manifests=expand(f"{RESULTS}/data/{{dataset}}/manifest.csv", dataset=DATASETS),
        splits=expand(f"{RESULTS}/splits/{{dataset}}.json", dataset=DATASETS),
    output:
        store=STORE,
        parents=[e["parent"] for e in ENSEMBLES],
    log:
        f"{LOGS}/mlflow/init_tracking.log",
    conda:
        "../envs/evaluate.yaml"
    params:
        tracking={key: S.tracking[key] for key in ("uri", "experiment")},
        store_dir=lambda w, output: str(Path(output.store).parent),
        ensembles=ENSEMBLES,
        seeds=SEEDS,
    script:
        f"{SCRIPTS}/init_tracking.py"
