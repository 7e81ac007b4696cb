"""Splits: sizes, stratification, disjointness, coverage, determinism, groups, and clear errors."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter

import pytest

from allfuse.errors import AllfuseError, ConfigError, DataError
from allfuse.files import dumps_json
from allfuse.splits import (
    fold_ids,
    make_split,
    merge_groups,
    pixel_groups,
    read_groups_csv,
    split_summary,
)

SPLIT_KEYS = {
    "dataset",
    "protocol",
    "seed",
    "test_fraction",
    "val_fraction",
    "n_folds",
    "n_repeats",
    "n_images",
    "synthetic",
    "groups_source",
    "folds",
}


def fake_rows(n_all: int, n_healthy: int, archive: str = "ALL_IDB1", start: int = 1, synthetic: int = 1) -> list[dict]:
    """Manifest-like rows: the first ``n_all`` images are ALL (label 1), then healthy; unique pixels."""
    rows = []
    for k in range(n_all + n_healthy):
        label = 1 if k < n_all else 0
        number = start + k
        rows.append(
            {
                "image_id": f"{archive}/Im{number:03d}_{label}",
                "label": label,
                "sha256_pixels": f"{archive}-{number}",
                "synthetic": synthetic,
            }
        )
    return rows


def split_of(rows, protocol="paper", seed=42, **kw):
    kw.setdefault("test_fraction", 0.2)
    kw.setdefault("val_fraction", 0.2)
    return make_split(rows, dataset="ALL_IDB1", protocol=protocol, seed=seed, **kw)


def labels_of(rows):
    return {r["image_id"]: r["label"] for r in rows}


def assert_partition(split, rows):
    """Every fold: sorted lists, pairwise disjoint, together exactly the dataset's images."""
    every = sorted(r["image_id"] for r in rows)
    for entry in split["folds"]:
        for name in ("train", "val", "test"):
            assert entry[name] == sorted(entry[name]), f"{name} of fold {entry['fold']} is not sorted"
            assert entry[name], f"{name} of fold {entry['fold']} is empty"
        joined = entry["train"] + entry["val"] + entry["test"]
        assert sorted(joined) == every  # disjoint (no repeats) and complete


def assert_stratified(ids, rows, tolerance):
    """The class counts of ``ids`` are within ``tolerance`` images of the dataset's proportions."""
    label = labels_of(rows)
    total = Counter(label.values())
    got = Counter(label[i] for i in ids)
    for c, n in total.items():
        expected = len(ids) * n / len(rows)
        assert abs(got[c] - expected) <= tolerance, (c, got, expected)


# --------------------------------------------------------------------------------------------
# paper protocol
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_all", "n_healthy", "n_test"),
    [(49, 59, 22), (130, 130, 52), (49 + 130, 59 + 130, 74)],
    ids=["ALL_IDB1", "ALL_IDB2", "combined"],
)
def test_paper_test_sizes_match_the_papers_accuracies(n_all, n_healthy, n_test):
    rows = fake_rows(n_all, n_healthy)
    split = split_of(rows)
    (entry,) = split["folds"]
    assert len(entry["test"]) == n_test
    n_train_part = n_all + n_healthy - n_test
    assert len(entry["val"]) == math.ceil(0.2 * n_train_part)
    assert_partition(split, rows)
    for name in ("train", "val", "test"):
        assert_stratified(entry[name], rows, tolerance=1)


def test_paper_test_set_is_sklearn_train_test_split_of_sorted_ids():
    from sklearn.model_selection import train_test_split

    rows = fake_rows(20, 30)
    random.Random(3).shuffle(rows)
    ids = sorted(r["image_id"] for r in rows)
    y = [labels_of(rows)[i] for i in ids]
    _, expected_test = train_test_split(ids, test_size=0.2, stratify=y, random_state=7)
    assert split_of(rows, seed=7)["folds"][0]["test"] == sorted(expected_test)


def test_split_file_fields_follow_the_contract_and_serialise():
    rows = fake_rows(10, 12)
    split = split_of(rows)
    assert SPLIT_KEYS <= set(split)
    assert split["dataset"] == "ALL_IDB1" and split["protocol"] == "paper" and split["seed"] == 42
    assert split["n_images"] == 22 and split["n_folds"] == 1 and split["n_repeats"] == 1
    assert split["groups_source"] is None and "groups" not in split
    assert split["folds"][0]["fold"] == 0 and split["folds"][0]["repeat"] == 0
    assert '"protocol": "paper"' in dumps_json(split)


