"""Configuration: validation against ``schemas/config.schema.yaml``, with clear messages and defaults.

The schema is the one statement of every config fact (keys, types, enums, ranges, defaults,
backbone minimum input sizes); this module checks a config against it once, at start-up, fills the
defaults, and adds the cross-key rules a JSON schema cannot express (search-space values checked
against the setting they tune, ranges, inherited input sizes). Every problem is one line naming
its key, with the closest allowed key for a misspelling. ``allfuse.settings`` then turns the
validated config into typed, frozen settings; nothing validates config after this.
"""

from __future__ import annotations

import copy
import difflib
import functools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import yaml
from jsonschema import Draft202012Validator, validators

from allfuse.errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"
#: Tunable settings that act only when the backbone trains (finetune mode); head mode drops them.
FINETUNE_ONLY = ("unfreeze_layers",)


# libyaml's safe loader when PyYAML was built with it (8x faster on the schema: this runs at
# every Snakemake start-up, dry runs included); the same safe semantics otherwise.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def _schema_at(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_SafeLoader)  # noqa: S506 (a safe loader)


def load_schema(path: Path | str | None = None) -> dict[str, Any]:
    """The config schema as a fresh mapping (read once per process, copied per call)."""
    return copy.deepcopy(_schema_at(str(path or SCHEMA_PATH)))


def _with_defaults(validator_class: type) -> type:
    """A validator class that fills ``default`` values of ``properties`` while validating."""
    check_properties = validator_class.VALIDATORS["properties"]

    def fill_then_check(validator, properties, instance, schema):  # type: ignore[no-untyped-def]
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": fill_then_check})


def _key_path(error: jsonschema.ValidationError) -> str:
    """Dotted path of the offending key, list positions in brackets: ``backbones.inceptionv3.epochs``."""
    parts = [str(p) if not isinstance(p, int) else f"[{p}]" for p in error.absolute_path]
    return ".".join(parts).replace(".[", "[") or "<top level>"


