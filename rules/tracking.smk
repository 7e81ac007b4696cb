# MLflow: the store and experiment are created once, before any parallel job logs to them
# (concurrent first writers race in sqlite schema creation), and one parent run per ensemble is
# created here so member runs in other processes can nest under it. Training rules depend on
# these outputs through ancient(), so changing the experiment name or URI retrains nothing.


localrules:
    init_tracking,
    start_ensemble_run,


rule init_tracking:
    output:
        store=f"{RESULTS}/mlflow/store.json",
    log:
        f"{LOGS}/mlflow/init_tracking.log",
    conda:
        "../envs/evaluate.yaml"
    params:
        tracking=afc.tracking_settings(config),
    script:
        f"{SCRIPTS}/init_tracking.py"


rule start_ensemble_run:
    input:
        store=f"{RESULTS}/mlflow/store.json",
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.csv",
        split=f"{RESULTS}/splits/{{dataset}}.json",
    output:
        parent=f"{RESULTS}/members/{{dataset}}/{{backbone}}/parent_run.json",
    log:
        f"{LOGS}/members/{{dataset}}/{{backbone}}/start_ensemble_run.log",
    conda:
        "../envs/evaluate.yaml"
    params:
        tracking=afc.tracking_settings(config),
        seeds=SEEDS,
    script:
        f"{SCRIPTS}/start_ensemble_run.py"
