"""Train / validation / test splits of a dataset, by protocol, as the object stored in splits/{dataset}.json.

Three protocols:

- ``paper``: one stratified hold-out test set of ``test_fraction`` with scikit-learn's rounding
  (the test set has ``ceil(test_fraction * n)`` images: 22 / 52 / 74 of 108 / 260 / 368, the only
  sizes that fit the paper's reported accuracies), then a stratified validation set of
  ``val_fraction`` carved from the training part. Related images may fall on both sides.
- ``grouped``: the same hold-out sizes as far as groups allow, but no group of related images
  crosses train, validation and test. Groups are the connected components of "pixel-identical"
  (manifest ``sha256_pixels``) and of an optional user map ``image_id -> group`` (crops to source
  slides, overlapping fields).
- ``kfold``: repeated stratified k-fold; each fold's test part is one fold and its validation set
  is carved from the remaining folds. With a user group map, stratified *group* k-fold instead.

Every list of ids is sorted, so the JSON is stable. Splits depend on the set of rows, never on
their order: ids are sorted before any random draw. Nothing here writes to disk.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from allfuse.errors import AllfuseError, ConfigError, DataError, IntermediateError
from allfuse.files import PathLike, read_csv, read_table

logger = logging.getLogger(__name__)

PROTOCOLS = ("paper", "grouped", "kfold")
SUBSETS = ("train", "val", "test")
LABEL_NAMES = {0: "healthy", 1: "ALL"}

# Provenance strings recorded as "groups_source" in the split file.
SOURCE_PIXELS = "sha256_pixels"
SOURCE_PIXELS_AND_MAP = "sha256_pixels+groups_csv"


# ---------------------------------------------------------------------------------------------
# Groups of related images
# ---------------------------------------------------------------------------------------------


def pixel_groups(rows: list[dict]) -> dict[str, str]:
    """Map every image id to a group shared by all images with identical decoded pixels.

    The group is named after the smallest image id holding those pixels, so names do not depend
    on row order. Rows without a ``sha256_pixels`` value are their own group.
    """
    by_hash: dict[str, list[str]] = defaultdict(list)
    groups: dict[str, str] = {}
    for row in rows:
        image_id = str(row["image_id"])
        digest = str(row.get("sha256_pixels") or "").strip()
        if digest:
            by_hash[digest].append(image_id)
        else:
            groups[image_id] = image_id
    for members in by_hash.values():
        name = min(members)
        for image_id in members:
            groups[image_id] = name
    return groups


def read_groups_csv(path: PathLike, made_by: str | None = None) -> dict[str, str]:
    """Read a CSV with columns ``image_id,group`` (more columns are ignored).

    A user's file (``data.groups_csv``): ``AllfuseError`` naming the file when it is missing or
    lacks a column, ``DataError`` listing every row with an empty cell or an image given two
    different groups. A file rule ``made_by`` wrote (the demo's slide groups) is an intermediate:
    read whole by ``allfuse.files.read_table``, any fault one ``IntermediateError`` line.
    """
    path = Path(path)
    raw = read_table(path, made_by, ("image_id", "group")) if made_by else _user_groups_rows(path)
    groups: dict[str, str] = {}
    problems: list[str] = []
    for line_no, record in enumerate(raw, start=2):
        cells = {(k or "").strip().lstrip("\ufeff").strip(): (v or "").strip() for k, v in record.items()}
        image_id, group = cells.get("image_id", ""), cells.get("group", "")
        if not image_id or not group:
            problems.append(f"line {line_no}: empty image_id or group")
        elif groups.get(image_id, group) != group:
            problems.append(f"line {line_no}: {image_id} is in group {groups[image_id]!r} and in group {group!r}")
        else:
            groups[image_id] = group
    if problems and made_by:
        raise IntermediateError(path, made_by, "bad rows", problems)
    if problems:
        raise DataError(f"groups CSV {path} has {len(problems)} bad row(s); fix them", problems)
    return groups


def _user_groups_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a user's groups CSV, checked to exist, decode and name both columns."""
    if not path.is_file():
        raise AllfuseError(f"groups CSV not found: {path} (fix data.groups_csv in the config or set it to null)")
    try:
        raw = read_csv(path)
        with open(path, encoding="utf-8") as fh:
            header_line = fh.readline()
    except (OSError, UnicodeDecodeError) as exc:
        raise AllfuseError(f"groups CSV {path} cannot be read as UTF-8 text: {exc}") from None
    # A spreadsheet export may start with a byte-order mark and pad header cells with spaces.
    header = [h.strip().lstrip("\ufeff").strip() for h in next(csv.reader([header_line]), [])]
    missing = [c for c in ("image_id", "group") if c not in header]
    if missing:
        raise AllfuseError(
            f"groups CSV {path} lacks the column(s) {', '.join(missing)}: its header is {header_line.strip()!r}; "
            "it needs a header line 'image_id,group' and one row per image"
        )
    return raw


def merge_groups(ids: list[str], *maps: Mapping[str, str]) -> dict[str, str]:
    """Connected components of images related through any of ``maps``.

    Each map sends image ids to group labels; images sharing a label in one map are related, and
    relations chain across maps (A~B by hash and B~C by slide puts A, B, C in one group). Labels
    of different maps never meet, so a slide called "Im001" cannot join a hash group by name.
    A label that is itself an image id of ``ids`` joins that image: a crop-to-slide map written
    as ``ALL_IDB2/Im001_1 -> ALL_IDB1/Im009_1`` keeps the crop with its slide even when the
    slide has no row of its own. Images of ``ids`` that no map mentions are their own group; map
    entries for images not in ``ids`` are ignored with a warning. A component is named after its smallest image id, so the
    result depends only on the relations, not on the order of ids or the spelling of labels.
    """
    known = set(ids)
    parent: dict[str, str] = {i: i for i in known}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps chains short
            x = parent[x]
        return x

    def union(x: str, y: str) -> None:
        a, b = find(x), find(y)
        if a != b:
            parent[max(a, b)] = min(a, b)

    unknown: set[str] = set()
    for mapping in maps:
        first_of_label: dict[Any, str] = {}
        for image_id, label in mapping.items():
            if image_id not in known:
                unknown.add(image_id)
                continue
            anchor = first_of_label.setdefault(label, image_id)
            union(anchor, image_id)
        for label, anchor in first_of_label.items():
            if label in known:
                union(label, anchor)
    if unknown:
        example = ", ".join(sorted(unknown)[:3])
        logger.warning(
            "%d image id(s) of the group map are not in this dataset and are ignored (e.g. %s); ids look like %r",
            len(unknown),
            example,
            min(known) if known else "ALL_IDB1/Im001_1",
        )
    members: dict[str, list[str]] = defaultdict(list)
    for image_id in known:
        members[find(image_id)].append(image_id)
    return {image_id: min(group) for group in members.values() for image_id in group}


# ---------------------------------------------------------------------------------------------
# Making a split
# ---------------------------------------------------------------------------------------------


def make_split(
    rows: list[dict],
    *,
    dataset: str,
    protocol: str,
    seed: int,
    test_fraction: float,
    val_fraction: float,
    n_folds: int = 5,
    n_repeats: int = 1,
    groups: dict[str, str] | None = None,
) -> dict:
    """Split the images of one dataset's manifest rows; return the splits/{dataset}.json object.

    ``rows`` need ``image_id``, ``label`` (int), ``sha256_pixels`` and ``synthetic``. ``groups``
    is an optional user map ``image_id -> group`` (``read_groups_csv``): the ``grouped`` protocol
    merges it with identical-pixel groups; ``kfold`` turns into stratified group k-fold when it is
    given; ``paper`` ignores it. ``n_folds`` and ``n_repeats`` apply to ``kfold`` only (the other
    protocols record 1 and 1), ``test_fraction`` to ``paper`` and ``grouped`` only (``kfold``
    records null: its test part is one fold). Folds are numbered 0.. in the order
    repeat-major, so fold ``r * n_folds + k`` is fold ``k`` of repeat ``r``.

    Raises ``ConfigError`` for an unknown protocol or a bad fraction, ``DataError`` for unusable
    rows, and ``AllfuseError`` when a class has too few images (or groups) to split.
    """
    _check_settings(protocol, test_fraction, val_fraction, n_folds, n_repeats)
    ids, labels, synthetic = _prepare(rows, dataset)
    counts = Counter(labels.tolist())
    _check_class_counts(counts, dataset, protocol, n_folds)
    group_of, source = _split_groups(rows, ids, protocol, groups)

    context = f"dataset {dataset!r}, protocol {protocol}"
    folds = _folds(labels, ids, group_of, protocol, seed, test_fraction, val_fraction, n_folds, n_repeats, context)
    split: dict[str, Any] = {
        "dataset": dataset,
        "protocol": protocol,
        "seed": int(seed),
        "test_fraction": None if protocol == "kfold" else float(test_fraction),
        "val_fraction": float(val_fraction),
        "n_folds": int(n_folds) if protocol == "kfold" else 1,
        "n_repeats": int(n_repeats) if protocol == "kfold" else 1,
        "n_images": len(ids),
        "synthetic": synthetic,
        "groups_source": source,
        "folds": _fold_entries(folds, ids, labels, group_of, context),
    }
    if group_of is not None:
        split["groups"] = {i: group_of[i] for i in sorted(group_of)}
        split["n_groups"] = len(set(group_of.values()))
    return split


def fold_ids(split: Mapping[str, Any], fold: int) -> dict[str, list[str]]:
    """The train, val and test ids of fold number ``fold`` (the ``fold`` wildcard of every model path)."""
    folds = split.get("folds") or []
    for entry in folds:
        if entry.get("fold") == fold:
            return {name: list(entry[name]) for name in SUBSETS}
    available = [entry.get("fold") for entry in folds]
    shown = (
        f"folds {available[0]}-{available[-1]}"
        if len(available) > 1
        else f"fold {available[0] if available else 'none'}"
    )
    raise AllfuseError(
        f"fold {fold} was asked for, but the {split.get('protocol', '?')} split of dataset "
        f"{split.get('dataset', '?')!r} has {shown}; rerun make_splits (the split file is older than the config)"
        + (" (paper and grouped splits have fold 0 only)" if split.get("protocol") in ("paper", "grouped") else "")
    )


def split_summary(split: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> str:
    """A few log lines: images per subset and class for every fold, and leaks of identical pixels.

    The leak count is the number of identical-pixel groups whose images fall in more than one
    subset of a fold; the ``paper`` protocol can leak, ``grouped`` cannot.
    """
    rows = list(rows)
    label_of = {str(r["image_id"]): int(r["label"]) for r in rows}
    hash_of = {str(r["image_id"]): str(r.get("sha256_pixels") or "") for r in rows}
    head = (
        f"{split['dataset']}: {split['protocol']} split, seed {split['seed']}, {split['n_images']} images"
        + (f", {split['n_groups']} groups ({split['groups_source']})" if split.get("n_groups") is not None else "")
        + (" [synthetic data]" if split.get("synthetic") else "")
    )
    lines = [head]
    for entry in split["folds"]:
        parts = []
        where: dict[str, set[str]] = defaultdict(set)
        for name in SUBSETS:
            counts = Counter(label_of.get(i, -1) for i in entry[name])
            parts.append(f"{name} {len(entry[name])} ({_counts_text(counts)})")
            for image_id in entry[name]:
                if hash_of.get(image_id):
                    where[hash_of[image_id]].add(name)
        leaks = sum(1 for subsets in where.values() if len(subsets) > 1)
        lines.append(
            f"  fold {entry['fold']} (repeat {entry.get('repeat', 0)}): "
            + "; ".join(parts)
            + f"; identical-pixel groups across subsets: {leaks}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Internals
# ---------------------------------------------------------------------------------------------


def _check_settings(protocol: str, test_fraction: float, val_fraction: float, n_folds: int, n_repeats: int) -> None:
    """Raise ``ConfigError`` for an unknown protocol, a fraction outside (0, 1) or a bad k-fold."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"config key 'split.protocol' must be one of {list(PROTOCOLS)}, got {protocol!r}")
    for key, value in (("split.test_fraction", test_fraction), ("split.val_fraction", val_fraction)):
        if not 0 < value < 1:
            raise ConfigError(f"config key '{key}' must lie strictly between 0 and 1, got {value}")
    if protocol == "kfold" and (n_folds < 2 or n_repeats < 1):
        raise ConfigError(f"kfold needs split.n_folds >= 2 and split.n_repeats >= 1, got {n_folds} and {n_repeats}")


def _check_class_counts(counts: Mapping[int, int], dataset: str, protocol: str, n_folds: int) -> None:
    """Raise ``AllfuseError`` unless both classes have an image for every subset (and fold)."""
    if len(counts) < 2:
        raise AllfuseError(
            f"dataset {dataset!r} holds images of one class only ({_counts_text(counts)}); "
            "a classifier split needs both classes: check the archive and its labels"
        )
    need = max(3, n_folds) if protocol == "kfold" else 3
    if min(counts.values()) < need:
        raise AllfuseError(
            f"dataset {dataset!r} is too small for a stratified {protocol} split: it holds {_counts_text(counts)}, "
            f"and each class needs at least {need} images (one per train, validation and test"
            + (f" and one per each of the {n_folds} folds" if protocol == "kfold" else "")
            + "); use more images"
            + (" or fewer split.n_folds" if protocol == "kfold" else "")
        )


def _split_groups(
    rows: list[dict], ids: np.ndarray, protocol: str, groups: Mapping[str, str] | None
) -> tuple[dict[str, str] | None, str | None]:
    """The groups a split keeps together (image id -> group name) and their ``groups_source``.

    ``grouped`` always groups identical pixels, plus the user map when given; ``kfold`` groups
    only with a user map; ``paper`` never (None, None).
    """
    if protocol == "grouped":
        maps: list[Mapping[str, str]] = [pixel_groups(rows)]
        if groups:
            maps.append(groups)
        return merge_groups(list(ids), *maps), SOURCE_PIXELS_AND_MAP if groups else SOURCE_PIXELS
    if protocol == "kfold" and groups:
        return merge_groups(list(ids), pixel_groups(rows), groups), SOURCE_PIXELS_AND_MAP
    if groups:
        logger.info("split protocol %s ignores the group map (use protocol grouped or kfold)", protocol)
    return None, None


def _prepare(rows: Sequence[Mapping[str, Any]], dataset: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """Sorted ids (str array), their labels (int array) and whether any row is synthetic."""
    problems: list[str] = []
    seen: set[str] = set()
    records: list[tuple[str, int]] = []
    synthetic = False
    for n, row in enumerate(rows):
        image_id = str(row.get("image_id") or "").strip()
        if not image_id:
            problems.append(f"row {n}: empty image_id")
            continue
        if image_id in seen:
            problems.append(f"{image_id}: appears more than once")
            continue
        seen.add(image_id)
        try:
            label = int(row["label"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{image_id}: label {row.get('label')!r} is not an integer")
            continue
        records.append((image_id, label))
        synthetic = synthetic or _truthy(row.get("synthetic"))
    if problems:
        raise DataError(f"manifest rows of dataset {dataset!r} cannot be split; rebuild the manifest", problems)
    if not records:
        raise AllfuseError(f"dataset {dataset!r} has no images to split")
    records.sort()
    ids = np.array([r[0] for r in records], dtype=object)
    labels = np.array([r[1] for r in records], dtype=np.int64)
    return ids, labels, synthetic


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value) if value is not None else False


def _counts_text(counts: Mapping[int, int]) -> str:
    return ", ".join(f"{counts[c]} {LABEL_NAMES.get(c, f'class {c}')}" for c in sorted(counts)) or "no images"


def _derive(seed: int, *path: int) -> int:
    """A 32-bit seed for one step of a split, independent of the other steps' seeds."""
    return int(np.random.SeedSequence([seed % (1 << 63), *path]).generate_state(1)[0])


Parts = tuple[np.ndarray, np.ndarray, np.ndarray]


def _folds(
    labels: np.ndarray,
    ids: np.ndarray,
    group_of: Mapping[str, str] | None,
    protocol: str,
    seed: int,
    test_fraction: float,
    val_fraction: float,
    n_folds: int,
    n_repeats: int,
    context: str,
) -> list[tuple[int, Parts]]:
    """(repeat, (train, val, test) row indices) of every fold of the protocol.

    scikit-learn's refusals (too few members of a class, too few groups) become an
    ``AllfuseError`` saying what to change.
    """
    try:
        if protocol == "paper":
            return [_paper_fold(labels, seed, test_fraction, val_fraction)]
        if protocol == "grouped":
            assert group_of is not None
            g = np.array([group_of[i] for i in ids])
            return [_grouped_fold(labels, g, seed, test_fraction, val_fraction)]
        g = np.array([group_of[i] for i in ids]) if group_of else None
        return _kfold_folds(labels, g, seed, val_fraction, n_folds, n_repeats)
    except ValueError as exc:
        raise AllfuseError(
            f"{context}: cannot split {_counts_text(Counter(labels.tolist()))}: {exc}; use more images"
            + (", fewer split.n_folds" if protocol == "kfold" else ", a larger split.test_fraction")
            + (" or coarser groups" if group_of else "")
        ) from None


def _fold_entries(
    folds: Sequence[tuple[int, Parts]],
    ids: np.ndarray,
    labels: np.ndarray,
    group_of: Mapping[str, str] | None,
    context: str,
) -> list[dict[str, Any]]:
    """The split file's fold objects (number, repeat, sorted train / val / test ids), each checked."""
    entries = []
    for number, (repeat, parts) in enumerate(folds):
        entry: dict[str, Any] = {"fold": number, "repeat": repeat}
        entry.update({name: sorted(ids[idx].tolist()) for name, idx in zip(SUBSETS, parts, strict=True)})
        _verify_fold(entry, ids, labels, group_of, context)
        entries.append(entry)
    return entries


def _paper_fold(labels: np.ndarray, seed: int, test_fraction: float, val_fraction: float) -> tuple[int, Parts]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    # random_state = the config seed itself, so the test set equals scikit-learn's
    # train_test_split(ids_sorted, test_size=f, stratify=labels, random_state=seed).
    train, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed % (1 << 32))
    train, val = train_test_split(train, test_size=val_fraction, stratify=labels[train], random_state=_derive(seed, 1))
    return 0, (train, val, test)


def _grouped_fold(
    labels: np.ndarray, groups: np.ndarray, seed: int, test_fraction: float, val_fraction: float
) -> tuple[int, Parts]:
    idx = np.arange(len(labels))
    train, test = _group_holdout(idx, labels, groups, test_fraction, np.random.default_rng(_derive(seed, 0)))
    train, val = _group_holdout(train, labels, groups, val_fraction, np.random.default_rng(_derive(seed, 1)))
    return 0, (train, val, test)


def _kfold_folds(
    labels: np.ndarray, groups: np.ndarray | None, seed: int, val_fraction: float, n_folds: int, n_repeats: int
) -> list[tuple[int, Parts]]:
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split

    idx = np.arange(len(labels))
    folds: list[tuple[int, Parts]] = []
    for repeat in range(n_repeats):
        state = _derive(seed, 2, repeat)
        if groups is None:
            splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=state)
            pairs = splitter.split(idx, labels)
        else:
            # StratifiedGroupKFold shuffles groups of equal class spread only; a per-repeat seed
            # still gives each repeat its own partition.
            splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=state)
            pairs = splitter.split(idx, labels, groups)
        for k, (train, test) in enumerate(pairs):
            number = repeat * n_folds + k
            if groups is None:
                train, val = train_test_split(
                    train, test_size=val_fraction, stratify=labels[train], random_state=_derive(seed, 3, number)
                )
            else:
                train, val = _group_holdout(
                    train, labels, groups, val_fraction, np.random.default_rng(_derive(seed, 3, number))
                )
            folds.append((repeat, (train, val, test)))
    return folds


