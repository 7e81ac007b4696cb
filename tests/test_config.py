"""Config validation: the shipped files validate, defaults fill in, and every mistake gives one
clear line naming its key (with the closest allowed key for a misspelling), including the
cross-key rules a JSON schema cannot state: search-space values checked against the setting they
tune, ranges, inherited input sizes and studies left nothing to tune.

The typed settings built from a validated config, and the slices rules receive, are tested in
``test_settings.py``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from allfuse.config import backbone_minimum, load_config, load_schema, validate_config
from allfuse.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = load_schema()
HYBRID_KEYS = sorted(SCHEMA["$defs"]["hybrid_settings"]["properties"])
BACKBONE_NAMES = sorted(SCHEMA["properties"]["backbones"]["properties"])
RANGE = {"low": 0, "high": 10}


def problems_of(config: dict) -> list[str]:
    """The listed problem lines of the ConfigError that validating ``config`` raises."""
    with pytest.raises(ConfigError) as info:
        validate_config(copy.deepcopy(config))
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid configuration:"
    assert lines[1:] and all(line.startswith("  - ") for line in lines[1:]), lines
    return [line.removeprefix("  - ") for line in lines[1:]]


def one_problem(config: dict) -> str:
    problems = problems_of(config)
    assert len(problems) == 1, problems
    return problems[0]


def allowed_keys(line: str) -> list[str]:
    """The names after "allowed keys: " in an unknown-key line."""
    return line.split("allowed keys: ")[1].split(" (")[0].split(", ")


def in_space(where: str, space: dict) -> dict:
    """A config holding ``space`` as the shared search space or as mobilenetv2's own."""
    if where == "tune":
        return {"tune": {"search_space": space}}
    return {"backbones": {"mobilenetv2": {"search_space": space}}}


SPACE_AT = {"tune": "tune.search_space", "backbone": "backbones.mobilenetv2.search_space"}


# --------------------------------------------------------------------------------------------
# valid configs and defaults
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["config.yaml", "config.paper.yaml"])
def test_shipped_config_validates(name):
    config = load_config(ROOT / name)
    assert set(config) == set(SCHEMA["properties"])
    assert set(config["backbones"]) <= set(BACKBONE_NAMES)


def test_empty_config_becomes_a_full_config():
    config = validate_config({})
    assert set(config) == set(SCHEMA["properties"])
    for block, spec in SCHEMA["properties"].items():
        for key, sub in (spec.get("properties") or {}).items():
            if "default" not in sub:
                continue
            if isinstance(sub["default"], dict):  # a block default is itself filled in
                assert set(sub["default"]) <= set(config[block][key]), f"{block}.{key}"
            else:
                assert config[block][key] == sub["default"], f"{block}.{key}"
    assert config["data"]["archives"] == {"ALL_IDB1": None, "ALL_IDB2": None}
    # Every hybrid setting has a default in the hybrid block, so every backbone is complete.
    assert sorted(config["hybrid"]) == HYBRID_KEYS
    assert config["backbones"] == SCHEMA["properties"]["backbones"]["default"]
    # A filled config is a fixed point: validating it again changes nothing.
    assert validate_config(copy.deepcopy(config)) == config


def test_validate_config_fills_in_place_and_returns_the_same_mapping():
    given: dict = {"split": {"seed": 7}}
    assert validate_config(given) is given
    assert given["split"]["protocol"] == "paper" and "hybrid" in given


def test_partial_block_keeps_given_values_and_fills_the_rest():
    config = validate_config({"split": {"seed": 7}, "hybrid": {"epochs": 3}})
    assert config["split"]["seed"] == 7 and config["split"]["protocol"] == "paper"
    assert config["hybrid"]["epochs"] == 3 and "learning_rate" in config["hybrid"]


def test_backbone_blocks_accept_hybrid_keys_and_a_search_space():
    block = {"gru_units": 8, "mode": "finetune", "search_space": {"dropout": {"low": 0.0, "high": 0.4}}}
    config = validate_config({"backbones": {"mobilenetv2": copy.deepcopy(block)}})
    assert list(config["backbones"]) == ["mobilenetv2"]
    # A backbone block is not filled from the hybrid block: it holds only its overrides.
    assert set(config["backbones"]["mobilenetv2"]) == set(block)


# --------------------------------------------------------------------------------------------
# unknown keys: one line, the allowed keys listed, the closest one suggested
# --------------------------------------------------------------------------------------------


