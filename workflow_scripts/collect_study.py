"""Rule collect_study: after every worker of a study, its best_params.json and trials.csv."""

from _common import context, run_rule

from allfuse.settings import TuneSettings
from allfuse.tuning import CollectJob, collect_study


def main(smk, log):
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    job = CollectJob(
        dataset=smk.wildcards.dataset,
        backbone=smk.wildcards.backbone,
        tune=TuneSettings.from_params(smk.params.tune),
        split=smk.input.split,
        workers=list(smk.input.workers),
        out_best=smk.output.best,
        out_trials=smk.output.trials,
        context=context(smk),
        fold=int(smk.params.fold),
    )
    record = collect_study(job)
    log.info("study %s: best trial %d (%s = %.4g)", record["study"], record["trial"], record["objective"], record["value"])


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "collect_study")
