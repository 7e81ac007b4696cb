"""Package a finished run as its deployable predictor and register it (rule ``package_model``).

One job per dataset, after evaluation:

1. the predictor folder (allfuse.predictor) is assembled from the run: every member of every
   backbone that its ensemble averages, in head mode the frozen backbone rebuilt exactly as the
   feature cache was computed (``allfuse.features``), the configured fusion rule (with its
   validation weights or stacked model), the referral threshold chosen on VALIDATION for
   ``evaluation.referral_target_accuracy`` (``allfuse.metrics.referral_threshold``, as the
   tables choose it), and the ingestion's image size and pixel limit;
2. the predictor is checked against the run: it predicts the dataset's validation and test
   images from the image cache, and must give the fused predictions of ``fuse_predictions``
   (p_all within :data:`TOLERANCE`, the same referral decisions), or the job fails;
3. it is logged as one MLflow pyfunc model (allfuse.serving) under the job's run (level
   ``package``) and registered as ``package.registered_model`` (``allfuse-<dataset>``): a new
   version when the predictor changed (its digest: the spec and every model's weights), else the
   existing version, whose tags are brought up to date. Version tags: the evaluation, fusion,
   package and member runs, the commit, the digest and the test metrics of the packaged rule;
4. the registered version is downloaded into the job's model folder (the local copy that
   ``allfuse predict --model results/models/<dataset>/model`` reads), and ``registered.json``
   names it, last.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from allfuse import tags as T
from allfuse import tracking
from allfuse.errors import DataError
from allfuse.files import PathLike, atomic_path, read_record, sha256_array, sha256_json
from allfuse.metrics import referral_threshold, referred
from allfuse.predictions import EnsembleResult, FusionResult, MemberResult
from allfuse.predictor import (
    BackboneSpec,
    FusedEnsemble,
    MemberSpec,
    PredictorSpec,
    write_spec,
)
from allfuse.reports import read_metrics_csv
from allfuse.session import Runtime, compute_session
from allfuse.settings import FeatureSettings, PackageSettings
from allfuse.stages import SplitFacts, StageContext, StageRun, run_name, stage_run

log = logging.getLogger(__name__)

#: Largest |p_all| difference between the packaged predictor and the run's fused predictions.
TOLERANCE = 1e-5
#: Test metrics of the packaged rule copied onto the model version as ``test.<metric>`` tags.
VERSION_METRICS = ("n_test", "accuracy", "accuracy_ci_low", "accuracy_ci_high", "balanced_accuracy", "roc_auc",
                   "roc_auc_ci_low", "roc_auc_ci_high", "mcc", "ece", "tn", "fp", "fn", "tp")  # fmt: skip
#: Images per predictor call while the package is checked.
CHECK_CHUNK = 256


@dataclass(frozen=True)
class PackageOutputs:
    """The MLflow model folder (a local copy of the registered version) and registered.json."""

    model: str
    record: str


@dataclass(frozen=True)
class PackageJob:
    """One package_model job: the run's records, the data to check against, and how it runs.

    ``backbones`` holds each backbone's feature settings (backbone, input size, weights): head
    mode rebuilds its frozen backbone from them. ``image_size`` and ``max_pixels`` are the
    ingestion's (config ``data:``).
    """

    dataset: str
    settings: PackageSettings
    backbones: Mapping[str, FeatureSettings]
    members: Sequence[MemberResult]
    ensembles: Sequence[EnsembleResult]
    fusion: FusionResult
    fusion_weights: str | None
    evaluation_run: str
    metrics: str
    manifest: str
    images: str
    split: str
    image_size: int
    max_pixels: int
    target_accuracy: float
    runtime: Runtime
    context: StageContext
    outputs: PackageOutputs


# ---------------------------------------------------------------------------------------------
# 1. The spec and the folder
# ---------------------------------------------------------------------------------------------


def _ensemble_members(job: PackageJob) -> dict[str, list[MemberResult]]:
    """Each backbone's members that its ensemble averages, in seed order (collapsed members the
    ensemble dropped stay out)."""
    out = {}
    for ensemble in sorted(job.ensembles, key=lambda e: e.backbone):
        mine = {m.seed: m for m in job.members if m.backbone == ensemble.backbone}
        seeds = list(ensemble.seeds) or sorted(mine)
        missing = [s for s in seeds if s not in mine]
        if missing:
            raise DataError(f"{ensemble.path}: the ensemble averages seeds {missing} of {ensemble.backbone}, "
                            "but their member records are not inputs; rerun the workflow")  # fmt: skip
        out[ensemble.backbone] = [mine[s] for s in seeds]
    return out


def _rule_parameters(rule: str, weights_file: PathLike | None) -> dict[str, Any]:
    """What a rule needs from the fusion's weights.json: validation weights or the stacked model."""
    if rule not in ("weighted_sum", "stacked"):
        return {}
    if weights_file is None:
        raise DataError(f"fusion rule {rule} needs the fusion's weights.json; it is not an input of the job")
    record = read_record(weights_file, "fuse_predictions")
    value = record.get("weights") if rule == "weighted_sum" else record.get("stacked")
    if not isinstance(value, dict):
        raise DataError(f"{weights_file}: holds no {rule} record; delete it and rerun rule fuse_predictions")
    return {"weights": value} if rule == "weighted_sum" else {"stacked": value}