def test_unknown_top_level_key():
    line = one_problem({"dataset": ["ALL_IDB1"]})
    assert "'dataset'" in line and "at the top level" in line
    assert allowed_keys(line) == sorted(SCHEMA["properties"])


def test_unknown_nested_key():
    line = one_problem({"data": {"archive": {}}})
    assert "'archive'" in line and "under 'data'" in line and "archives" in allowed_keys(line)


def test_unknown_key_in_a_backbone_block_lists_hybrid_keys_and_search_space():
    line = one_problem({"backbones": {"inceptionv3": {"gru_unit": 32}}})
    assert "'gru_unit'" in line and "under 'backbones.inceptionv3'" in line
    assert sorted(allowed_keys(line)) == sorted([*HYBRID_KEYS, "search_space"])


def test_unknown_key_in_the_hybrid_block_lists_hybrid_keys():
    line = one_problem({"hybrid": {"search_space": {}}})
    assert "'search_space'" in line and "under 'hybrid'" in line
    assert sorted(allowed_keys(line)) == HYBRID_KEYS


def test_unknown_key_in_a_search_space_entry():
    line = one_problem({"tune": {"search_space": {"dropout": {"low": 0.1, "high": 0.5, "lg": True}}}})
    assert "'lg'" in line and "tune.search_space.dropout" in line
    assert sorted(allowed_keys(line)) == ["choices", "high", "log", "low", "step"]


def test_unknown_search_space_parameter():
    line = one_problem({"backbones": {"efficientnetb3": {"search_space": {"epochs": {"low": 1, "high": 9}}}}})
    assert line.startswith("unknown config key 'epochs'") and "backbones.efficientnetb3.search_space" in line
    tunable = SCHEMA["$defs"]["search_space"]["propertyNames"]["enum"]
    assert sorted(allowed_keys(line)) == sorted(tunable)


def test_unknown_backbone_name():
    line = one_problem({"backbones": {"resnet50": {}}})
    assert "'resnet50'" in line and "under 'backbones'" in line
    assert "efficientnetb3, inceptionv3, mobilenetv2" in line
    assert "did you mean" not in line  # nothing is close to resnet50


@pytest.mark.parametrize(
    ("config", "given", "scope", "meant"),
    [
        ({"dataset": ["ALL_IDB1"]}, "dataset", "at the top level", "datasets"),
        ({"hybrid": {"learnig_rate": 0.01}}, "learnig_rate", "under 'hybrid'", "learning_rate"),
        (
            {"backbones": {"inceptionv3": {"learnig_rate": 0.01}}},
            "learnig_rate",
            "under 'backbones.inceptionv3'",
            "learning_rate",
        ),
        (
            {"tune": {"search_space": {"learnig_rate": {"low": 0.001, "high": 0.01}}}},
            "learnig_rate",
            "under 'tune.search_space'",
            "learning_rate",
        ),
        (
            {"backbones": {"mobilenetv2": {"search_space": {"learnig_rate": {"low": 0.001, "high": 0.01}}}}},
            "learnig_rate",
            "under 'backbones.mobilenetv2.search_space'",
            "learning_rate",
        ),
        ({"tune": {"search_space": {"dropout": {"low": 0.1, "high": 0.5, "lg": True}}}}, "lg", "dropout'", "log"),
        ({"backbones": {"inceptionv": {}}}, "inceptionv", "under 'backbones'", "inceptionv3"),
        ({"tune": {"n_trial": 3}}, "n_trial", "under 'tune'", "n_trials"),
    ],
)
def test_misspelt_key_names_the_closest_allowed_one(config, given, scope, meant):
    line = one_problem(config)
    assert line.startswith(f"unknown config key '{given}'") and scope in line
    assert f"(did you mean '{meant}'?)" in line


# --------------------------------------------------------------------------------------------
# wrong types, bad enums, out of range: one line naming the key path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"hybrid": {"epochs": "ten"}}, "hybrid.epochs"),
        ({"backbones": {"inceptionv3": {"epochs": 2.5}}}, "backbones.inceptionv3.epochs"),
        ({"split": {"seed": "42"}}, "split.seed"),
        ({"ensemble": {"seeds": [1, "b"]}}, "ensemble.seeds[1]"),
        ({"hybrid": {"weights": 3}}, "hybrid.weights"),
        ({"tracking": []}, "tracking"),
        ({"tune": {"n_trials": 1.5}}, "tune.n_trials"),
        ({"tune": {"search_space": {"gru_units": {"low": 16, "high": 64, "step": True}}}}, "tune.search_space.gru_units.step"),
    ],
)
def test_wrong_type_names_the_key_path_once(config, path):
    line = one_problem(config)
    assert f"'{path}' must be of type" in line


