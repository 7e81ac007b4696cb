"""Rule init_tracking: the MLflow store, the experiment, and one parent run per ensemble."""

from _common import run, standalone

from allfuse.files import write_json
from allfuse.tracking import init_tracking, start_ensemble_runs


def main(smk, log):
    store = init_tracking(smk.params.tracking)
    write_json(smk.output.store, store)
    log.info("MLflow store %s, experiment %s (id %s)", store["uri"], store["experiment"], store["experiment_id"])
    datasets, backbones = smk.params.datasets, smk.params.backbones
    data = {
        dataset: {"manifest": manifest, "split": split}
        for dataset, manifest, split in zip(datasets, smk.input.manifests, smk.input.splits, strict=True)
    }
    pairs = [(dataset, backbone) for dataset in datasets for backbone in backbones]  # the order of expand()
    outputs = dict(zip(pairs, smk.output.parents, strict=True))
    start_ensemble_runs(store, outputs, data, smk.params.seeds, dict(smk.config))


if __name__ == "__main__":
    if "snakemake" not in globals():
        snakemake = standalone("init_tracking")
    run(main, snakemake)
