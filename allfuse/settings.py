"""Typed, frozen settings: the validated config turned into values once, for every stage.

The schema (``schemas/config.schema.yaml``) states every config fact once: keys, enums, ranges,
defaults, each backbone's minimum input size. This module reads the names it needs from there
(``BACKBONES``, ``DATASETS``, ``OPTIMIZERS``, ``TUNABLE``...) instead of restating them, and
builds frozen dataclasses from a config that :func:`allfuse.config.validate_config` has checked:
nothing here validates again, and no stage falls back on a default of its own.

Workflow rules hand each job only its own slice (``as_params()``: plain JSON values, so that
Snakemake's params trigger reruns exactly when that slice changes); the job's adapter turns the
slice back into the typed object with ``from_params``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from allfuse.config import FINETUNE_ONLY, backbone_minimum, load_schema, search_kind
from allfuse.errors import ConfigError

log = logging.getLogger(__name__)

_SCHEMA = load_schema()
_PROPS = _SCHEMA["properties"]
_HYBRID_PROPS = _SCHEMA["$defs"]["hybrid_settings"]["properties"]

ARCHIVES: tuple[str, ...] = tuple(_PROPS["data"]["properties"]["archives"]["properties"])
#: The ALL-IDB datasets; labelled sets (data.labelled) take any other name of the schema's pattern.
DATASETS: tuple[str, ...] = tuple(_SCHEMA["$defs"]["builtin_dataset"]["enum"])
DATASET_NAME: str = _SCHEMA["$defs"]["dataset_name"]["pattern"]
BACKBONES: tuple[str, ...] = tuple(_PROPS["backbones"]["properties"])
MIN_INPUT_SIZE: dict[str, int] = {b: backbone_minimum(_SCHEMA, b) for b in BACKBONES}
MODES: tuple[str, ...] = tuple(_HYBRID_PROPS["mode"]["enum"])
OPTIMIZERS: tuple[str, ...] = tuple(_HYBRID_PROPS["optimizer"]["enum"])
HEAD_NORMS: tuple[str, ...] = tuple(_HYBRID_PROPS["head_norm"]["enum"])
OBJECTIVES: tuple[str, ...] = tuple(_PROPS["tune"]["properties"]["objective"]["enum"])
TUNABLE: tuple[str, ...] = tuple(_SCHEMA["$defs"]["search_space"]["propertyNames"]["enum"])
SPLIT_PROTOCOLS: tuple[str, ...] = tuple(_PROPS["split"]["properties"]["protocol"]["enum"])
BASELINE_MODELS: tuple[str, ...] = tuple(_PROPS["baseline"]["properties"]["model"]["enum"])
PACKAGE_RULES: tuple[str, ...] = tuple(_PROPS["package"]["properties"]["fusion_rule"]["enum"])
REFERRAL_UNCERTAINTIES: tuple[str, ...] = tuple(_PROPS["package"]["properties"]["referral_uncertainty"]["enum"])

#: Hybrid settings that determine head mode's cached feature maps; the others (head sizes,
#: optimiser, epochs) change without re-extracting features.
FEATURE_KEYS = ("weights", "input_size", "augment_views")


def _typed(cls: type, values: Mapping[str, Any]) -> Any:
    """``cls`` from the mapping's entries for its fields (extra entries ignored, none missing).

    JSON Schema counts 32.0 as an integer; an ``int`` field gets it as 32.
    """
    missing = [f.name for f in fields(cls) if f.name not in values]
    if missing:
        raise KeyError(f"{cls.__name__} needs {', '.join(missing)}")
    out = {}
    for f in fields(cls):
        value = values[f.name]
        if f.type == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        out[f.name] = value
    return cls(**out)


@dataclass(frozen=True)
class HybridSettings:
    """One hybrid CNN-GRU model and its training: the hybrid block merged with a backbone's own.

    Sizes in pixels; ``dropout`` a rate in [0, 1); ``epochs``, ``patience`` and
    ``warmup_epochs`` in epochs. See the schema for each key's meaning.
    """

    backbone: str
    mode: Literal["head", "finetune"]
    weights: str | None
    input_size: int
    gru_units: int
    bidirectional: bool
    dense_units: int
    head_norm: str
    dropout: float
    optimizer: str
    learning_rate: float
    batch_size: int
    epochs: int
    patience: int
    class_weights: bool
    augment_views: int
    warmup_epochs: int
    unfreeze_layers: int

    def as_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> HybridSettings:
        return _typed(cls, values)

    def with_params(self, params: Mapping[str, Any]) -> HybridSettings:
        """These settings with tuned values in place (keys must be hybrid settings)."""
        return dataclasses.replace(self, **dict(params))

    def features(self) -> FeatureSettings:
        return FeatureSettings(self.backbone, **{k: getattr(self, k) for k in FEATURE_KEYS})

    def study_view(self, tuned: Sequence[str]) -> dict[str, Any]:
        """What a study's trials depend on: every setting but the tuned ones and ``epochs``
        (trials run ``tune.epochs``), so a change of the members' epoch budget reruns no study."""
        return {k: v for k, v in self.as_params().items() if k not in set(tuned) | {"epochs"}}


