"""Rule make_splits: deterministic train/val/test split(s) of one dataset."""

from _common import run_rule

from allfuse.data import read_manifest
from allfuse.files import write_json
from allfuse.splits import make_split, read_groups_csv, split_summary


def main(smk, log):
    rows = read_manifest(smk.input.manifest)
    cfg = smk.params.split
    # Slide groups (user CSV or the demo's own, an intermediate); make_split adds identical-pixel groups itself.
    made_by = None if smk.config["data"].get("groups_csv") else "make_demo_archives"
    groups = read_groups_csv(smk.input.groups[0], made_by) if smk.input.groups else None
    split = make_split(
        rows,
        dataset=smk.wildcards.dataset,
        protocol=cfg["protocol"],
        seed=cfg["seed"],
        test_fraction=cfg["test_fraction"],
        val_fraction=cfg["val_fraction"],
        n_folds=cfg["n_folds"],
        n_repeats=cfg["n_repeats"],
        groups=groups,
    )
    write_json(smk.output.split, split)
    log.info("%s", split_summary(split, rows))


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "make_splits")