def test_two_mistakes_give_two_lines():
    problems = problems_of({"hybrid": {"epochs": "x"}, "backbones": {"mobilenetv2": {"dropout": "y", "foo": 1}}})
    assert len(problems) == 3
    assert any("'hybrid.epochs'" in p for p in problems)
    assert any("'backbones.mobilenetv2.dropout'" in p for p in problems)
    assert any("'foo'" in p for p in problems)


@pytest.mark.parametrize(
    ("config", "path", "value"),
    [
        ({"split": {"protocol": "random"}}, "split.protocol", "'random'"),
        ({"hybrid": {"optimizer": "adagrad"}}, "hybrid.optimizer", "'adagrad'"),
        ({"backbones": {"mobilenetv2": {"mode": "frozen"}}}, "backbones.mobilenetv2.mode", "'frozen'"),
        ({"tune": {"objective": "val_acc"}}, "tune.objective", "'val_acc'"),
    ],
)
def test_bad_enum(config, path, value):
    line = one_problem(config)
    assert f"'{path}' must be one of" in line and value in line


def test_unknown_dataset_names_the_key_and_the_closest_name():
    line = one_problem({"datasets": ["ALL_IDB3"]})
    assert "'datasets[0]': 'ALL_IDB3' is neither an ALL-IDB dataset" in line and "(did you mean 'ALL_IDB2'?)" in line


@pytest.mark.parametrize(
    ("config", "path"),
    [
        ({"hybrid": {"augment_views": 8}}, "hybrid.augment_views"),
        ({"split": {"test_fraction": 1.0}}, "split.test_fraction"),
        ({"hybrid": {"input_size": 16}}, "hybrid.input_size"),
        ({"backbones": {"mobilenetv2": {"input_size": 16}}}, "backbones.mobilenetv2.input_size"),
        ({"backbones": {"inceptionv3": {"input_size": 16}}}, "backbones.inceptionv3.input_size"),
    ],
)
def test_out_of_range(config, path):
    assert f"'{path}' is out of range" in one_problem(config)


# --------------------------------------------------------------------------------------------
# backbone minimum input sizes (the schema states them; an inherited size is checked too)
# --------------------------------------------------------------------------------------------


def test_schema_states_each_backbones_minimum_input_size():
    assert {b: backbone_minimum(SCHEMA, b) for b in BACKBONE_NAMES} == {
        "efficientnetb3": 32,
        "inceptionv3": 75,
        "mobilenetv2": 32,
    }


def test_own_input_size_below_the_backbone_minimum_is_refused():
    line = one_problem({"backbones": {"inceptionv3": {"input_size": 60}}})
    assert "'backbones.inceptionv3.input_size' is out of range" in line
    assert "60" in line and "75" in line


def test_own_input_size_at_the_backbone_minimum_is_accepted():
    validate_config({"backbones": {"inceptionv3": {"input_size": 75}}})


def test_inherited_input_size_below_the_backbone_minimum_names_the_backbone():
    line = one_problem({"hybrid": {"input_size": 60}, "backbones": {"inceptionv3": {}, "mobilenetv2": {}}})
    assert "'hybrid.input_size'" in line and "'inceptionv3'" in line and "75" in line
    assert "mobilenetv2" not in line  # 60 px is fine for the other backbone
    assert "backbones.inceptionv3.input_size" in line  # says what to set


@pytest.mark.parametrize(
    "config",
    [
        {"hybrid": {"input_size": 75}, "backbones": {"inceptionv3": {}}},  # at the minimum
        {"hybrid": {"input_size": 60}, "backbones": {"inceptionv3": {"input_size": 75}}},  # not inherited
        {"hybrid": {"input_size": 60}, "backbones": {"mobilenetv2": {}, "efficientnetb3": {}}},
        {"hybrid": {"input_size": 60}},  # the default backbones each set their own size
    ],
)
def test_inherited_input_size_the_backbones_accept(config):
    validate_config(config)


# --------------------------------------------------------------------------------------------
# search spaces: values checked against the setting they tune, ranges well formed
# --------------------------------------------------------------------------------------------