def build_spec(job: PackageJob) -> PredictorSpec:
    """The predictor's spec from the run's records (no model is loaded)."""
    rule, uncertainty = job.settings.fusion_rule, job.settings.referral_uncertainty
    fused = job.fusion.rules.get(rule)
    if fused is None:
        raise DataError(f"{job.fusion.path}: holds no '{rule}' fusion; rerun rule fuse_predictions")
    val = fused.subset("val")
    threshold = referral_threshold(val.label, val.probs, val.uncertainty(uncertainty), job.target_accuracy)
    backbones = []
    for name, members in _ensemble_members(job).items():
        mode = members[0].mode or "head"
        backbones.append(BackboneSpec(
            name=name, mode=mode, input_size=int(job.backbones[name].input_size),
            members=tuple(MemberSpec(m.seed, m.run_id, f"members/{name}/seed{m.seed}.keras") for m in members),
            backbone_file=f"backbones/{name}.keras" if mode == "head" else None,
        ))  # fmt: skip
    threads = {m.tf_threads for ms in _ensemble_members(job).values() for m in ms if m.tf_threads}
    return PredictorSpec(
        dataset=job.dataset, fold=job.fusion.fold, rule=rule, image_size=int(job.image_size),
        tf_threads=max(threads) if threads else None,
        max_pixels=int(job.max_pixels), backbones=tuple(backbones),
        referral={"uncertainty": uncertainty, "threshold": threshold, "target_accuracy": float(job.target_accuracy)},
        synthetic=SplitFacts.read(job.split).synthetic, **_rule_parameters(rule, job.fusion_weights),
        provenance={"fusion_run": job.fusion.run_id, "evaluation_run": read_record(job.evaluation_run, "evaluate").get("run_id"),
                    "ensemble_runs": {e.backbone: e.run_id for e in job.ensembles}},
    )  # fmt: skip