def _resolve_ref(ref: str, root: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The subschema a local ``$ref`` ("#/$defs/name") points to; None for any other reference."""
    if not ref.startswith("#"):
        return None
    node: Any = root
    for token in filter(None, ref[1:].split("/")):
        token = token.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, Mapping) or token not in node:
            return None
        node = node[token]
    return node if isinstance(node, Mapping) else None


def _pattern_names(pattern: str) -> list[str]:
    """Literal names of a ``patternProperties`` key like "^(a|b)$"; [] for an open pattern like ".*"."""
    body = pattern.removeprefix("^").removesuffix("$")
    if body.startswith("(") and body.endswith(")"):
        body = body[1:-1]
    names = body.split("|")
    return names if all(re.fullmatch(r"[A-Za-z0-9_\-]+", n) for n in names) else []


def _allowed_keys(schema: Mapping[str, Any], root: Mapping[str, Any], *, through: bool) -> list[str]:
    """Key names a schema accepts: its properties and literal pattern names.

    With ``through`` (the rule of ``unevaluatedProperties``) the names of subschemas reached via
    ``allOf``/``anyOf``/``oneOf`` and local ``$ref`` count too; ``additionalProperties`` sees only
    the schema's own keywords.
    """
    names: set[str] = set()
    seen: set[int] = set()

    def gather(node: Mapping[str, Any], follow: bool) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        names.update((node.get("properties") or {}).keys())
        for pattern in node.get("patternProperties") or {}:
            names.update(_pattern_names(pattern))
        if not follow:
            return
        target = _resolve_ref(node["$ref"], root) if isinstance(node.get("$ref"), str) else None
        if target is not None:
            gather(target, True)
        for keyword in ("allOf", "anyOf", "oneOf"):
            for sub in node.get(keyword) or []:
                if isinstance(sub, Mapping):
                    gather(sub, True)

    gather(schema, through)
    return sorted(names)


def _describe(error: jsonschema.ValidationError, root: Mapping[str, Any] | None = None) -> str | None:
    """One line naming the key and what to do; None for an echo of another error.

    ``root`` is the whole schema, needed to follow ``$ref`` when listing a block's allowed keys.
    """
    root = root if root is not None else load_schema()
    where = _key_path(error)
    scope = f"under '{where}'" if where != "<top level>" else "at the top level"
    if error.validator in ("additionalProperties", "unevaluatedProperties"):
        allowed = _allowed_keys(error.schema, root, through=error.validator == "unevaluatedProperties")
        extra = [k for k in error.instance if k not in allowed] if isinstance(error.instance, dict) else []
        if error.validator == "unevaluatedProperties" and not extra:
            # Keys count as unevaluated when the allOf branch that knows them failed; that
            # failure has its own message, so repeating the keys as unknown would mislead.
            return None
        names = ", ".join(repr(k) for k in extra) or error.message
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"unknown config key {names} {scope}{_did_you_mean(extra, allowed)}{hint} (check the spelling)"
    if "propertyNames" in error.schema_path and error.validator == "enum":
        allowed_names = [str(v) for v in error.validator_value]
        guess = _did_you_mean([str(error.instance)], allowed_names)
        return (
            f"unknown config key {error.instance!r} {scope}{guess}; allowed keys: {', '.join(allowed_names)} "
            "(check the spelling)"
        )
    if error.validator == "propertyNames":
        return f"config key '{where}': {error.message}"
    if error.validator == "type":
        return (
            f"config key '{where}' must be of type {error.validator_value}, "
            f"got {error.instance!r} ({type(error.instance).__name__})"
        )
    if error.validator == "enum":
        return f"config key '{where}' must be one of {error.validator_value}, got {error.instance!r}"
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"config key '{where}' is out of range: {error.message}"
    if error.validator == "oneOf" and error.context:
        types = [e.validator_value for e in error.context if e.validator == "type"]
        if len(types) == len(error.context):
            return f"config key '{where}' must be of type {' or '.join(map(str, types))}, got {error.instance!r}"
        inner = min(error.context, key=lambda e: len(e.message))
        return f"config key '{where}' is invalid: {inner.message}"
    return f"config key '{where}' is invalid: {error.message}"


def _strictest_bounds(errors: Any) -> list[jsonschema.ValidationError]:
    """The errors sorted by key, one ``minimum`` error per key: where two schemas bound one key
    (the shared hybrid minimum and a backbone's own), the stricter says it all."""
    kept: dict[tuple, jsonschema.ValidationError] = {}
    others = []
    for error in errors:
        path = tuple(map(str, error.absolute_path))
        if error.validator != "minimum":
            others.append(error)
        elif path not in kept or error.validator_value > kept[path].validator_value:
            kept[path] = error
    return sorted([*others, *kept.values()], key=lambda e: (list(map(str, e.absolute_path)), e.message))


def _did_you_mean(given: list[str], allowed: list[str]) -> str:
    """" (did you mean 'x'?)" for the allowed names closest to the misspelt ones; "" when none is close."""
    guesses = [m for name in given for m in difflib.get_close_matches(str(name), allowed, n=1, cutoff=0.6)]
    if not guesses:
        return ""
    return " (did you mean " + " or ".join(f"'{g}'" for g in dict.fromkeys(guesses)) + "?)"


def validate_config(config: dict[str, Any], schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate ``config`` in place against the schema, fill defaults, and return it.

    Raises ``ConfigError`` whose message has one line per offending key.
    """
    schema = dict(schema or load_schema())
    validator = _with_defaults(Draft202012Validator)(schema)
    errors = _strictest_bounds(validator.iter_errors(config))
    if errors:
        lines = sorted({line for e in errors if (line := _describe(e, schema))})
        # An echo-only error list cannot happen with a well-formed schema; never pass silently.
        lines = lines or sorted({e.message for e in errors})
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {line}" for line in lines))
    _check_semantics(config, schema)
    return config


def _check_semantics(config: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    """Cross-key rules a JSON schema cannot express; ConfigError with one line per problem."""
    problems = (_check_input_sizes(config, schema) + _check_search_spaces_used(config) + _check_package_fold(config)
                + _check_study_storage(config) + _check_datasets(config, schema))  # fmt: skip
    spaces = {"tune.search_space": config["tune"]["search_space"]}
    for name, block in config["backbones"].items():
        if "search_space" in block:
            spaces[f"backbones.{name}.search_space"] = block["search_space"]
    settings_schema = schema["$defs"]["hybrid_settings"]["properties"]
    for where, space in spaces.items():
        for key, spec in space.items():
            problems += _check_search_param(f"{where}.{key}", spec, settings_schema[key], schema)
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def backbone_minimum(schema: Mapping[str, Any], backbone: str) -> int:
    """The smallest input size (pixels) the schema allows for ``backbone``."""
    block = schema["properties"]["backbones"]["properties"][backbone]
    return int(block["properties"]["input_size"]["minimum"])


def _check_input_sizes(config: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """A backbone that inherits hybrid.input_size must accept it (its own value the schema checks)."""
    problems = []
    inherited = int(config["hybrid"]["input_size"])
    for backbone, block in config["backbones"].items():
        minimum = backbone_minimum(schema, backbone)
        if "input_size" not in block and inherited < minimum:
            problems.append(
                f"config key 'hybrid.input_size' ({inherited}) is below the minimum of backbone '{backbone}' "
                f"({minimum} px), which inherits it: set backbones.{backbone}.input_size >= {minimum}"
            )
    return problems


def _check_datasets(config: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Every dataset run is an ALL-IDB one or a labelled set, and no labelled set takes an ALL-IDB name."""
    builtin = list(schema["$defs"]["builtin_dataset"]["enum"])
    labelled = list(config["data"]["labelled"])
    problems = [
        f"config key 'data.labelled.{name}': {name} is an ALL-IDB dataset (read from data.archives); "
        "give the labelled set another name"
        for name in labelled
        if name in builtin
    ]
    for i, name in enumerate(config["datasets"]):
        if name not in builtin and name not in labelled:
            guess = _did_you_mean([name], builtin + labelled)
            problems.append(
                f"config key 'datasets[{i}]': {name!r} is neither an ALL-IDB dataset ({', '.join(builtin)}) nor a "
                f"labelled set under data.labelled{guess}; add data.labelled.{name}: <folder or .csv file>"
            )
    return problems


def _check_package_fold(config: Mapping[str, Any]) -> list[str]:
    """The packaged fold must be one the split makes."""
    split = config["split"]
    n_folds = int(split["n_folds"]) * int(split["n_repeats"]) if split["protocol"] == "kfold" else 1
    fold = int(config["package"]["fold"])
    if fold < n_folds:
        return []
    return [f"config key 'package.fold' is {fold}, but split protocol '{split['protocol']}' makes folds 0..{n_folds - 1}"]


def _check_search_spaces_used(config: Mapping[str, Any]) -> list[str]:
    """A study needs at least one hyperparameter its backbone's mode can tune."""
    if config["tune"]["n_trials"] == 0:
        return []
    problems = []
    for backbone, block in config["backbones"].items():
        mode = block.get("mode", config["hybrid"]["mode"])
        own = "search_space" in block
        space = block["search_space"] if own else config["tune"]["search_space"]
        usable = [k for k in space if mode == "finetune" or k not in FINETUNE_ONLY]
        if not usable:
            where = f"backbones.{backbone}.search_space" if own else "tune.search_space"
            problems.append(
                f"config key '{where}' leaves backbone '{backbone}' ({mode} mode) nothing to tune: give at least "
                "one range it uses, or set tune.n_trials: 0 to skip tuning"
            )
    return problems


def _check_study_storage(config: Mapping[str, Any]) -> list[str]:
    """A database URL for the studies must not carry a password: the resolved config is stored
    with every MLflow run and hashed into its tags."""
    url = config["tune"].get("storage")
    if url and urlsplit(url).password:
        return [
            (
                "config key 'tune.storage' holds a password, and the config is stored with every MLflow run: "
                "remove it from the URL and give it to the database client instead (PostgreSQL: ~/.pgpass or "
                "PGPASSWORD)"
            )
        ]
    return []


def _resolved(node: Mapping[str, Any], root: Mapping[str, Any]) -> dict[str, Any]:
    """A property schema with its local ``$ref`` merged in (the property's own keywords win)."""
    ref = node.get("$ref")
    target = _resolve_ref(ref, root) if isinstance(ref, str) else None
    return {**(target or {}), **{k: v for k, v in node.items() if k != "$ref"}}


def search_kind(setting_schema: Mapping[str, Any], root: Mapping[str, Any]) -> str:
    """How Optuna samples a hybrid setting: "int", "float" or "categorical" (booleans and enums)."""
    resolved = _resolved(setting_schema, root)
    if "enum" in resolved or resolved.get("type") == "boolean":
        return "categorical"
    return "int" if resolved.get("type") == "integer" else "float"


def _check_search_param(at: str, spec: Mapping[str, Any], setting: Mapping[str, Any], root: Mapping[str, Any]) -> list[str]:
    """Each value a search-space entry can produce must be a valid value of the setting it tunes."""
    value_check = Draft202012Validator({**setting, "$defs": root["$defs"]})
    kind = search_kind(setting, root)
    if "choices" in spec:
        extra = [k for k in ("log", "step") if k in spec]
        if extra:
            return [f"config key '{at}': give either choices or a range, not both (remove {', '.join(extra)})"]
        problems = [
            f"config key '{at}.choices[{i}]': {choice!r} is not a valid value ({next(iter(errors)).message})"
            for i, choice in enumerate(spec["choices"])
            if (errors := list(value_check.iter_errors(choice)))
        ]
        if len({(isinstance(c, bool), c) for c in spec["choices"]}) != len(spec["choices"]):  # 1 and 1.0 are one
            problems.append(f"config key '{at}.choices' lists a value twice: {list(spec['choices'])}")
        return problems
    if kind == "categorical":
        return [f"config key '{at}' takes choices, not a range (e.g. {{choices: [...]}})"]
    problems = [
        f"config key '{at}.{bound}': {spec[bound]!r} is not a valid value ({next(iter(errors)).message})"
        for bound in ("low", "high")
        if (errors := list(value_check.iter_errors(spec[bound])))
    ]
    if problems:
        return problems
    low, high, step = spec["low"], spec["high"], spec.get("step")
    if low >= high:
        problems.append(f"config key '{at}': low ({low}) must be below high ({high})")
    if spec.get("log") and low <= 0:
        problems.append(f"config key '{at}': a log range needs low > 0, got {low}")
    if step is not None:
        if spec.get("log"):
            problems.append(f"config key '{at}': step and log cannot be combined (a log range is sampled continuously)")
        elif kind == "int" and (not isinstance(step, int) or isinstance(step, bool)):
            problems.append(f"config key '{at}.step' must be an integer for an integer setting, got {step!r}")
        elif low < high and step > (high - low) * (1 + 1e-9):  # 0.3 - 0.1 < 0.2 in floating point
            problems.append(f"config key '{at}.step' ({step}) is larger than the range {low}..{high}")
    return problems


def _read_yaml(path: Path) -> dict[str, Any]:
    """A config file's mapping, unvalidated; ConfigError naming the file when it is not one."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            config = yaml.load(fh, Loader=_SafeLoader) or {}  # noqa: S506 (a safe loader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(config).__name__}")
    return config


def load_config(path: Path | str) -> dict[str, Any]:
    """Read a YAML config file and validate it."""
    return validate_config(_read_yaml(Path(path)))


def load_config_files(paths: Sequence[Path | str]) -> dict[str, Any]:
    """The workflow config Snakemake builds from config files given in order (the Snakefile's
    config.yaml, then each --configfile): later files override earlier ones key by key, mappings
    recursively. Validated, defaults filled in."""
    if not paths:
        raise ConfigError("no config file: give one with --configfile, or run where config.yaml is")
    config: dict[str, Any] = {}
    for path in paths:
        config = merged(config, _read_yaml(Path(path)))
    return validate_config(config)


def merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into ``base`` key by key, mappings recursively (Snakemake's --configfile
    rule); neither is changed."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = merged(out[key], value) if both else copy.deepcopy(value)
    return out