def _class_targets(labels: np.ndarray, n_held: int) -> dict[int, int]:
    """Images of each class in a held-out part of ``n_held``: proportional, largest remainder."""
    counts = Counter(labels.tolist())
    total = sum(counts.values())
    exact = {c: n_held * counts[c] / total for c in sorted(counts)}
    targets = {c: math.floor(v) for c, v in exact.items()}
    short = n_held - sum(targets.values())
    for c in sorted(exact, key=lambda c: (-(exact[c] - targets[c]), c))[:short]:
        targets[c] += 1
    return targets


def _group_holdout(
    idx: np.ndarray, labels: np.ndarray, groups: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (kept, held) with whole groups, held close to ``fraction`` per class.

    The held-out size follows scikit-learn's rounding (``ceil(fraction * len(idx))``), spread over
    classes in proportion. Groups are visited in a seeded random order and a group is held out
    when doing so brings the held-out class counts closer to their targets; with mostly small
    groups the targets are met exactly, with large groups as closely as they allow.
    """
    n_held = math.ceil(fraction * len(idx))  # exactly scikit-learn's test_size rounding
    targets = _class_targets(labels[idx], n_held)
    members: dict[str, list[int]] = defaultdict(list)
    for i in idx.tolist():
        members[str(groups[i])].append(i)
    names = sorted(members)
    gap = dict(targets)
    held: list[int] = []
    for j in rng.permutation(len(names)):
        group = members[names[j]]
        add = Counter(labels[group].tolist())
        before = sum(abs(v) for v in gap.values())
        after = sum(abs(gap[c] - add.get(c, 0)) for c in gap)
        if after < before:
            held.extend(group)
            for c in gap:
                gap[c] -= add.get(c, 0)
    held_set = set(held)
    kept = np.array([i for i in idx.tolist() if i not in held_set], dtype=np.int64)
    return kept, np.array(sorted(held), dtype=np.int64)


def _verify_fold(
    entry: Mapping[str, Any],
    ids: np.ndarray,
    labels: np.ndarray,
    group_of: Mapping[str, str] | None,
    context: str,
) -> None:
    """Check one fold: a partition of all images, every class in every subset, groups intact."""
    all_ids = [i for name in SUBSETS for i in entry[name]]
    if len(all_ids) != len(ids) or set(all_ids) != set(ids.tolist()):
        raise RuntimeError(
            f"{context}: fold {entry['fold']} is not a partition of the images (a bug in allfuse.splits)"
        )
    label_of = dict(zip(ids.tolist(), labels.tolist(), strict=True))
    classes = set(labels.tolist())
    for name in SUBSETS:
        present = {label_of[i] for i in entry[name]}
        if present != classes:
            missing = ", ".join(LABEL_NAMES.get(c, f"class {c}") for c in sorted(classes - present))
            raise AllfuseError(
                f"{context}, fold {entry['fold']}: the {name} part has no {missing} image "
                f"({len(entry[name])} images in it); the dataset is too small"
                + (" or its groups too large" if group_of else "")
                + " to split by class: use more images, larger fractions"
                + (" or fewer related-image groups" if group_of else "")
            )
    if group_of is not None:
        home: dict[str, str] = {}
        for name in SUBSETS:
            for image_id in entry[name]:
                if home.setdefault(group_of[image_id], name) != name:
                    raise RuntimeError(
                        f"{context}: group {group_of[image_id]} crosses subsets (a bug in allfuse.splits)"
                    )