BAD_SPACES = [
    ({"gru_units": {"choices": [32, "big"]}}, "gru_units.choices[1]'", "'big'"),
    ({"gru_units": {"choices": [32, True]}}, "gru_units.choices[1]'", "True"),
    ({"gru_units": {"choices": [0, 32]}}, "gru_units.choices[0]'", "less than the minimum of 1"),
    ({"dropout": {"low": 0.1, "high": 1.0}}, "dropout.high'", "1.0"),
    ({"learning_rate": {"low": -1, "high": 0.1}}, "learning_rate.low'", "-1"),
    ({"gru_units": {"low": 16.5, "high": 64}}, "gru_units.low'", "16.5"),
    ({"optimizer": {"choices": ["adam", "adagrad"]}}, "optimizer.choices[1]'", "'adagrad'"),
    ({"bidirectional": {"low": 0, "high": 1}}, "bidirectional'", "takes choices"),
    ({"optimizer": {"low": 0, "high": 1}}, "optimizer'", "takes choices"),
    ({"bidirectional": {"choices": [True, 1]}}, "bidirectional.choices[1]'", "1"),
    (
        {"learning_rate": {"low": 0.0001, "high": 0.1, "log": True, "step": 0.001}},
        "learning_rate'",
        "step and log cannot be combined",
    ),
    ({"gru_units": {"low": 16, "high": 64, "step": 1.5}}, "gru_units.step'", "must be an integer"),
    ({"gru_units": {"low": 16, "high": 64, "step": 100}}, "gru_units.step'", "larger than the range 16..64"),
    ({"dropout": {"low": 0.1, "high": 0.2, "step": 0.5}}, "dropout.step'", "larger than the range"),
    ({"gru_units": {"choices": [32, 64, 32]}}, "gru_units.choices'", "lists a value twice"),
    ({"optimizer": {"choices": ["adam", "adam"]}}, "optimizer.choices'", "lists a value twice"),
    ({"dropout": {"choices": [0.2, 0.2]}}, "dropout.choices'", "lists a value twice"),
    ({"batch_size": {"choices": [16, 16.0]}}, "batch_size.choices'", "lists a value twice"),
    ({"gru_units": {"choices": [32, 64], "log": True}}, "gru_units'", "either choices or a range"),
    ({"gru_units": {"choices": [32, 64], "step": 2}}, "gru_units'", "either choices or a range"),
    ({"dropout": {"low": 0.5, "high": 0.5}}, "dropout'", "low (0.5) must be below high (0.5)"),
    ({"dropout": {"low": 0.4, "high": 0.2}}, "dropout'", "must be below high"),
    ({"dropout": {"low": 0.0, "high": 0.5, "log": True}}, "dropout'", "a log range needs low > 0"),
    ({"unfreeze_layers": {"low": 0, "high": 10, "log": True}, "dropout": {"low": 0.1, "high": 0.2}}, "unfreeze_layers'", "low > 0"),
    # learning_rate itself must be > 0, so the setting's own check names the bound first
    ({"learning_rate": {"low": 0.0, "high": 0.1, "log": True}}, "learning_rate.low'", "0.0"),
    ({"dropout": {"low": 0.1}}, "dropout'", "'high' is a required property"),
    ({"dropout": {"choices": []}}, "dropout.choices'", "non-empty"),
    ({"dropout": {"low": 0.1, "high": 0.5, "choices": [0.1]}}, "dropout'", "invalid"),
]


@pytest.mark.parametrize("where", ["tune", "backbone"])
@pytest.mark.parametrize(("space", "key", "fragment"), BAD_SPACES)
def test_bad_search_space_entry_gives_one_line_naming_it(where, space, key, fragment):
    line = one_problem(in_space(where, space))
    assert f"'{SPACE_AT[where]}.{key}" in line and fragment in line


@pytest.mark.parametrize(
    "space",
    [
        {"gru_units": {"choices": [32, 64]}},
        {"dropout": {"low": 0.0, "high": 0.9}},
        {"dropout": {"low": 0.1, "high": 0.5, "step": 0.1}},
        {"optimizer": {"choices": ["adam", "sgd"]}},
        {"bidirectional": {"choices": [True, False]}},
        {"learning_rate": {"low": 0.0001, "high": 0.1, "log": True}},
        {"learning_rate": {"low": 1, "high": 2}},  # integer bounds on a float setting
        {"gru_units": {"low": 16, "high": 64, "step": 16}},
        {"gru_units": {"low": 16, "high": 64, "step": 48}},  # a step as wide as the range
        {"batch_size": {"low": 8, "high": 64, "log": True}},
        {"dense_units": {"choices": [8]}},
    ],
)
def test_good_search_space_entries_pass(space):
    config = validate_config(in_space("tune", copy.deepcopy(space)))
    for key, spec in space.items():
        assert {k: v for k, v in config["tune"]["search_space"][key].items() if k in spec} == spec


