"""Rule fuse_predictions: sum-rule (and further) fusion of the backbones' ensembles of one dataset."""

from _common import context, run_rule

from allfuse.evaluation import fuse_predictions
from allfuse.predictions import load_ensemble, load_member
from allfuse.settings import EvaluationSettings, FusionSettings


def main(smk, log):
    record = fuse_predictions(
        [load_ensemble(path) for path in smk.input.ensemble_runs],
        [load_member(path) for path in smk.input.member_runs],
        split=smk.input.split,
        context=context(smk),
        evaluation=EvaluationSettings.from_params(smk.params.evaluation),
        fold=int(smk.params.fold),
        stacking=FusionSettings.from_params(smk.params.fusion),
        out_predictions=smk.output.predictions,
        out_weights=smk.output.weights,
        out_run=smk.output.run,
    )
    log.info("fused %s: sum-rule test accuracy %.4f, weights %s, run %s", ", ".join(record["backbones"]),
             record["sum_test_accuracy"], record["weights"], record["run_id"])  # fmt: skip


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "fuse_predictions")
