"""Rule plot_results: ROC, reliability, uncertainty, referral and confusion figures of one dataset."""

from _common import run_rule

from allfuse.plots import PLOT_KINDS, plot_dataset
from allfuse.predictions import load_ensemble, load_fusion
from allfuse.stages import SplitFacts


def main(smk, log):
    written = plot_dataset(
        [load_ensemble(path) for path in smk.input.ensemble_runs],
        load_fusion(smk.input.fusion_run),
        SplitFacts.read(smk.input.split),
        outputs={kind: smk.output[kind] for kind in PLOT_KINDS},
        ece_bins=int(smk.params.ece_bins),
    )
    log.info("wrote %s", ", ".join(written))


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "plot_results")