def assemble(folder: Path, spec: PredictorSpec, job: PackageJob) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Write the predictor folder: members' model files read (a damaged one is one line naming
    it) and copied, head-mode backbones rebuilt (allfuse.features: the same seed and weights the
    feature cache was computed with). Returns the backbones and members as Keras models."""
    from allfuse.features import FEATURE_SEED
    from allfuse.models import build_backbone, load_model_file

    members = {(m.backbone, m.seed): m for m in job.members}
    built: dict[str, Any] = {}
    loaded: dict[str, list[Any]] = {}
    for b in spec.backbones:
        for m in b.members:
            source, target = members[(b.name, m.seed)].model, folder / m.file
            loaded.setdefault(b.name, []).append(load_model_file(source, "train_member"))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        if b.backbone_file:
            settings = job.backbones[b.name]
            built[b.name] = build_backbone(b.name, b.input_size, settings.weights, seed=FEATURE_SEED)
            (folder / b.backbone_file).parent.mkdir(parents=True, exist_ok=True)
            built[b.name].save(folder / b.backbone_file)
    write_spec(folder, spec)
    return built, loaded


def digest(ensemble: FusedEnsemble) -> str:
    """What a loaded predictor computes, hashed: its spec (but its version and provenance) and the
    weights of every model in it (the .keras files carry save dates, so their bytes are not used)."""
    spec = ensemble.spec

    def hashed(model: Any) -> str:
        return sha256_json([sha256_array(np.asarray(w)) for w in model.get_weights()])

    weights = {f"backbones/{name}": hashed(model) for name, model in sorted(ensemble.backbones.items())}
    for b in spec.backbones:
        weights |= {m.file: hashed(model) for m, model in zip(b.members, ensemble.members[b.name], strict=True)}
    plain = {k: v for k, v in spec.as_dict().items() if k not in ("model_version", "provenance")}
    return sha256_json({"spec": plain, "weights": weights})


# ---------------------------------------------------------------------------------------------
# 2. The check against the run
# ---------------------------------------------------------------------------------------------


def check_against_run(ensemble: FusedEnsemble, job: PackageJob) -> dict[str, Any]:
    """Predict the fused predictions' images from the image cache and compare; DataError when
    p_all differs by more than TOLERANCE or a referral decision differs. Returns the comparison."""
    from allfuse.data import load_images, read_manifest

    spec = ensemble.spec
    expected = job.fusion.rules[spec.rule]
    if spec.rule == "stacked":  # its validation rows are out-of-fold; the fitted model applies to test
        expected = expected.subset("test")
    position = {row["image_id"]: i for i, row in enumerate(read_manifest(job.manifest))}
    missing = [i for i in expected.image_id if i not in position]
    if missing:
        raise DataError(f"{job.manifest} lacks {len(missing)} image(s) of {job.fusion.path}, e.g. {missing[0]}; "
                        "rerun the workflow from ingestion")  # fmt: skip
    cache = load_images(job.images)
    rows = np.array([position[i] for i in expected.image_id], dtype=np.int64)
    parts = [ensemble.predict(np.asarray(cache[rows[k : k + CHECK_CHUNK]])) for k in range(0, rows.size, CHECK_CHUNK)]
    got = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    want_referred = referred(expected.uncertainty(spec.referral["uncertainty"]), spec.referral["threshold"])
    result = {
        "n_images": int(rows.size),
        "max_abs_p_all_diff": float(np.max(np.abs(got["p_all"] - expected.probs[:, 1]))),
        "max_abs_entropy_diff": float(np.max(np.abs(got["predictive_entropy"] - expected.uncertainty("predictive_entropy")))),
        "referral_mismatches": int(np.sum(got["referred"] != want_referred)),
    }  # fmt: skip
    log.info("package check on %d images: max |p_all diff| %.2e, %d referral decision(s) differ",
             result["n_images"], result["max_abs_p_all_diff"], result["referral_mismatches"])  # fmt: skip
    if result["max_abs_p_all_diff"] > TOLERANCE or result["referral_mismatches"]:
        raise DataError(
            f"the packaged predictor does not reproduce the fused predictions of {job.fusion.path}: max |p_all "
            f"difference| {result['max_abs_p_all_diff']:.2e} (tolerance {TOLERANCE}), {result['referral_mismatches']} "
            "referral decision(s) differ; the member models, features or settings changed since fusion: rerun the workflow"
        )
    return result


# ---------------------------------------------------------------------------------------------
# 3-4. Registration and the local copy
# ---------------------------------------------------------------------------------------------


def version_tags(job: PackageJob, spec: PredictorSpec, sha: str, run_id: str | None) -> dict[str, str]:
    """The tags of the registered version: provenance, digest, and the packaged rule's test metrics."""
    git = tracking.git_info(str(job.context.source))
    rows = [r for r in read_metrics_csv(job.metrics) if r.get("dataset") == job.dataset and r.get("level") == "fusion"
            and r.get("rule") == spec.rule and r.get("fold") == str(spec.fold)]  # fmt: skip
    metrics = {f"test.{k}": rows[0][k] for k in VERSION_METRICS if rows and k in rows[0]}
    members = ",".join(m.run_id for b in spec.backbones for m in b.members)
    return {
        T.PREDICTOR_SHA256: sha, T.DATASET: job.dataset, T.FOLD: str(spec.fold), T.FUSION_RULE: spec.rule,
        T.EVALUATION_RUN: str(spec.provenance.get("evaluation_run")), T.PACKAGE_RUN: str(run_id),
        f"{T.FUSION_RUN}{job.dataset}": job.fusion.run_id, T.MEMBER_RUN_IDS: members, T.GIT_COMMIT: git["git_commit"],
        T.GIT_DIRTY: git["git_dirty"], T.VERSION: spec.allfuse_version, T.SYNTHETIC: str(spec.synthetic).lower(),
        T.REFERRAL_THRESHOLD: str(spec.referral["threshold"]), **metrics,
    }  # fmt: skip


