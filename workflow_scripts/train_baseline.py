"""Rule train_baseline: the classical scikit-learn baseline of one dataset, tracked in MLflow."""

from _common import context, inputs, run_rule

from allfuse.baseline import BaselineJob, BaselineOutputs, train_baseline
from allfuse.settings import BaselineSettings, EvaluationSettings


def main(smk, log):
    job = BaselineJob(
        dataset=smk.wildcards.dataset,
        settings=BaselineSettings.from_params(smk.params.settings),
        data=inputs(smk, "manifest", "images"),
        split=smk.input.split,
        outputs=BaselineOutputs(smk.output.predictions, smk.output.run),
        # The run's summary metrics are scored as the tables are; not a param: changing how the
        # tables are scored must refit nothing.
        evaluation=EvaluationSettings.from_params(smk.config["evaluation"]),
        context=context(smk),
        fold=int(smk.params.fold),
    )
    record = train_baseline(job)
    log.info("baseline done: run %s, %s on %d features", record["run_id"], record["model"], record["n_features"])


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "train_baseline")