@dataclass(frozen=True)
class FeatureSettings:
    """What a backbone's cached feature maps depend on (head mode)."""

    backbone: str
    weights: str | None
    input_size: int
    augment_views: int

    def as_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> FeatureSettings:
        return _typed(cls, values)


@dataclass(frozen=True)
class ParamSpec:
    """One hyperparameter's range: kind "float" or "int" with low/high (log, step), or "categorical"."""

    name: str
    kind: Literal["float", "int", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        out: dict[str, Any] = {"low": self.low, "high": self.high, "log": self.log}
        if self.step is not None:
            out["step"] = self.step
        return out

    @classmethod
    def from_config(cls, name: str, spec: Mapping[str, Any]) -> ParamSpec:
        """A spec from a validated search-space entry; integer settings sample integers."""
        if "choices" in spec:
            return cls(name, "categorical", choices=tuple(spec["choices"]))
        kind = search_kind(_HYBRID_PROPS[name], _SCHEMA)
        cast = int if kind == "int" else float
        step = spec.get("step")
        return cls(
            name, kind, cast(spec["low"]), cast(spec["high"]), bool(spec.get("log", False)),
            cast(step) if step is not None else None,
        )  # fmt: skip


def parse_search_space(space: Mapping[str, Any], mode: str) -> tuple[ParamSpec, ...]:
    """The specs of a validated search space, sorted by name; finetune-only keys dropped in head mode."""
    specs = []
    for name in sorted(space):
        if name in FINETUNE_ONLY and mode != "finetune":
            log.warning("search space key '%s' only acts in finetune mode; head mode does not tune it", name)
            continue
        specs.append(ParamSpec.from_config(name, space[name]))
    return tuple(specs)


@dataclass(frozen=True)
class TuneSettings:
    """One backbone's Optuna study: budget, objective, sampler and pruner settings, search space,
    and how it runs: ``workers`` jobs sharing it, ``storage`` (None = a journal file per study,
    else a database URL)."""

    n_trials: int
    seed: int
    objective: str
    epochs: int
    tpe_startup_trials: int
    n_startup_trials: int
    n_warmup_steps: int
    search_space: tuple[ParamSpec, ...]
    workers: int = 1
    storage: str | None = None

    @property
    def direction(self) -> Literal["minimize", "maximize"]:
        """A loss is minimised, every other validation metric maximised."""
        return "minimize" if self.objective.endswith("loss") else "maximize"

    @property
    def tuned(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.search_space)

    def as_params(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "search_space"}
        return out | {"search_space": {spec.name: spec.as_dict() for spec in self.search_space}}

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> TuneSettings:
        specs = tuple(ParamSpec.from_config(k, v) for k, v in sorted(values["search_space"].items()))
        return _typed(cls, {**values, "search_space": specs})

    def identity(self) -> dict[str, Any]:
        """What makes trials comparable: everything but the budget (a budget change tops up), the
        number of workers and where the study is stored (how it runs, not what it measures)."""
        return {k: v for k, v in self.as_params().items() if k not in ("n_trials", "workers", "storage")}


@dataclass(frozen=True)
class EvaluationSettings:
    """Metrics and intervals: bootstrap resamples and seed, interval level, ECE bins, referral target."""

    n_bootstrap: int
    seed: int
    ci_level: float
    ece_bins: int
    referral_target_accuracy: float

    def as_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> EvaluationSettings:
        return _typed(cls, values)


@dataclass(frozen=True)
class FusionSettings:
    """The learned ``stacked`` fusion rule: regularisation, cross-validation folds and seed."""

    stacked_c: float
    stacked_cv_folds: int
    stacked_seed: int

    def as_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> FusionSettings:
        return _typed(cls, values)

    @classmethod
    def from_config(cls, fusion: Mapping[str, Any]) -> FusionSettings:
        stacked = fusion["stacked"]
        return cls.from_params({"stacked_c": stacked["c"], "stacked_cv_folds": stacked["cv_folds"],
                                "stacked_seed": stacked["seed"]})  # fmt: skip


@dataclass(frozen=True)
class BaselineSettings:
    """The classical baseline: its estimator (``model``: random_forest with ``n_estimators``
    trees, or logistic with inverse regularisation ``c``), its features (``hsv_bins`` per HSV
    channel, a ``grid`` x ``grid`` grey-level grid) and the estimator's ``seed``."""

    model: Literal["random_forest", "logistic"]
    n_estimators: int
    c: float
    hsv_bins: int
    grid: int
    seed: int

    def as_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> BaselineSettings:
        return _typed(cls, {**values, "c": float(values["c"])} if "c" in values else values)


@dataclass(frozen=True)
class PackageSettings:
    """The packaged predictor: its fusion rule, the uncertainty that decides referral, the fold
    whose models it holds and its registered name (``{dataset}`` replaced by the dataset)."""

    fusion_rule: str
    referral_uncertainty: str
    fold: int
    registered_model: str

    def as_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_params(cls, values: Mapping[str, Any]) -> PackageSettings:
        return _typed(cls, values)

    def registered_name(self, dataset: str) -> str:
        return self.registered_model.replace("{dataset}", dataset)


@dataclass(frozen=True)
class Settings:
    """The whole experiment, typed. Build it with :func:`from_config` from a validated config."""

    datasets: tuple[str, ...]
    hybrids: Mapping[str, HybridSettings]
    studies: Mapping[str, TuneSettings]
    seeds: tuple[int, ...]
    deterministic: bool
    drop_collapsed: bool
    evaluation: EvaluationSettings
    fusion: FusionSettings
    tracking: Mapping[str, Any]
    split: Mapping[str, Any]
    data: Mapping[str, Any]
    demo: Mapping[str, Any]
    baseline: BaselineSettings
    package: PackageSettings
    config: Mapping[str, Any] = field(repr=False, default_factory=dict)

    @property
    def backbones(self) -> tuple[str, ...]:
        return tuple(self.hybrids)

    @property
    def uses_demo(self) -> bool:
        """True when no archive path is configured: the workflow generates synthetic demo archives."""
        return all(self.data["archives"].get(name) is None for name in ARCHIVES)

    @property
    def archives_needed(self) -> list[str]:
        """The archives the configured datasets read (combined needs both; labelled sets none)."""
        needed = {a for d in self.datasets if d in DATASETS for a in (ARCHIVES if d not in ARCHIVES else (d,))}
        return [a for a in ARCHIVES if a in needed]

    @property
    def labelled(self) -> dict[str, str]:
        """The labelled sets the configured datasets read: name -> folder or CSV path."""
        return {d: self.data["labelled"][d] for d in self.datasets if d not in DATASETS}

    @property
    def dataset_names(self) -> tuple[str, ...]:
        """Every name the ``dataset`` wildcard may take: the ALL-IDB datasets and the labelled sets run."""
        return DATASETS + tuple(self.labelled)

    @property
    def folds(self) -> tuple[int, ...]:
        """The fold numbers every model is trained and evaluated on: all ``n_folds x n_repeats``
        folds of a kfold split (repeat-major, as allfuse.splits numbers them), fold 0 otherwise."""
        if self.split["protocol"] == "kfold":
            return tuple(range(int(self.split["n_folds"]) * int(self.split["n_repeats"])))
        return (0,)

    def hybrid(self, backbone: str) -> HybridSettings:
        return self.hybrids[self._configured(backbone)]

    def study(self, backbone: str) -> TuneSettings:
        return self.studies[self._configured(backbone)]

    def _configured(self, backbone: str) -> str:
        if backbone not in self.hybrids:
            raise ConfigError(f"backbone '{backbone}' is not configured under 'backbones' ({', '.join(self.hybrids)})")
        return backbone


def _hybrid_of(config: Mapping[str, Any], backbone: str) -> HybridSettings:
    block = {k: v for k, v in config["backbones"][backbone].items() if k != "search_space"}
    return HybridSettings.from_params({**config["hybrid"], **block, "backbone": backbone})


def _study_of(config: Mapping[str, Any], backbone: str, mode: str) -> TuneSettings:
    tune = dict(config["tune"])
    space = config["backbones"][backbone].get("search_space", tune["search_space"])
    return _typed(TuneSettings, {**tune, "search_space": parse_search_space(space, mode)})


def from_config(config: Mapping[str, Any]) -> Settings:
    """Typed settings of a config that :func:`allfuse.config.validate_config` has checked."""
    hybrids = {b: _hybrid_of(config, b) for b in config["backbones"]}
    return Settings(
        datasets=tuple(config["datasets"]),
        hybrids=hybrids,
        studies={b: _study_of(config, b, h.mode) for b, h in hybrids.items()},
        seeds=tuple(int(s) for s in config["ensemble"]["seeds"]),
        deterministic=bool(config["ensemble"]["deterministic"]),
        drop_collapsed=bool(config["ensemble"]["drop_collapsed"]),
        evaluation=EvaluationSettings.from_params(config["evaluation"]),
        fusion=FusionSettings.from_config(config["fusion"]),
        tracking=copy.deepcopy(dict(config["tracking"])),
        split=copy.deepcopy(dict(config["split"])),
        data=copy.deepcopy(dict(config["data"])),
        demo=copy.deepcopy(dict(config["demo"])),
        baseline=BaselineSettings.from_params(config["baseline"]),
        package=PackageSettings.from_params(config["package"]),
        config=config,
    )
