"""Rule tune_backbone: the Optuna study of one (dataset, backbone), on train and validation data only."""

from _common import compute_threads, run, standalone

from allfuse.files import sha256_json
from allfuse.tuning import TuneJob, tune


def main(smk, log):
    import optuna

    # Optuna's own handler writes to stderr only; send its trial lines into the rule's log too.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    wildcards = dict(smk.wildcards.items())
    data_keys = ("train", "val", "manifest", "images")  # never the test subset: it is not an input
    job = TuneJob(
        dataset=wildcards["dataset"],
        backbone=wildcards["backbone"],
        settings=dict(smk.params.settings),
        tune=dict(smk.params.tune),
        data={key: smk.input[key] for key in data_keys if key in smk.input.keys()},
        split=smk.input.split,
        store=smk.input.store,
        out_best=smk.output.best,
        out_trials=smk.output.trials,
        fold=smk.params.fold,
        deterministic=smk.params.deterministic,
        threads=compute_threads(smk),
        provenance={
            "rule": smk.rule,
            "wildcards": wildcards,
            "config_hash": sha256_json(dict(smk.config)),
        },
    )
    record = tune(job)
    log.info(
        "study %s: best trial %d of %d finished (%s = %.4g)",
        record["study"],
        record["trial"],
        record["n_complete"] + record["n_pruned"],
        record["objective"],
        record["value"],
    )


if __name__ == "__main__":
    if "snakemake" not in globals():
        snakemake = standalone("tune_backbone")
    run(main, snakemake)
