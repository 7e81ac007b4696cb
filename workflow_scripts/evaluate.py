"""Rule evaluate: metric tables with intervals, paper comparison and referral, logged to MLflow."""

from _common import run, standalone

from allfuse.evaluation import evaluate


def main(smk, log):
    record = evaluate(
        smk.input.members,
        smk.input.member_runs,
        smk.input.ensembles,
        smk.input.ensemble_runs,
        smk.input.fusion,
        smk.input.fusion_runs,
        smk.input.splits,
        datasets=smk.params.datasets,
        backbones=smk.params.backbones,
        seeds=smk.params.seeds,
        evaluation=smk.params.evaluation,
        store=smk.input.store,
        plots=smk.input.plots,
        out_metrics_csv=smk.output.metrics_csv,
        out_metrics_md=smk.output.metrics_md,
        out_paper=smk.output.paper,
        out_referral=smk.output.referral,
        out_run=smk.output.run,
    )
    log.info(
        "%d table rows; sum-rule test accuracy %s; run %s",
        record["n_rows"],
        record["sum_test_accuracy"],
        record["run_id"],
    )


if __name__ == "__main__":
    if "snakemake" not in globals():
        snakemake = standalone("evaluate")
    run(main, snakemake)
