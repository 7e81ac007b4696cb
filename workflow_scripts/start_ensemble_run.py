"""Rule start_ensemble_run: the MLflow parent run under which one ensemble's members nest."""

from _common import run, standalone

from allfuse.io import read_json, sha256_json, write_json
from allfuse.tracking import provenance_tags, start_parent_run


def main(smk, log):
    wildcards = dict(smk.wildcards.items())
    tags = provenance_tags(
        rule=smk.rule,
        wildcards=wildcards,
        config_hash=sha256_json(dict(smk.config)),
        inputs={"manifest": smk.input.manifest, "split": smk.input.split},
    )
    tags |= {
        "allfuse.level": "ensemble",
        "allfuse.dataset": wildcards["dataset"],
        "allfuse.backbone": wildcards["backbone"],
        "allfuse.seeds": list(smk.params.seeds),
    }
    name = f"ensemble-{wildcards['dataset']}-{wildcards['backbone']}"
    parent = start_parent_run(read_json(smk.input.store), name, tags, config=dict(smk.config))
    write_json(smk.output.parent, parent)
    log.info("parent run %s (%s)", parent["run_id"], name)


if __name__ == "__main__":
    if "snakemake" not in globals():
        snakemake = standalone("start_ensemble_run")
    run(main, snakemake)
