"""Configuration: schema validation with clear messages, defaults, and per-rule subsections.

The Snakefile validates the whole config once at start-up. Rules then receive only the slice of
the config they depend on (``backbone_settings``, ``feature_settings``...), so Snakemake's params
trigger reruns exactly the jobs whose settings changed: editing one backbone's block reruns that
backbone's subtree only, and tracking keys reach no training rule.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema import Draft202012Validator, validators

from allfuse.errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"
ARCHIVES = ("ALL_IDB1", "ALL_IDB2")
DATASETS = ("ALL_IDB1", "ALL_IDB2", "combined")
BACKBONES = ("inceptionv3", "efficientnetb3", "mobilenetv2")

# Hybrid keys that determine the cached feature maps of head mode; anything else (head sizes,
# optimiser, epochs) can change without re-extracting features.
FEATURE_KEYS = ("weights", "input_size", "augment_views")


# libyaml's safe loader when PyYAML was built with it (8x faster on the schema: this runs at
# every Snakemake start-up, dry runs included); the same safe semantics otherwise.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_schema(path: Path | str | None = None) -> dict[str, Any]:
    with open(path or SCHEMA_PATH, encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_SafeLoader)  # noqa: S506 (a safe loader)


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
        return f"unknown config key {names} {scope}{hint} (check the spelling)"
    if "propertyNames" in error.schema_path and error.validator == "enum":
        allowed = ", ".join(map(str, error.validator_value))
        return f"unknown config key {error.instance!r} {scope}; allowed keys: {allowed} (check the spelling)"
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


def validate_config(config: dict[str, Any], schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate ``config`` in place against the schema, fill defaults, and return it.

    Raises ``ConfigError`` whose message has one line per offending key.
    """
    schema = dict(schema or load_schema())
    validator = _with_defaults(Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if errors:
        lines = sorted({line for e in errors if (line := _describe(e, schema))})
        # An echo-only error list cannot happen with a well-formed schema; never pass silently.
        lines = lines or sorted({e.message for e in errors})
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {line}" for line in lines))
    _check_semantics(config)
    return config


def _check_semantics(config: Mapping[str, Any]) -> None:
    """Cross-key rules a JSON schema cannot express."""
    problems: list[str] = []
    spaces = {"tune.search_space": config["tune"]["search_space"]}
    for name, block in config["backbones"].items():
        if "search_space" in block:
            spaces[f"backbones.{name}.search_space"] = block["search_space"]
    for where, space in spaces.items():
        for key, spec in space.items():
            if "low" in spec and spec["low"] >= spec["high"]:
                problems.append(f"config key '{where}.{key}': low ({spec['low']}) must be below high ({spec['high']})")
            if spec.get("log") and "low" in spec and spec["low"] <= 0:
                problems.append(f"config key '{where}.{key}': a log range needs low > 0, got {spec['low']}")
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def load_config(path: Path | str) -> dict[str, Any]:
    """Read a YAML config file and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        try:
            config = yaml.load(fh, Loader=_SafeLoader) or {}  # noqa: S506 (a safe loader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(config).__name__}")
    return validate_config(config)


# ---------------------------------------------------------------------------------------------
# Subsections handed to individual rules
# ---------------------------------------------------------------------------------------------


def uses_demo(config: Mapping[str, Any]) -> bool:
    """True when no archive path is configured: the workflow generates synthetic demo archives."""
    archives = config["data"]["archives"]
    return all(archives.get(name) is None for name in ARCHIVES)


def archives_needed(config: Mapping[str, Any]) -> list[str]:
    """The archives the configured datasets read (combined needs both)."""
    needed: set[str] = set()
    for dataset in config["datasets"]:
        needed.update(ARCHIVES if dataset == "combined" else (dataset,))
    return [a for a in ARCHIVES if a in needed]


def backbone_settings(config: Mapping[str, Any], backbone: str) -> dict[str, Any]:
    """The hybrid defaults overridden by the backbone's own block (without its search space)."""
    if backbone not in config["backbones"]:
        raise ConfigError(f"backbone '{backbone}' is not configured under 'backbones' ({', '.join(config['backbones'])})")
    merged = copy.deepcopy(dict(config["hybrid"]))
    for key, value in config["backbones"][backbone].items():
        if key != "search_space":
            merged[key] = copy.deepcopy(value)
    merged["backbone"] = backbone
    return merged


def feature_settings(config: Mapping[str, Any], backbone: str) -> dict[str, Any]:
    """The settings that determine a backbone's cached feature maps (head mode)."""
    settings = backbone_settings(config, backbone)
    return {"backbone": backbone, **{k: settings[k] for k in FEATURE_KEYS}}


def tune_settings(config: Mapping[str, Any], backbone: str) -> dict[str, Any]:
    """Study settings of one backbone: the tune block with the backbone's search space, if any."""
    tune = copy.deepcopy(dict(config["tune"]))
    own = config["backbones"][backbone].get("search_space")
    if own is not None:
        tune["search_space"] = copy.deepcopy(own)
    return tune


def tracking_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(dict(config["tracking"]))


def study_settings(config: Mapping[str, Any], backbone: str) -> dict[str, Any]:
    """The hybrid settings a backbone's study depends on.

    Leaves out what the study itself decides (the keys of its search space) and ``epochs`` (trials
    run ``tune.epochs``), so that changing, say, the members' epoch budget reruns the members but
    not the study.
    """
    settings = backbone_settings(config, backbone)
    tuned = set(tune_settings(config, backbone)["search_space"])
    return {k: v for k, v in settings.items() if k not in tuned and k != "epochs"}