def register(stage: StageRun, folder: Path, spec: PredictorSpec, name: str, tags: Mapping[str, str]) -> tuple[int, bool]:
    """The registered version of this predictor: the existing one with the same digest (its tags
    updated), else a new one logged under the stage's run. Returns (version, reused)."""
    import mlflow

    from allfuse import serving

    uri = stage.run.uri
    client = tracking.client(uri)
    versions = tracking.retry(client.search_model_versions, f"name = '{name}'")
    same = [v for v in versions if v.tags.get(T.PREDICTOR_SHA256) == tags[T.PREDICTOR_SHA256]]
    if same:
        version = max(int(v.version) for v in same)
        for key, value in tags.items():
            if key != T.PACKAGE_RUN:
                tracking.retry(client.set_model_version_tag, name, str(version), key, value)
        return version, True
    version = max((int(v.version) for v in versions), default=0) + 1
    write_spec(folder, dataclasses.replace(spec, model_version=f"{name}/{version}"))
    with serving.saving():
        info = stage.run.log_model(mlflow.pyfunc, "model", **serving.model_arguments(folder))
    with tracking.fluent_store(uri):
        made = tracking.retry(mlflow.register_model, info.model_uri, name, tags=dict(tags))
    if int(made.version) != version:
        raise DataError(f"registered model {name}: expected to create version {version}, the registry made "
                        f"{made.version} (another job registered at the same time?); rerun rule package_model")  # fmt: skip
    return version, False


def copy_version(uri: str, name: str, version: int, target: PathLike) -> None:
    """Download a registered version into ``target`` (a folder, written atomically)."""
    import mlflow

    with atomic_path(target) as tmp, tracking.fluent_store(uri):
        tmp.mkdir()
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))


def save_unregistered(folder: Path, target: PathLike) -> None:
    """Without a tracking store: the pyfunc model saved into ``target`` only."""
    import mlflow

    from allfuse import serving

    with atomic_path(target) as tmp, serving.saving():
        mlflow.pyfunc.save_model(str(tmp), **serving.model_arguments(folder))


def package_model(job: PackageJob) -> dict[str, Any]:
    """The package_model rule (see the module docstring); returns the record (registered.json)."""
    spec = build_spec(job)
    name = job.settings.registered_name(job.dataset)
    o = job.outputs
    inputs = {"fusion": job.fusion.path, "evaluation": job.evaluation_run, "metrics": job.metrics, "split": job.split,
              **({"weights": job.fusion_weights} if job.fusion_weights else {})}  # fmt: skip
    run_tags = {T.FOLD: spec.fold, T.FUSION_RULE: spec.rule, T.REGISTERED_MODEL: name,
                f"{T.FUSION_RUN}{job.dataset}": job.fusion.run_id,
                **{f"{T.MEMBER_RUNS}{b.name}": ",".join(m.run_id for m in b.members) for b in spec.backbones}}  # fmt: skip
    Path(o.record).parent.mkdir(parents=True, exist_ok=True)
    with compute_session(job.runtime), tempfile.TemporaryDirectory(dir=Path(o.record).parent) as tmp:
        folder = Path(tmp) / "predictor"
        # The models just built or read are checked in memory (reading the copies back costs as
        # much again; the copies are byte-for-byte the members' files).
        backbones, members = assemble(folder, spec, job)
        ensemble = FusedEnsemble.load(folder, backbones=backbones, members=members)
        check = check_against_run(ensemble, job)
        sha = digest(ensemble)
        with stage_run(job.context, "package", run_name("package", job.dataset, spec.fold), dataset=job.dataset,
                       synthetic=spec.synthetic, inputs=inputs, outputs=[o.model], record=o.record,
                       tags=run_tags) as stage:  # fmt: skip
            stage.run.log_metrics({f"check_{k}": v for k, v in check.items()})
            if stage.run.run_id is None:
                save_unregistered(folder, o.model)
                version, reused = None, False
            else:
                tags = version_tags(job, spec, sha, stage.run.run_id)
                version, reused = register(stage, folder, spec, name, tags)
                stage.run.set_tags({T.MODEL_VERSION: version})
                copy_version(stage.run.uri, name, version, o.model)
            log.info("%s version %s (%s)", name, version, "unchanged: existing version" if reused else "new version")
            stage.record.update(
                dataset=job.dataset, fold=spec.fold, registered_model=name, version=version, reused=reused,
                model_uri=f"models:/{name}/{version}" if version else None, predictor_sha256=sha, rule=spec.rule,
                referral=dict(spec.referral), check=check, model=Path(o.model).name,
            )  # fmt: skip
    return read_record(o.record, "package_model")