@pytest.mark.parametrize("flag", [1, "1", True, "true"])
def test_synthetic_is_set_when_any_row_is_synthetic(flag):
    rows = fake_rows(10, 10, synthetic=0)
    assert split_of(rows)["synthetic"] is False
    rows[5]["synthetic"] = flag
    assert split_of(rows)["synthetic"] is True


# --------------------------------------------------------------------------------------------
# determinism, seeds, every protocol
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["paper", "grouped", "kfold"])
def test_deterministic_for_a_seed_whatever_the_row_order(protocol):
    rows = fake_rows(30, 40)
    shuffled = list(rows)
    random.Random(1).shuffle(shuffled)
    assert split_of(rows, protocol) == split_of(shuffled, protocol)


@pytest.mark.parametrize("protocol", ["paper", "grouped", "kfold"])
def test_a_different_seed_gives_a_different_split(protocol):
    rows = fake_rows(30, 40)
    first, second = split_of(rows, protocol, seed=1), split_of(rows, protocol, seed=2)
    assert first["folds"][0]["test"] != second["folds"][0]["test"]
    assert first["folds"][0]["val"] != second["folds"][0]["val"]


@pytest.mark.parametrize("protocol", ["paper", "grouped", "kfold"])
def test_every_protocol_partitions_and_stratifies(protocol):
    rows = fake_rows(49, 59)
    split = split_of(rows, protocol)
    assert_partition(split, rows)
    for entry in split["folds"]:
        for name in ("train", "val", "test"):
            assert_stratified(entry[name], rows, tolerance=1.5)


# --------------------------------------------------------------------------------------------
# groups
# --------------------------------------------------------------------------------------------


def test_pixel_groups_join_identical_pixels_under_the_smallest_id():
    rows = fake_rows(3, 3)
    rows[5]["sha256_pixels"] = rows[1]["sha256_pixels"]
    rows[2]["sha256_pixels"] = ""
    groups = pixel_groups(list(reversed(rows)))
    assert groups[rows[5]["image_id"]] == groups[rows[1]["image_id"]] == rows[1]["image_id"]
    assert groups[rows[2]["image_id"]] == rows[2]["image_id"]
    assert len(set(groups.values())) == 5


def test_merge_groups_chains_across_maps_with_stable_names():
    ids = ["a", "b", "c", "d", "e"]
    by_hash = {"a": "h1", "b": "h1", "c": "h2", "d": "h3", "e": "h4"}
    by_slide = {"b": "slide", "c": "slide"}
    merged = merge_groups(ids, by_hash, by_slide)
    assert merged == {"a": "a", "b": "a", "c": "a", "d": "d", "e": "e"}
    # Neither the order of ids, nor the order of maps, nor the spelling of labels changes the names.
    assert merge_groups(list(reversed(ids)), {"c": "x", "b": "x"}, {"e": 1, "a": 9, "b": 9}) == merged


def test_merge_groups_keeps_label_namespaces_of_maps_apart():
    merged = merge_groups(["a", "b"], {"a": "g"}, {"b": "g"})
    assert merged["a"] != merged["b"]


def test_merge_groups_joins_an_image_named_as_a_group_label():
    ids = ["ALL_IDB1/Im009_1", "ALL_IDB2/Im001_1", "ALL_IDB2/Im002_1", "ALL_IDB2/Im003_1"]
    crops_to_slide = {"ALL_IDB2/Im001_1": "ALL_IDB1/Im009_1", "ALL_IDB2/Im002_1": "ALL_IDB1/Im009_1"}
    merged = merge_groups(ids, crops_to_slide)
    assert merged[ids[0]] == merged[ids[1]] == merged[ids[2]] == ids[0]
    assert merged[ids[3]] == ids[3]


def test_merge_groups_ignores_and_reports_unknown_ids(caplog):
    with caplog.at_level(logging.WARNING, logger="allfuse.splits"):
        merged = merge_groups(["a", "b"], {"a": "s", "zzz": "s", "b": "s"})
    assert merged == {"a": "a", "b": "a"}
    assert "zzz" in caplog.text and "ignored" in caplog.text


