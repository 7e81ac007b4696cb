"""Rule plot_folds: each ensemble's and the sum-rule fusion's test accuracy per fold and pooled."""

from _common import run_rule

from allfuse.plots import plot_fold_accuracy
from allfuse.reports import read_metrics_csv


def main(smk, log):
    rows = read_metrics_csv(smk.input.metrics)
    log.info("wrote %s", plot_fold_accuracy(rows, smk.output[0], float(smk.params.ci_level)))


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "plot_folds")
