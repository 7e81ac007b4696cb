"""Rule evaluate: metric tables with intervals, paper comparison and referral, logged to MLflow."""

from _common import context, run_rule

from allfuse.baseline import load_baseline
from allfuse.evaluation import TableOutputs, evaluate
from allfuse.predictions import load_ensemble, load_fusion, load_member
from allfuse.settings import EvaluationSettings
from allfuse.stages import SplitFacts


def main(smk, log):
    splits = {facts.dataset: facts for facts in map(SplitFacts.read, smk.input.splits)}
    o = smk.output
    record = evaluate(
        [load_member(path) for path in smk.input.member_runs],
        [load_ensemble(path) for path in smk.input.ensemble_runs],
        [load_fusion(path) for path in smk.input.fusion_runs],
        splits,
        context=context(smk),
        evaluation=EvaluationSettings.from_params(smk.params.evaluation),
        outputs=TableOutputs(o.metrics_csv, o.metrics_md, o.paper, o.referral, o.comparisons_csv, o.comparisons_md,
                             o.run),  # fmt: skip
        plots=smk.input.plots,
        baselines=[load_baseline(path) for path in smk.input.baseline_runs],
    )
    log.info("%d table rows; sum-rule test accuracy %s; run %s", record["n_rows"], record["sum_test_accuracy"],
             record["run_id"])  # fmt: skip


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "evaluate")
