"""Rule ingest_labelled: validate one labelled set (folder or CSV), write its manifest and image cache."""

from pathlib import Path

from _common import run_rule

from allfuse.data import summarise_rows
from allfuse.labelled import write_labelled_dataset


def main(smk, log):
    rows = write_labelled_dataset(
        smk.input.source,
        smk.wildcards.dataset,
        Path(smk.output.manifest).parent,
        image_size=smk.params.image_size,
        max_pixels=smk.params.max_pixels,
    )
    log.info("%s", summarise_rows(rows))


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "ingest_labelled")
