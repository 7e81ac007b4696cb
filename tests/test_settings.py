"""Typed settings: the names agree with the schema, a validated config becomes frozen settings,
each slice round-trips through plain JSON params, and each rule's slice changes only when its
own settings change (Snakemake reruns exactly the jobs whose params changed)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import logging
import re
from pathlib import Path

import pytest

from allfuse.errors import ConfigError

from allfuse import settings as afs
from allfuse.config import load_schema, validate_config
from allfuse.settings import (
    EvaluationSettings,
    FeatureSettings,
    HybridSettings,
    ParamSpec,
    TuneSettings,
    from_config,
    parse_search_space,
)

SCHEMA = load_schema()
PROPS = SCHEMA["properties"]
HYBRID_PROPS = SCHEMA["$defs"]["hybrid_settings"]["properties"]
SPACE = {
    "learning_rate": {"low": 0.0001, "high": 0.01, "log": True},
    "gru_units": {"low": 16, "high": 64, "step": 16},
    "dropout": {"low": 0.1, "high": 0.5},
    "optimizer": {"choices": ["adam", "sgd"]},
    "bidirectional": {"choices": [True, False]},
    "unfreeze_layers": {"low": 0, "high": 10},
}


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def settings_of(overrides: dict | None = None) -> afs.Settings:
    return from_config(validate_config(copy.deepcopy(overrides or {})))


def json_round_trip(value):
    """``value`` through JSON: equal to itself only when it is plain JSON (lists, not tuples)."""
    return json.loads(json.dumps(value))


# --------------------------------------------------------------------------------------------
# names read from the schema
# --------------------------------------------------------------------------------------------


def test_enums_agree_with_the_schema():
    assert afs.ARCHIVES == tuple(PROPS["data"]["properties"]["archives"]["properties"]) == ("ALL_IDB1", "ALL_IDB2")
    assert afs.DATASETS == tuple(SCHEMA["$defs"]["builtin_dataset"]["enum"]) == ("ALL_IDB1", "ALL_IDB2", "combined")
    assert PROPS["datasets"]["items"] == {"$ref": "#/$defs/dataset_name"}
    assert afs.DATASET_NAME == SCHEMA["$defs"]["dataset_name"]["pattern"]
    assert all(re.fullmatch(afs.DATASET_NAME, name) for name in afs.DATASETS)
    assert afs.BACKBONES == tuple(PROPS["backbones"]["properties"])
    assert set(afs.BACKBONES) == {"inceptionv3", "efficientnetb3", "mobilenetv2"}
    assert afs.MODES == tuple(HYBRID_PROPS["mode"]["enum"]) == ("head", "finetune")
    assert afs.OPTIMIZERS == tuple(HYBRID_PROPS["optimizer"]["enum"])
    assert afs.HEAD_NORMS == tuple(HYBRID_PROPS["head_norm"]["enum"])
    assert afs.OBJECTIVES == tuple(PROPS["tune"]["properties"]["objective"]["enum"])
    assert afs.SPLIT_PROTOCOLS == tuple(PROPS["split"]["properties"]["protocol"]["enum"])
    assert afs.TUNABLE == tuple(SCHEMA["$defs"]["search_space"]["propertyNames"]["enum"])
    assert set(afs.TUNABLE) <= set(HYBRID_PROPS)
    assert set(afs.FEATURE_KEYS) <= set(HYBRID_PROPS)


def test_min_input_size_is_the_schemas():
    stated = {b: PROPS["backbones"]["properties"][b]["properties"]["input_size"]["minimum"] for b in afs.BACKBONES}
    assert afs.MIN_INPUT_SIZE == stated == {"inceptionv3": 75, "efficientnetb3": 32, "mobilenetv2": 32}


# keras.applications source file of each backbone; each calls obtain_input_shape(min_size=N) once.
KERAS_SOURCES = {"inceptionv3": "inception_v3.py", "efficientnetb3": "efficientnet.py", "mobilenetv2": "mobilenet_v2.py"}


def test_min_input_size_is_keras_applications_own():
    """Read from keras' source text: find_spec locates the package without importing it (an
    import would load TensorFlow), so this stays cheap; skipped where keras is not installed."""
    spec = importlib.util.find_spec("keras")
    if spec is None or spec.origin is None:
        pytest.skip("keras is not installed")
    folder = Path(spec.origin).parent / "src" / "applications"
    assert set(KERAS_SOURCES) == set(afs.BACKBONES), "map each new backbone to its keras.applications source"
    for backbone, name in KERAS_SOURCES.items():
        if not (folder / name).is_file():
            pytest.skip(f"keras layout changed: no {folder / name}")
        sizes = {int(n) for n in re.findall(r"min_size=(\d+)", (folder / name).read_text(encoding="utf-8"))}
        assert sizes == {afs.MIN_INPUT_SIZE[backbone]}, backbone


def test_settings_fields_are_the_schemas_keys():
    assert sorted(field_names(HybridSettings)) == sorted([*HYBRID_PROPS, "backbone"])
    assert field_names(FeatureSettings) == ["backbone", *afs.FEATURE_KEYS]
    assert sorted(field_names(TuneSettings)) == sorted(PROPS["tune"]["properties"])
    assert sorted(field_names(EvaluationSettings)) == sorted(PROPS["evaluation"]["properties"])


# --------------------------------------------------------------------------------------------
# from_config
# --------------------------------------------------------------------------------------------


def test_from_config_merges_hybrid_defaults_with_a_backbones_block():
    s = settings_of(
        {
            "hybrid": {"gru_units": 16, "epochs": 5},
            "backbones": {
                "inceptionv3": {"gru_units": 128, "input_size": 139, "search_space": {"dropout": {"choices": [0.1]}}},
                "mobilenetv2": {},
            },
        }
    )
    assert s.backbones == ("inceptionv3", "mobilenetv2")
    inception = s.hybrid("inceptionv3")
    assert isinstance(inception, HybridSettings)
    assert (inception.backbone, inception.gru_units, inception.input_size, inception.epochs) == ("inceptionv3", 128, 139, 5)
    assert "search_space" not in inception.as_params()
    mobile = s.hybrid("mobilenetv2")
    defaults = validate_config({})["hybrid"]
    assert mobile.gru_units == 16 and mobile.input_size == defaults["input_size"]
    assert {k: v for k, v in mobile.as_params().items() if k not in ("backbone", "gru_units", "epochs")} == {
        k: v for k, v in defaults.items() if k not in ("gru_units", "epochs")
    }
    with pytest.raises(ConfigError, match="'efficientnetb3' is not configured"):
        s.hybrid("efficientnetb3")


def test_from_config_fills_the_other_blocks():
    config = validate_config({"datasets": ["ALL_IDB2"], "ensemble": {"seeds": [4, 5], "deterministic": False}})
    s = from_config(config)
    assert s.datasets == ("ALL_IDB2",) and s.seeds == (4, 5) and s.deterministic is False
    assert s.evaluation == EvaluationSettings.from_params(config["evaluation"])
    assert s.evaluation.n_bootstrap == PROPS["evaluation"]["properties"]["n_bootstrap"]["default"]
    assert dict(s.tracking) == config["tracking"] and dict(s.split) == config["split"]
    assert dict(s.data) == config["data"] and dict(s.demo) == config["demo"]


def test_studies_use_a_backbones_own_search_space():
    own = {"gru_units": {"choices": [8, 16]}}
    s = settings_of({"backbones": {"mobilenetv2": {"search_space": own}, "inceptionv3": {}}})
    assert s.study("mobilenetv2").tuned == ("gru_units",)
    assert s.study("mobilenetv2").as_params()["search_space"] == own
    shared = validate_config({})["tune"]["search_space"]
    assert s.study("inceptionv3").tuned == tuple(sorted(shared))
    assert s.study("inceptionv3").n_trials == s.study("mobilenetv2").n_trials == PROPS["tune"]["properties"]["n_trials"]["default"]


def test_settings_are_frozen():
    s = settings_of()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.hybrid("mobilenetv2").epochs = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.study("mobilenetv2").n_trials = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.evaluation.seed = 1  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# params: plain JSON out, the typed object back
# --------------------------------------------------------------------------------------------


def finetune_settings() -> afs.Settings:
    return settings_of({"hybrid": {"mode": "finetune"}, "tune": {"search_space": SPACE, "objective": "val_auc"}})


def test_hybrid_settings_round_trip():
    for hybrid in settings_of().hybrids.values():
        params = hybrid.as_params()
        assert json_round_trip(params) == params
        assert HybridSettings.from_params(json_round_trip(params)) == hybrid


def test_feature_settings_round_trip_and_hold_only_feature_keys():
    for hybrid in settings_of().hybrids.values():
        features = hybrid.features()
        assert features.as_params() == {"backbone": hybrid.backbone, **{k: getattr(hybrid, k) for k in afs.FEATURE_KEYS}}
        assert json_round_trip(features.as_params()) == features.as_params()
        assert FeatureSettings.from_params(json_round_trip(features.as_params())) == features
        # A hybrid's params carry its feature params, so a job may be handed either.
        assert FeatureSettings.from_params(hybrid.as_params()) == features


def test_tune_settings_round_trip():
    study = finetune_settings().study("mobilenetv2")
    assert study.tuned == tuple(sorted(SPACE))
    params = study.as_params()
    assert json_round_trip(params) == params
    assert TuneSettings.from_params(json_round_trip(params)) == study
    assert params["search_space"]["gru_units"] == {"low": 16, "high": 64, "log": False, "step": 16}
    assert params["search_space"]["optimizer"] == {"choices": ["adam", "sgd"]}


def test_evaluation_settings_round_trip():
    evaluation = settings_of({"evaluation": {"n_bootstrap": 200, "ci_level": 0.9}}).evaluation
    params = evaluation.as_params()
    assert params["n_bootstrap"] == 200 and params["ci_level"] == 0.9
    assert json_round_trip(params) == params
    assert EvaluationSettings.from_params(json_round_trip(params)) == evaluation


@pytest.mark.parametrize("cls", [HybridSettings, FeatureSettings, TuneSettings, EvaluationSettings])
def test_from_params_names_a_missing_key_and_ignores_extra_ones(cls):
    s = finetune_settings()
    params = {
        HybridSettings: s.hybrid("mobilenetv2").as_params(),
        FeatureSettings: s.hybrid("mobilenetv2").features().as_params(),
        TuneSettings: s.study("mobilenetv2").as_params(),
        EvaluationSettings: s.evaluation.as_params(),
    }[cls]
    assert cls.from_params({**params, "unrelated": 1}) == cls.from_params(params)
    missing = next(name for name in field_names(cls) if name != "search_space")
    with pytest.raises(KeyError, match=missing):
        cls.from_params({k: v for k, v in params.items() if k != missing})


def test_with_params_overrides_only_the_given_settings():
    hybrid = settings_of().hybrid("mobilenetv2")
    tuned = hybrid.with_params({"gru_units": 8, "learning_rate": 0.05})
    assert (tuned.gru_units, tuned.learning_rate) == (8, 0.05)
    assert dataclasses.replace(tuned, gru_units=hybrid.gru_units, learning_rate=hybrid.learning_rate) == hybrid
    assert hybrid.gru_units != 8  # the original is unchanged
    with pytest.raises(TypeError):
        hybrid.with_params({"n_trials": 3})


def test_study_view_leaves_out_tuned_keys_and_epochs():
    s = settings_of()
    hybrid, study = s.hybrid("mobilenetv2"), s.study("mobilenetv2")
    view = hybrid.study_view(study.tuned)
    assert set(view) == set(hybrid.as_params()) - set(study.tuned) - {"epochs"}
    assert all(view[k] == v for k, v in hybrid.as_params().items() if k in view)
    assert set(hybrid.study_view([])) == set(hybrid.as_params()) - {"epochs"}


@pytest.mark.parametrize(
    ("objective", "direction"),
    [("val_loss", "minimize"), ("val_accuracy", "maximize"), ("val_auc", "maximize")],
)
def test_tune_direction(objective, direction):
    assert settings_of({"tune": {"objective": objective}}).study("inceptionv3").direction == direction


def test_every_objective_has_a_direction_test():
    assert set(afs.OBJECTIVES) == {"val_loss", "val_accuracy", "val_auc"}


def test_tune_identity_is_everything_but_the_budget_and_how_the_study_runs():
    study = settings_of().study("mobilenetv2")
    how = ("n_trials", "workers", "storage")
    assert study.identity() == {k: v for k, v in study.as_params().items() if k not in how}
    for change in ({"n_trials": 9}, {"workers": 3}, {"storage": "postgresql://tuner@db/optuna"}):
        other = settings_of({"tune": change}).study("mobilenetv2")
        assert other.as_params() != study.as_params() and other.identity() == study.identity(), change
    assert settings_of({"tune": {"seed": 9}}).study("mobilenetv2").identity() != study.identity()


# --------------------------------------------------------------------------------------------
# search spaces
# --------------------------------------------------------------------------------------------


def test_parse_search_space_kinds_follow_the_tuned_setting():
    specs = {spec.name: spec for spec in parse_search_space(SPACE, "finetune")}
    assert list(specs) == sorted(SPACE)  # sorted by name
    assert specs["gru_units"] == ParamSpec("gru_units", "int", 16, 64, False, 16)
    assert all(isinstance(v, int) for v in (specs["gru_units"].low, specs["gru_units"].high, specs["gru_units"].step))
    assert specs["unfreeze_layers"].kind == "int"
    assert specs["learning_rate"] == ParamSpec("learning_rate", "float", 0.0001, 0.01, True)
    assert specs["dropout"].kind == "float" and specs["dropout"].step is None
    assert specs["optimizer"] == ParamSpec("optimizer", "categorical", choices=("adam", "sgd"))
    assert specs["bidirectional"].kind == "categorical" and specs["bidirectional"].choices == (True, False)


def test_integer_bounds_on_a_float_setting_sample_floats():
    (spec,) = parse_search_space({"learning_rate": {"low": 1, "high": 2}}, "head")
    assert spec.kind == "float" and isinstance(spec.low, float) and isinstance(spec.high, float)


def test_choices_of_an_integer_setting_are_categorical():
    (spec,) = parse_search_space({"gru_units": {"choices": [32, 64]}}, "head")
    assert spec.kind == "categorical" and spec.choices == (32, 64)


def test_head_mode_drops_unfreeze_layers_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger=afs.log.name):
        specs = parse_search_space(SPACE, "head")
    assert "unfreeze_layers" not in [s.name for s in specs]
    assert [s.name for s in specs] == sorted(set(SPACE) - {"unfreeze_layers"})
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unfreeze_layers" in warnings[0].getMessage()


def test_finetune_mode_keeps_unfreeze_layers_without_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger=afs.log.name):
        specs = parse_search_space(SPACE, "finetune")
    assert "unfreeze_layers" in [s.name for s in specs]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_each_backbone_study_follows_its_own_mode():
    s = settings_of(
        {
            "backbones": {"mobilenetv2": {"mode": "finetune"}, "inceptionv3": {}},
            "tune": {"search_space": {"unfreeze_layers": {"low": 0, "high": 10}, "dropout": {"low": 0.1, "high": 0.5}}},
        }
    )
    assert s.study("mobilenetv2").tuned == ("dropout", "unfreeze_layers")
    assert s.study("inceptionv3").tuned == ("dropout",)


# --------------------------------------------------------------------------------------------
# demo and archives
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datasets", "needed"),
    [
        (["ALL_IDB1"], ["ALL_IDB1"]),
        (["ALL_IDB2"], ["ALL_IDB2"]),
        (["ALL_IDB2", "ALL_IDB1"], ["ALL_IDB1", "ALL_IDB2"]),
        (["combined"], ["ALL_IDB1", "ALL_IDB2"]),
    ],
)
def test_archives_needed(datasets, needed):
    assert settings_of({"datasets": datasets}).archives_needed == needed


def test_uses_demo():
    assert settings_of().uses_demo is True
    assert settings_of({"data": {"archives": {"ALL_IDB2": "/data/ALL_IDB2.zip"}}}).uses_demo is False
    assert settings_of({"data": {"archives": {"ALL_IDB1": "/a.zip", "ALL_IDB2": "/b.zip"}}}).uses_demo is False


# --------------------------------------------------------------------------------------------
# staleness: a rule's params change only when its own settings change
# --------------------------------------------------------------------------------------------


def slices(config: dict) -> dict:
    """Every backbone's params as rules hand them to jobs (rules/common.smk)."""
    s = from_config(validate_config(copy.deepcopy(config)))
    out = {}
    for b in s.backbones:
        out[("hybrid", b)] = s.hybrid(b).as_params()
        out[("feature", b)] = s.hybrid(b).features().as_params()
        out[("tune", b)] = s.study(b).as_params()
        out[("base", b)] = s.hybrid(b).study_view(s.study(b).tuned)
    return out


