"""Rule combine_datasets: pool the ALL_IDB1 and ALL_IDB2 manifests and image caches."""

from pathlib import Path

from _common import run_rule

from allfuse.data import combine_datasets, load_images, read_manifest, summarise_rows, write_dataset


def main(smk, log):
    parts = [
        (read_manifest(manifest), load_images(images))
        for manifest, images in zip(smk.input.manifests, smk.input.images, strict=True)
    ]
    # The pooled cache is copied a block of rows at a time, never held whole.
    rows, images = combine_datasets(parts)
    write_dataset(Path(smk.output.manifest).parent, rows, images)
    log.info("%s", summarise_rows(rows))


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "combine_datasets")
