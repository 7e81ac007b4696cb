"""Rule init_tracking: the MLflow store, the experiment, and one parent run per ensemble."""

from _common import REPO, run_rule

from allfuse.evaluation import start_ensemble_run
from allfuse.files import write_json
from allfuse.stages import StageContext, init_tracking


def main(smk, log):
    store = init_tracking(smk.params.tracking, smk.params.store_dir)
    write_json(smk.output.store, store.as_dict())
    log.info("MLflow store %s, experiment %s (id %s)", store.uri, store.experiment, store.experiment_id)
    for e in smk.params.ensembles:  # {dataset, backbone, parent, manifest, split}
        wildcards = {"dataset": e["dataset"], "backbone": e["backbone"]}
        ctx = StageContext(smk.rule, wildcards, dict(smk.config), store, REPO)
        parent = start_ensemble_run(
            ctx, e["dataset"], e["backbone"], seeds=smk.params.seeds, fold=int(e["fold"]), split=e["split"],
            inputs={"manifest": e["manifest"], "split": e["split"]}, out=e["parent"],
        )  # fmt: skip
        log.info("parent run %s for %s/%s", parent["run_id"], e["dataset"], e["backbone"])


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "init_tracking")
