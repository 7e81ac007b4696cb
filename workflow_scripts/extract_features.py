"""Rule extract_features: frozen-backbone feature maps of one dataset (head mode)."""

from _common import run_rule, runtime

from allfuse.features import FeatureJob, extract_dataset_features
from allfuse.settings import FeatureSettings


def main(smk, log):
    job = FeatureJob(
        manifest=smk.input.manifest,
        images=smk.input.images,
        split=smk.input.split,
        fold=int(smk.params.fold),
        settings=FeatureSettings.from_params(smk.params.features),
        outputs={"train": smk.output.train, "val": smk.output.val, "test": smk.output.test},
        runtime=runtime(smk),
    )
    log.info("feature maps per subset: %s", extract_dataset_features(job))


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "extract_features")
