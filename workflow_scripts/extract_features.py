"""Rule extract_features: frozen-backbone feature maps of one dataset (head mode)."""

from _common import compute_threads, run, standalone

from allfuse.features import extract_dataset_features


def main(smk, log):
    extract_dataset_features(
        manifest=smk.input.manifest,
        images=smk.input.images,
        split=smk.input.split,
        fold=smk.params.fold,
        settings=dict(smk.params.features),
        outputs={"train": smk.output.train, "val": smk.output.val, "test": smk.output.test},
        deterministic=smk.params.deterministic,
        threads=compute_threads(smk),
    )


if __name__ == "__main__":
    if "snakemake" not in globals():
        snakemake = standalone("extract_features")
    run(main, snakemake)