def test_grouped_keeps_chained_groups_together_and_records_them(caplog):
    rows = fake_rows(20, 25)
    a, b, c = rows[0]["image_id"], rows[1]["image_id"], rows[30]["image_id"]
    rows[1]["sha256_pixels"] = rows[0]["sha256_pixels"]  # a ~ b by identical pixels
    user = {b: "slide7", c: "slide7", "ALL_IDB2/Im999_0": "slide7"}  # b ~ c by the user map
    with caplog.at_level(logging.WARNING, logger="allfuse.splits"):
        splits = [split_of(rows, "grouped", seed=s, groups=user) for s in range(12)]
    assert "ALL_IDB2/Im999_0" in caplog.text
    for split in splits:
        assert_partition(split, rows)
        assert split["groups"][a] == split["groups"][b] == split["groups"][c]
        assert set(split["groups"]) == {r["image_id"] for r in rows}
        assert split["groups_source"] == "sha256_pixels+groups_csv"
        assert split["n_groups"] == len(rows) - 2
        (entry,) = split["folds"]
        homes = {name for name in ("train", "val", "test") for i in (a, b, c) if i in entry[name]}
        assert len(homes) == 1
    # Over several seeds the trio lands in more than one subset: groups are not pinned anywhere.
    assert len({next(n for n in ("train", "val", "test") if a in s["folds"][0][n]) for s in splits}) > 1


def test_grouped_without_user_map_uses_identical_pixels():
    rows = fake_rows(20, 25)
    rows[-1]["sha256_pixels"] = rows[-10]["sha256_pixels"]
    split = split_of(rows, "grouped")
    assert split["groups_source"] == "sha256_pixels"
    assert split["groups"][rows[-1]["image_id"]] == rows[-10]["image_id"]
    assert "identical-pixel groups across subsets: 0" in split_summary(split, rows)


def test_grouped_with_crops_of_slides_stays_near_the_target_sizes():
    """Combined-like data: every crop shares a group with its source slide (groups of 2-6 images)."""
    slides = fake_rows(49, 59)
    crops = fake_rows(130, 130, archive="ALL_IDB2")
    rng = random.Random(0)
    ill = [s["image_id"] for s in slides if s["label"] == 1]
    well = [s["image_id"] for s in slides if s["label"] == 0]
    user = {s["image_id"]: s["image_id"] for s in slides}
    for crop in crops:
        user[crop["image_id"]] = rng.choice(ill if crop["label"] == 1 else well)
    rows = slides + crops
    split = make_split(
        rows, dataset="combined", protocol="grouped", seed=5, test_fraction=0.2, val_fraction=0.2, groups=user
    )
    assert_partition(split, rows)
    entry = split["folds"][0]
    assert abs(len(entry["test"]) - 74) <= 4
    assert_stratified(entry["test"], rows, tolerance=4)
    group_home = {}
    for name in ("train", "val", "test"):
        for i in entry[name]:
            assert group_home.setdefault(split["groups"][i], name) == name


def test_paper_ignores_groups_and_summary_reports_leaks():
    rows = fake_rows(30, 30)
    for k in range(30):  # many identical pairs: some must straddle a random split
        rows[30 + k]["sha256_pixels"] = "dup"
        rows[30 + k]["label"] = 0
    split = split_of(rows, "paper", groups={rows[0]["image_id"]: "x"})
    assert "groups" not in split
    summary = split_summary(split, rows)
    assert "identical-pixel groups across subsets: 1" in summary
    assert "ALL_IDB1: paper split, seed 42, 60 images" in summary


# --------------------------------------------------------------------------------------------
# kfold
# --------------------------------------------------------------------------------------------


def test_kfold_each_repeat_tests_every_image_once():
    rows = fake_rows(20, 30)
    split = split_of(rows, "kfold", n_folds=4, n_repeats=3)
    assert split["n_folds"] == 4 and split["n_repeats"] == 3 and split["test_fraction"] is None
    assert [e["fold"] for e in split["folds"]] == list(range(12))
    assert [e["repeat"] for e in split["folds"]] == [r for r in range(3) for _ in range(4)]
    assert_partition(split, rows)
    every = sorted(r["image_id"] for r in rows)
    tests_by_repeat = []
    for r in range(3):
        tests = [i for e in split["folds"] if e["repeat"] == r for i in e["test"]]
        assert sorted(tests) == every
        tests_by_repeat.append(split["folds"][r * 4]["test"])
    assert len({tuple(t) for t in tests_by_repeat}) == 3  # repeats reshuffle


def test_kfold_with_groups_keeps_groups_in_one_subset():
    rows = fake_rows(30, 30)
    user = {rows[k]["image_id"]: f"slide{k // 3}" for k in range(60)}  # groups of three, one class each
    split = split_of(rows, "kfold", n_folds=5, groups=user)
    assert split["groups_source"] == "sha256_pixels+groups_csv" and split["n_groups"] == 20
    assert_partition(split, rows)
    for entry in split["folds"]:
        home = {}
        for name in ("train", "val", "test"):
            for i in entry[name]:
                assert home.setdefault(split["groups"][i], name) == name