def test_a_float_step_as_wide_as_the_range_passes():
    validate_config({"tune": {"search_space": {"dropout": {"low": 0.1, "high": 0.3, "step": 0.2}}}})


def test_bad_entries_in_both_spaces_are_all_listed():
    problems = problems_of(
        {
            "tune": {"search_space": {"gru_units": {"choices": ["big"]}, "dropout": {"low": 0.1, "high": 0.2}}},
            "backbones": {"mobilenetv2": {"search_space": {"optimizer": {"choices": ["adagrad"]}}}},
        }
    )
    assert len(problems) == 2, problems
    assert any("'tune.search_space.gru_units.choices[0]'" in p for p in problems)
    assert any("'backbones.mobilenetv2.search_space.optimizer.choices[0]'" in p for p in problems)


# --------------------------------------------------------------------------------------------
# a study must be left something to tune
# --------------------------------------------------------------------------------------------


def test_head_mode_study_with_only_unfreeze_layers_is_refused():
    line = one_problem({"backbones": {"mobilenetv2": {}}, "tune": {"search_space": {"unfreeze_layers": RANGE}}})
    assert "'tune.search_space'" in line and "'mobilenetv2'" in line and "head mode" in line
    assert "tune.n_trials: 0" in line


def test_head_mode_backbone_whose_own_space_has_only_unfreeze_layers_is_refused():
    line = one_problem({"backbones": {"mobilenetv2": {"search_space": {"unfreeze_layers": RANGE}}}})
    assert "'backbones.mobilenetv2.search_space'" in line and "'mobilenetv2'" in line


def test_a_shared_space_with_nothing_to_tune_names_every_head_backbone():
    problems = problems_of(
        {
            "hybrid": {"mode": "finetune"},
            "backbones": {"inceptionv3": {"mode": "head"}, "mobilenetv2": {}, "efficientnetb3": {"mode": "head"}},
            "tune": {"search_space": {"unfreeze_layers": RANGE}},
        }
    )
    assert len(problems) == 2, problems
    assert all("'tune.search_space'" in p for p in problems)
    assert sorted(b for b in BACKBONE_NAMES for p in problems if f"'{b}'" in p) == ["efficientnetb3", "inceptionv3"]


@pytest.mark.parametrize(
    "config",
    [
        {"backbones": {"mobilenetv2": {}}, "tune": {"n_trials": 0, "search_space": {"unfreeze_layers": RANGE}}},
        {"tune": {"n_trials": 0, "search_space": {}}},
        {"backbones": {"mobilenetv2": {"mode": "finetune"}}, "tune": {"search_space": {"unfreeze_layers": RANGE}}},
        {"hybrid": {"mode": "finetune"}, "tune": {"search_space": {"unfreeze_layers": RANGE}}},
        {"backbones": {"mobilenetv2": {"mode": "finetune", "search_space": {"unfreeze_layers": RANGE}}}},
        {"backbones": {"mobilenetv2": {}}, "tune": {"search_space": {"unfreeze_layers": RANGE, "gru_units": {"choices": [8]}}}},
    ],
)
def test_a_study_left_something_to_tune_or_none_to_run_passes(config):
    validate_config(config)


def test_an_empty_search_space_is_refused_while_studies_run():
    line = one_problem({"backbones": {"mobilenetv2": {"search_space": {}}}})
    assert "'backbones.mobilenetv2.search_space'" in line and "nothing to tune" in line


# --------------------------------------------------------------------------------------------
# config files
# --------------------------------------------------------------------------------------------


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


def test_load_config_reads_an_empty_file_as_the_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n", encoding="utf-8")
    assert load_config(empty) == validate_config({})


def test_load_config_applies_the_cross_key_rules(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("hybrid:\n  input_size: 60\nbackbones:\n  inceptionv3: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'hybrid.input_size'.*'inceptionv3'"):
        load_config(path)
