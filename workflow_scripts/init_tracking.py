"""Rule init_tracking: create the MLflow store and experiment once, before parallel jobs log."""

from _common import run, standalone

from allfuse.io import write_json
from allfuse.tracking import init_tracking


def main(smk, log):
    store = init_tracking(smk.params.tracking)
    write_json(smk.output.store, store)
    log.info("MLflow store %s, experiment %s (id %s)", store["uri"], store["experiment"], store["experiment_id"])


if __name__ == "__main__":
    if "snakemake" not in globals():
        snakemake = standalone("init_tracking")
    run(main, snakemake)
