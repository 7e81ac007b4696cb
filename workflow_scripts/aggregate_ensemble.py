"""Rule aggregate_ensemble: one backbone's deep ensemble (mean probability and uncertainty)."""

from _common import run, standalone

from allfuse.evaluation import aggregate_ensemble


def main(smk, log):
    record = aggregate_ensemble(
        smk.input.predictions,
        smk.input.runs,
        smk.input.parent,
        dataset=smk.wildcards.dataset,
        backbone=smk.wildcards.backbone,
        seeds=smk.params.seeds,
        evaluation=smk.params.evaluation,
        store=smk.input.store,
        out_predictions=smk.output.predictions,
        out_run=smk.output.run,
    )
    log.info(
        "ensemble of %d members: test accuracy %.4f, parent run %s finished",
        record["n_members"],
        record["test_accuracy"],
        record["run_id"],
    )


if __name__ == "__main__":
    if "snakemake" not in globals():
        snakemake = standalone("aggregate_ensemble")
    run(main, snakemake)
