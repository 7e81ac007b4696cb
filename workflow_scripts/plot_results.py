"""Rule plot_results: ROC, reliability, uncertainty, referral and confusion figures of one dataset."""

from _common import run, standalone

from allfuse.plots import PLOT_KINDS, plot_dataset


def main(smk, log):
    written = plot_dataset(
        smk.input.ensembles,
        smk.input.fusion,
        smk.input.split,
        dataset=smk.wildcards.dataset,
        backbones=smk.params.backbones,
        outputs={kind: smk.output[kind] for kind in PLOT_KINDS},
        ece_bins=smk.params.ece_bins,
    )
    log.info("wrote %s", ", ".join(written))


if __name__ == "__main__":
    if "snakemake" not in globals():
        snakemake = standalone("plot_results")
    run(main, snakemake)