def test_kfold_without_groups_is_plain():
    split = split_of(fake_rows(20, 20), "kfold")
    assert split["groups_source"] is None and "groups" not in split


# --------------------------------------------------------------------------------------------
# fold_ids, errors
# --------------------------------------------------------------------------------------------


def test_fold_ids_returns_lists_and_refuses_a_missing_fold():
    split = split_of(fake_rows(20, 20), "kfold", n_folds=3, n_repeats=2)
    parts = fold_ids(split, 4)
    assert parts == {name: split["folds"][4][name] for name in ("train", "val", "test")}
    with pytest.raises(AllfuseError, match=r"fold 6 was asked for.*folds 0-5"):
        fold_ids(split, 6)
    with pytest.raises(AllfuseError, match=r"fold 0 only"):
        fold_ids(split_of(fake_rows(20, 20)), 1)


@pytest.mark.parametrize("protocol", ["paper", "grouped", "kfold"])
def test_too_few_images_of_a_class_is_a_clear_error(protocol):
    with pytest.raises(AllfuseError, match=r"too small.*1 ALL"):
        split_of(fake_rows(1, 20), protocol)


def test_kfold_needs_as_many_images_per_class_as_folds():
    with pytest.raises(AllfuseError, match=r"at least 5 images.*split\.n_folds"):
        split_of(fake_rows(4, 20), "kfold", n_folds=5)


def test_one_class_only_is_a_clear_error():
    with pytest.raises(AllfuseError, match="one class"):
        split_of(fake_rows(0, 20))


def test_rounding_that_leaves_a_subset_without_a_class_is_a_clear_error():
    # 3 + 3 images: the test part holds 2, the training part 4, its validation part only 1 image.
    with pytest.raises(AllfuseError, match=r"cannot split 3 healthy, 3 ALL"):
        split_of(fake_rows(3, 3))


def test_groups_too_large_to_stratify_is_a_clear_error():
    rows = fake_rows(10, 10)
    user = {r["image_id"]: "one_slide" for r in rows if r["label"] == 1}  # all ALL images together
    with pytest.raises(AllfuseError, match=r"has no ALL image.*groups too large"):
        split_of(rows, "grouped", groups=user)


def test_bad_rows_are_listed():
    rows = fake_rows(5, 5)
    rows.append(dict(rows[0]))
    rows.append({"image_id": "ALL_IDB1/Im099_0", "label": "x", "sha256_pixels": "", "synthetic": 0})
    with pytest.raises(DataError) as info:
        split_of(rows)
    assert len(info.value.problems) == 2
    assert "ALL_IDB1/Im001_1: appears more than once" in str(info.value)


def test_unknown_protocol_is_a_config_error():
    with pytest.raises(ConfigError, match="split.protocol"):
        split_of(fake_rows(10, 10), "random")


# --------------------------------------------------------------------------------------------
# groups CSV
# --------------------------------------------------------------------------------------------


def test_read_groups_csv(tmp_path):
    path = tmp_path / "groups.csv"
    path.write_text(
        "\ufeffimage_id, group ,note\nALL_IDB1/Im009_1,s9,x\nALL_IDB2/Im001_1,s9,\n" "ALL_IDB1/Im009_1,s9,again\n",
        encoding="utf-8",
    )
    assert read_groups_csv(path) == {"ALL_IDB1/Im009_1": "s9", "ALL_IDB2/Im001_1": "s9"}


def test_groups_csv_without_a_column_names_the_file(tmp_path):
    path = tmp_path / "slides.csv"
    path.write_text("image,slide\nALL_IDB1/Im009_1,s9\n", encoding="utf-8")
    with pytest.raises(AllfuseError, match=r"slides\.csv lacks the column\(s\) image_id, group"):
        read_groups_csv(path)


def test_groups_csv_missing_file_and_bad_rows(tmp_path):
    with pytest.raises(AllfuseError, match=r"groups CSV not found: .*nope\.csv.*data\.groups_csv"):
        read_groups_csv(tmp_path / "nope.csv")
    path = tmp_path / "groups.csv"
    path.write_text("image_id,group\nA,1\nA,2\n,3\nB,\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_groups_csv(path)
    assert len(info.value.problems) == 3 and "groups.csv" in str(info.value)
