"""Rule init_tracking: the MLflow store, the experiment, and one parent run per ensemble."""

from _common import run, standalone

from allfuse.io import sha256_json, write_json
from allfuse.tracking import init_tracking, provenance_tags, start_parent_run


def main(smk, log):
    store = init_tracking(smk.params.tracking)
    write_json(smk.output.store, store)
    log.info("MLflow store %s, experiment %s (id %s)", store["uri"], store["experiment"], store["experiment_id"])
    config_hash = sha256_json(dict(smk.config))
    data = dict(zip(smk.params.datasets, zip(smk.input.manifests, smk.input.splits, strict=True), strict=True))
    pairs = [(d, b) for d in smk.params.datasets for b in smk.params.backbones]  # the order of expand()
    for (dataset, backbone), out in zip(pairs, smk.output.parents, strict=True):
        manifest, split = data[dataset]
        wildcards = {"dataset": dataset, "backbone": backbone}
        tags = provenance_tags(
            rule="init_tracking",
            wildcards=wildcards,
            config_hash=config_hash,
            inputs={"manifest": manifest, "split": split},
        )
        tags |= {
            "allfuse.level": "ensemble",
            "allfuse.dataset": dataset,
            "allfuse.backbone": backbone,
            "allfuse.seeds": list(smk.params.seeds),
        }
        parent = start_parent_run(store, f"ensemble-{dataset}-{backbone}", tags, config=dict(smk.config))
        write_json(out, parent)
        log.info("parent run %s for %s/%s", parent["run_id"], dataset, backbone)


if __name__ == "__main__":
    if "snakemake" not in globals():
        snakemake = standalone("init_tracking")
    run(main, snakemake)
