"""Rule package_model: the dataset's deployable predictor, checked, logged and registered in MLflow."""

from _common import context, run_rule, runtime

from allfuse.packaging import PackageJob, PackageOutputs, package_model
from allfuse.predictions import load_ensemble, load_fusion, load_member
from allfuse.settings import FeatureSettings, PackageSettings


def main(smk, log):
    i = smk.input
    job = PackageJob(
        dataset=smk.wildcards.dataset,
        settings=PackageSettings.from_params(smk.params.package),
        backbones={name: FeatureSettings.from_params(s) for name, s in smk.params.backbones.items()},
        members=[load_member(path) for path in i.member_runs],
        ensembles=[load_ensemble(path) for path in i.ensemble_runs],
        fusion=load_fusion(i.fusion),
        fusion_weights=i.weights[0] if i.weights else None,
        evaluation_run=i.evaluation,
        metrics=i.metrics,
        manifest=i.manifest,
        images=i.images,
        split=i.split,
        image_size=int(smk.params.image_size),
        max_pixels=int(smk.params.max_pixels),
        target_accuracy=float(smk.params.target_accuracy),
        runtime=runtime(smk),
        context=context(smk),
        outputs=PackageOutputs(smk.output.model, smk.output.record),
    )
    record = package_model(job)
    log.info("%s: %s (%s); check: %s", record["registered_model"], record["model_uri"],
             "existing version" if record["reused"] else "new version", record["check"])  # fmt: skip


if __name__ == "__main__":
    run_rule(main, globals().get("snakemake"), "package_model")
