"""Rule aggregate_ensemble: one backbone's deep ensemble (mean probability and uncertainty)."""

from _common import context, run_rule

from allfuse.evaluation import aggregate_ensemble
from allfuse.predictions import load_member
from allfuse.settings import EvaluationSettings
from allfuse.files import read_record
from allfuse.stages import SplitFacts


def main(smk, log):
    record = aggregate_ensemble(
        [load_member(path) for path in smk.input.runs],
        parent_run_id=read_record(smk.input.parent, "init_tracking").get("run_id"),
        context=context(smk),
        evaluation=EvaluationSettings.from_params(smk.params.evaluation),
        synthetic=SplitFacts.read(smk.input.split).synthetic,
        out_predictions=smk.output.predictions,
        out_run=smk.output.run,
        drop_collapsed=bool(smk.params.drop_collapsed),
    )
    log.info("ensemble of %d members: test accuracy %.4f, run %s", record["n_members"], record["test_accuracy"],
             record["run_id"])  # fmt: skip


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "aggregate_ensemble")
