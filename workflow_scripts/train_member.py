"""Rule train_member: one deep-ensemble member (dataset, backbone, seed), tracked in MLflow."""

from _common import compute_threads, run, standalone

from allfuse.files import sha256_json
from allfuse.members import MemberJob, train_member


def main(smk, log):
    wildcards = dict(smk.wildcards.items())
    data_keys = ("train", "val", "test", "manifest", "images")
    job = MemberJob(
        dataset=wildcards["dataset"],
        backbone=wildcards["backbone"],
        seed=int(wildcards["seed"]),
        settings=dict(smk.params.settings),
        data={key: smk.input[key] for key in data_keys if key in smk.input.keys()},
        split=smk.input.split,
        best_params=smk.input.best[0] if smk.input.best else None,
        parent_run=smk.input.parent,
        out_model=smk.output.model,
        out_predictions=smk.output.predictions,
        out_history=smk.output.history,
        out_run=smk.output.run,
        fold=smk.params.fold,
        deterministic=smk.params.deterministic,
        threads=compute_threads(smk),
        provenance={
            "rule": smk.rule,
            "wildcards": wildcards,
            "config": dict(smk.config),
            "config_hash": sha256_json(dict(smk.config)),
        },
    )
    record = train_member(job)
    log.info("member done: run %s on %s, best epoch %s", record["run_id"], record["device"], record["best_epoch"])


if __name__ == "__main__":
    if "snakemake" not in globals():
        snakemake = standalone("train_member")
    run(main, snakemake)
