"""Config: the shipped file validates, defaults fill in, every mistake gives one clear line, and
each rule's slice of the config changes only when its own settings change."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from allfuse.config import (
    BACKBONES,
    FEATURE_KEYS,
    archives_needed,
    backbone_settings,
    feature_settings,
    load_config,
    load_schema,
    tracking_settings,
    tune_settings,
    uses_demo,
    validate_config,
)
from allfuse.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
HYBRID_KEYS = sorted(load_schema()["$defs"]["hybrid_settings"]["properties"])


def problems_of(config: dict) -> list[str]:
    """The listed problem lines of the ConfigError that validating ``config`` raises."""
    with pytest.raises(ConfigError) as info:
        validate_config(copy.deepcopy(config))
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid configuration:"
    return [line.removeprefix("  - ") for line in lines[1:]]


def one_problem(config: dict) -> str:
    problems = problems_of(config)
    assert len(problems) == 1, problems
    return problems[0]


@pytest.fixture()
def config() -> dict:
    return validate_config({})


# --------------------------------------------------------------------------------------------
# valid configs and defaults
# --------------------------------------------------------------------------------------------


def test_shipped_config_validates():
    config = load_config(ROOT / "config.yaml")
    assert set(config) == set(load_schema()["properties"])
    assert set(config["backbones"]) <= set(BACKBONES)


def test_empty_config_becomes_a_full_config():
    schema = load_schema()
    config = validate_config({})
    assert set(config) == set(schema["properties"])
    for block, spec in schema["properties"].items():
        for key, sub in (spec.get("properties") or {}).items():
            if "default" not in sub:
                continue
            if isinstance(sub["default"], dict):  # a block default is itself filled in
                assert set(sub["default"]) <= set(config[block][key]), f"{block}.{key}"
            else:
                assert config[block][key] == sub["default"], f"{block}.{key}"
    assert config["data"]["archives"] == {"ALL_IDB1": None, "ALL_IDB2": None}
    assert set(config["hybrid"]) == set(HYBRID_KEYS)
    # A filled config is a fixed point: validating it again changes nothing.
    assert validate_config(copy.deepcopy(config)) == config


def test_partial_block_keeps_given_values_and_fills_the_rest():
    config = validate_config({"split": {"seed": 7}, "hybrid": {"epochs": 3}})
    assert config["split"]["seed"] == 7 and config["split"]["protocol"] == "paper"
    assert config["hybrid"]["epochs"] == 3 and "learning_rate" in config["hybrid"]


def test_backbone_blocks_accept_hybrid_keys_and_a_search_space():
    config = validate_config(
        {
            "backbones": {
                "mobilenetv2": {
                    "gru_units": 8,
                    "mode": "finetune",
                    "search_space": {"dropout": {"low": 0.0, "high": 0.4}},
                }
            }
        }
    )
    assert list(config["backbones"]) == ["mobilenetv2"]


# --------------------------------------------------------------------------------------------
# one clear line per mistake
# --------------------------------------------------------------------------------------------


def test_unknown_top_level_key():
    line = one_problem({"dataset": ["ALL_IDB1"]})
    assert "'dataset'" in line and "at the top level" in line and "datasets" in line


def test_unknown_nested_key():
    line = one_problem({"data": {"archive": {}}})
    assert "'archive'" in line and "under 'data'" in line and "archives" in line


def test_unknown_key_in_a_backbone_block_lists_hybrid_keys_and_search_space():
    line = one_problem({"backbones": {"inceptionv3": {"gru_unit": 32}}})
    assert "'gru_unit'" in line and "under 'backbones.inceptionv3'" in line
    allowed = line.split("allowed keys: ")[1].split(" (")[0].split(", ")
    assert sorted(allowed) == sorted([*HYBRID_KEYS, "search_space"])


def test_unknown_key_in_a_search_space_entry():
    line = one_problem({"tune": {"search_space": {"dropout": {"low": 0.1, "high": 0.5, "lg": True}}}})
    assert "'lg'" in line and "tune.search_space.dropout" in line and "log" in line


def test_unknown_search_space_parameter():
    line = one_problem({"backbones": {"efficientnetb3": {"search_space": {"epochs": {"low": 1, "high": 9}}}}})
    assert line.startswith("unknown config key 'epochs'") and "backbones.efficientnetb3.search_space" in line
    assert "learning_rate" in line


def test_unknown_backbone_name():
    line = one_problem({"backbones": {"resnet50": {}}})
    assert "'resnet50'" in line and "under 'backbones'" in line
    assert "efficientnetb3, inceptionv3, mobilenetv2" in line


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"hybrid": {"epochs": "ten"}}, "hybrid.epochs"),
        ({"backbones": {"inceptionv3": {"epochs": 2.5}}}, "backbones.inceptionv3.epochs"),
        ({"split": {"seed": "42"}}, "split.seed"),
        ({"ensemble": {"seeds": [1, "b"]}}, "ensemble.seeds[1]"),
        ({"hybrid": {"weights": 3}}, "hybrid.weights"),
        ({"tracking": []}, "tracking"),
    ],
)
def test_wrong_type_names_the_key_path_once(config, path):
    line = one_problem(config)
    assert f"'{path}' must be of type" in line


def test_two_mistakes_give_two_lines():
    problems = problems_of({"hybrid": {"epochs": "x"}, "backbones": {"mobilenetv2": {"dropout": "y", "foo": 1}}})
    assert len(problems) == 3
    assert any("'backbones.mobilenetv2.dropout'" in p for p in problems)
    assert any("'foo'" in p for p in problems)


@pytest.mark.parametrize(
    ("config", "path", "value"),
    [
        ({"split": {"protocol": "random"}}, "split.protocol", "'random'"),
        ({"hybrid": {"optimizer": "adagrad"}}, "hybrid.optimizer", "'adagrad'"),
        ({"backbones": {"mobilenetv2": {"mode": "frozen"}}}, "backbones.mobilenetv2.mode", "'frozen'"),
        ({"datasets": ["ALL_IDB3"]}, "datasets[0]", "'ALL_IDB3'"),
    ],
)
def test_bad_enum(config, path, value):
    line = one_problem(config)
    assert f"'{path}' must be one of" in line and value in line


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"hybrid": {"augment_views": 8}}, "hybrid.augment_views"),
        ({"split": {"test_fraction": 1.0}}, "split.test_fraction"),
        ({"backbones": {"inceptionv3": {"input_size": 16}}}, "backbones.inceptionv3.input_size"),
    ],
)
def test_out_of_range(config, path):
    assert f"'{path}' is out of range" in one_problem(config)


@pytest.mark.parametrize("where", ["tune", "backbone"])
def test_search_range_low_not_below_high(where):
    space = {"dropout": {"low": 0.5, "high": 0.5}}
    config = (
        {"tune": {"search_space": space}}
        if where == "tune"
        else {"backbones": {"inceptionv3": {"search_space": space}}}
    )
    line = one_problem(config)
    prefix = "tune" if where == "tune" else "backbones.inceptionv3"
    assert f"'{prefix}.search_space.dropout'" in line and "must be below high" in line


def test_log_range_needs_positive_low():
    line = one_problem({"tune": {"search_space": {"learning_rate": {"low": 0.0, "high": 0.1, "log": True}}}})
    assert "'tune.search_space.learning_rate'" in line and "low > 0" in line


def test_search_param_needs_a_range_or_choices():
    line = one_problem({"tune": {"search_space": {"dropout": {"low": 0.1}}}})
    assert "'tune.search_space.dropout'" in line and "high" in line


def test_load_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*absent.yaml"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("split: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping"):
        load_config(listed)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("hybrid:\n  epochs: many\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'hybrid.epochs'"):
        load_config(wrong)


# --------------------------------------------------------------------------------------------
# slices handed to rules
# --------------------------------------------------------------------------------------------


def test_backbone_settings_merge_hybrid_defaults_with_overrides():
    config = validate_config(
        {
            "hybrid": {"gru_units": 16, "epochs": 5},
            "backbones": {
                "inceptionv3": {"gru_units": 128, "input_size": 139, "search_space": {"dropout": {"choices": [0.1]}}},
                "mobilenetv2": {},
            },
        }
    )
    inception = backbone_settings(config, "inceptionv3")
    assert inception["gru_units"] == 128 and inception["input_size"] == 139 and inception["epochs"] == 5
    assert inception["backbone"] == "inceptionv3" and "search_space" not in inception
    mobile = backbone_settings(config, "mobilenetv2")
    assert mobile["gru_units"] == 16 and mobile["input_size"] == config["hybrid"]["input_size"]
    assert set(mobile) == {*HYBRID_KEYS, "backbone"}
    with pytest.raises(ConfigError, match="'efficientnetb3' is not configured"):
        backbone_settings(config, "efficientnetb3")


def test_feature_settings_hold_only_feature_keys(config):
    for backbone in config["backbones"]:
        settings = feature_settings(config, backbone)
        assert set(settings) == {"backbone", *FEATURE_KEYS}
        assert settings["input_size"] == backbone_settings(config, backbone)["input_size"]


def test_tune_settings_use_a_backbones_own_search_space(config):
    own = {"gru_units": {"choices": [8, 16]}}
    config["backbones"]["mobilenetv2"]["search_space"] = own
    config = validate_config(config)
    assert tune_settings(config, "mobilenetv2")["search_space"] == own
    assert tune_settings(config, "inceptionv3")["search_space"] == config["tune"]["search_space"]
    assert tune_settings(config, "inceptionv3")["n_trials"] == config["tune"]["n_trials"]


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
    assert archives_needed(validate_config({"datasets": datasets})) == needed


def test_uses_demo():
    assert uses_demo(validate_config({})) is True
    assert uses_demo(validate_config({"data": {"archives": {"ALL_IDB2": "/data/ALL_IDB2.zip"}}})) is False


# --------------------------------------------------------------------------------------------
# staleness: a rule's params change only when its own settings change
# --------------------------------------------------------------------------------------------


def slices(config: dict) -> dict:
    return {
        (kind, backbone): fn(config, backbone)
        for backbone in config["backbones"]
        for kind, fn in (("backbone", backbone_settings), ("feature", feature_settings), ("tune", tune_settings))
    }


def changed(before: dict, after_config: dict) -> set:
    after = slices(validate_config(after_config))
    return {key for key in before if before[key] != after[key]}


def test_editing_one_backbone_block_changes_only_that_backbone(config):
    before = slices(config)
    edited = copy.deepcopy(config)
    edited["backbones"]["efficientnetb3"]["dense_units"] = 7
    assert changed(before, edited) == {("backbone", "efficientnetb3")}
    edited["backbones"]["efficientnetb3"]["input_size"] = 64
    assert changed(before, edited) == {("backbone", "efficientnetb3"), ("feature", "efficientnetb3")}
    edited["backbones"]["efficientnetb3"]["search_space"] = {"dropout": {"low": 0.1, "high": 0.2}}
    assert changed(before, edited) == {
        ("backbone", "efficientnetb3"),
        ("feature", "efficientnetb3"),
        ("tune", "efficientnetb3"),
    }


def test_training_only_hybrid_keys_keep_feature_caches(config):
    before = slices(config)
    edited = copy.deepcopy(config)
    edited["hybrid"]["epochs"] += 1
    assert changed(before, edited) == {("backbone", b) for b in config["backbones"]}


def test_tracking_keys_change_no_training_slice(config):
    before = slices(config)
    edited = copy.deepcopy(config)
    edited["tracking"] = {"uri": "sqlite:///elsewhere.db", "experiment": "other"}
    assert changed(before, edited) == set()
    assert tracking_settings(validate_config(edited)) == edited["tracking"]
