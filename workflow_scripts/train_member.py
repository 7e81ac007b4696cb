"""Rule train_member: one deep-ensemble member (dataset, backbone, seed), tracked in MLflow."""

from _common import context, inputs, run_rule, runtime

from allfuse.members import MemberJob, MemberOutputs, train_member
from allfuse.settings import EvaluationSettings, HybridSettings


def main(smk, log):
    w = smk.wildcards
    job = MemberJob(
        dataset=w.dataset,
        backbone=w.backbone,
        seed=int(w.seed),
        settings=HybridSettings.from_params(smk.params.settings),
        data=inputs(smk, "train", "val", "test", "manifest", "images"),
        split=smk.input.split,
        outputs=MemberOutputs(smk.output.model, smk.output.predictions, smk.output.history, smk.output.run),
        runtime=runtime(smk),
        # The run's summary metrics are scored as the tables are; not a param: changing how the
        # tables are scored must retrain nothing.
        evaluation=EvaluationSettings.from_params(smk.config["evaluation"]),
        context=context(smk),
        fold=int(smk.params.fold),
        best_params=smk.input.best[0] if smk.input.best else None,
        parent_run=smk.input.parent,
    )
    record = train_member(job)
    log.info("member done: run %s on %s, best epoch %s", record["run_id"], record["device"], record["best_epoch"])


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "train_member")