@pytest.fixture()
def config() -> dict:
    return validate_config({})


def changed(config: dict, edit) -> set:
    """The slices that differ once ``edit(config)`` has been applied to a copy."""
    before = slices(config)
    edited = copy.deepcopy(config)
    edit(edited)
    after = slices(edited)
    assert set(after) == set(before)
    return {key for key in before if before[key] != after[key]}


def every(kind: str, config: dict) -> set:
    return {(kind, b) for b in config["backbones"]}


def test_editing_one_backbone_block_changes_only_that_backbones_slices(config):
    def patience(c):
        c["backbones"]["efficientnetb3"]["patience"] = 2

    assert changed(config, patience) == {("hybrid", "efficientnetb3"), ("base", "efficientnetb3")}

    def input_size(c):
        c["backbones"]["efficientnetb3"]["input_size"] = 64

    assert changed(config, input_size) == {
        ("hybrid", "efficientnetb3"),
        ("feature", "efficientnetb3"),
        ("base", "efficientnetb3"),
    }

    def space(c):
        c["backbones"]["efficientnetb3"]["search_space"] = {"dropout": {"low": 0.1, "high": 0.2}}

    # The study tunes other keys now, so its base (the untuned settings) changes too.
    assert changed(config, space) == {("tune", "efficientnetb3"), ("base", "efficientnetb3")}


