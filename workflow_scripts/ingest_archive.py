"""Rule ingest_archive: validate one ALL-IDB archive, write its manifest and decoded image cache."""

from pathlib import Path

from _common import run_rule

from allfuse.data import summarise_rows
from allfuse.ingest import write_archive_dataset
from allfuse.settings import from_config


def main(smk, log):
    rows = write_archive_dataset(
        smk.input.archive,
        smk.wildcards.dataset,
        Path(smk.output.manifest).parent,
        image_size=smk.params.image_size,
        max_pixels=smk.params.max_pixels,
        # The demo's archive is the workflow's own: a damaged one is remade by its rule.
        made_by="make_demo_archives" if from_config(smk.config).uses_demo else None,
    )
    log.info("%s", summarise_rows(rows))


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "ingest_archive")
