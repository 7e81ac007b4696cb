"""Rule fuse_predictions: sum-rule (and further) fusion of the backbones' ensembles of one dataset."""

from _common import run, standalone

from allfuse.evaluation import fuse_predictions


def main(smk, log):
    record = fuse_predictions(
        smk.input.ensembles,
        smk.input.ensemble_runs,
        smk.input.members,
        smk.input.member_runs,
        smk.input.split,
        dataset=smk.wildcards.dataset,
        backbones=smk.params.backbones,
        seeds=smk.params.seeds,
        evaluation=smk.params.evaluation,
        store=smk.input.store,
        out_predictions=smk.output.predictions,
        out_weights=smk.output.weights,
        out_run=smk.output.run,
        resolved_config=dict(smk.config),
    )
    log.info(
        "fused %s: sum-rule test accuracy %.4f, weights %s, run %s",
        ", ".join(record["backbones"]),
        record["sum_test_accuracy"],
        record["weights"],
        record["run_id"],
    )


if __name__ == "__main__":
    if "snakemake" not in globals():
        snakemake = standalone("fuse_predictions")
    run(main, snakemake)