def test_a_tuned_setting_changes_the_members_but_not_the_study(config):
    assert "dense_units" in config["tune"]["search_space"]

    def dense(c):
        c["backbones"]["efficientnetb3"]["dense_units"] = 7

    assert changed(config, dense) == {("hybrid", "efficientnetb3")}


def test_training_only_hybrid_keys_keep_feature_caches(config):
    def optimizer(c):
        c["hybrid"]["optimizer"] = "sgd"

    assert changed(config, optimizer) == every("hybrid", config) | every("base", config)


def test_feature_keys_change_feature_slices(config):
    for key, value in (("augment_views", 0), ("weights", "imagenet")):

        def edit(c, key=key, value=value):
            c["hybrid"][key] = value

        assert changed(config, edit) == every("hybrid", config) | every("feature", config) | every("base", config), key


def test_hybrid_epochs_do_not_change_a_studys_base(config):
    def epochs(c):
        c["hybrid"]["epochs"] += 1

    assert changed(config, epochs) == every("hybrid", config)


def test_tune_keys_change_only_study_slices(config):
    def tune_epochs(c):
        c["tune"]["epochs"] += 1

    assert changed(config, tune_epochs) == every("tune", config)


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c.update(tracking={"uri": "sqlite:///elsewhere.db", "experiment": "other"}),
        lambda c: c["evaluation"].update(n_bootstrap=200),
        lambda c: c["ensemble"].update(seeds=[7]),
    ],
    ids=["tracking", "evaluation", "ensemble"],
)
def test_other_blocks_change_no_training_slice(config, edit):
    assert changed(config, edit) == set()


def test_tracking_settings_are_the_tracking_block(config):
    edited = copy.deepcopy(config)
    edited["tracking"] = {"uri": "sqlite:///elsewhere.db", "experiment": "other"}
    assert dict(from_config(validate_config(edited)).tracking) == edited["tracking"]


def test_whole_number_floats_become_ints_in_integer_settings():
    from allfuse.config import validate_config
    from allfuse.settings import from_config

    settings = from_config(validate_config({"hybrid": {"gru_units": 32.0, "epochs": 2.0}}))
    hybrid = settings.hybrid("mobilenetv2")
    assert (hybrid.gru_units, hybrid.epochs) == (32, 2)
    assert type(hybrid.gru_units) is int and type(hybrid.epochs) is int
    assert type(hybrid.dropout) is float
