# The deployable predictor of each dataset (allfuse.packaging): every member of every backbone,
# the fusion rule, the uncertainty measures and the referral threshold chosen on validation,
# with the preprocessing training saw; checked against the run's fused predictions, logged as
# one MLflow pyfunc model and registered as package.registered_model (a new version when it
# changes). It packages the models of fold package.fold. Changing package: settings retrains
# nothing; `allfuse predict --model results/models/<dataset>/model` reads the local copy.


rule package_model:
    input:
        fusion=f"{RESULTS}/fusion/{{dataset}}/fold{S.package.fold}/run.json",
        fusion_predictions=f"{RESULTS}/fusion/{{dataset}}/fold{S.package.fold}/predictions.csv",
        # Read only by the rules fitted on validation: weighted_sum's weights, the stacked model.
        weights=lambda w: (
            [f"{fusion_dir(w.dataset, S.package.fold)}/weights.json"]
            if S.package.fusion_rule in ("weighted_sum", "stacked")
            else []
        ),
        ensemble_runs=lambda w: [
            f"{ensemble_dir(w.dataset, S.package.fold, b)}/run.json" for b in BACKBONES
        ],
        member_runs=lambda w: packaged_members(w, "run.json"),
        member_models=lambda w: packaged_members(w, "model.keras"),
        member_predictions=lambda w: packaged_members(w, "predictions.csv"),
        evaluation=f"{RESULTS}/tables/run.json",
        metrics=f"{RESULTS}/tables/metrics.csv",
        manifest=f"{RESULTS}/data/{{dataset}}/manifest.csv",
        images=f"{RESULTS}/data/{{dataset}}/images.npy",
        split=f"{RESULTS}/splits/{{dataset}}.json",
        store=ancient(STORE),
    output:
        model=directory(f"{RESULTS}/models/{{dataset}}/model"),
        record=f"{RESULTS}/models/{{dataset}}/registered.json",
    log:
        f"{LOGS}/models/{{dataset}}.log",
    benchmark:
        f"{JOBSTATS}/models/{{dataset}}.tsv"
    conda:
        "../envs/train.yaml"
    # Two, not the training rules' four: the three datasets' packages run side by side at the DAG's
    # end, where nothing else is left to run (with four, the third waited for a free share).
    threads: 2
    resources:
        gpu=GPU,
        mem_mb=package_memory,
        runtime=package_runtime,
        tf_threads=tf_threads,
    params:
        package=S.package.as_params(),
        backbones={b: S.hybrid(b).features().as_params() for b in BACKBONES},
        image_size=S.data["image_size"],
        max_pixels=S.data["max_pixels"],
        target_accuracy=S.evaluation.referral_target_accuracy,
        deterministic=S.deterministic,
        gpu_locks=GPU_LOCKS,
    script:
        f"{SCRIPTS}/package_model.py"
