"""Rule ingest_archive: validate one ALL-IDB archive, write its manifest and decoded image cache."""

from pathlib import Path

from _common import run, standalone

from allfuse.data import ingest_archive, summarise_rows, write_dataset


def main(smk, log):
    rows, images = ingest_archive(
        smk.input.archive,
        smk.wildcards.dataset,
        image_size=smk.params.image_size,
        max_pixels=smk.params.max_pixels,
    )
    write_dataset(Path(smk.output.manifest).parent, rows, images)
    log.info("%s", summarise_rows(rows))


if __name__ == "__main__":
    if "snakemake" not in globals():
        snakemake = standalone("ingest_archive")
    run(main, snakemake)
