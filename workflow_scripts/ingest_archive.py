"""Rule ingest_archive: validate one ALL-IDB archive, write its manifest and decoded image cache."""

from pathlib import Path

from _common import run_rule

from allfuse.data import summarise_rows
from allfuse.ingest import write_archive_dataset


def main(smk, log):
    rows = write_archive_dataset(
        smk.input.archive,
        smk.wildcards.dataset,
        Path(smk.output.manifest).parent,
        image_size=smk.params.image_size,
        max_pixels=smk.params.max_pixels,
    )
    log.info("%s", summarise_rows(rows))


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "ingest_archive")
