"""Figures of one dataset: every file produced, non-empty, valid PNG, byte-identical on rerun."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from allfuse.errors import ConfigError, DataError
from allfuse.plots import PLOT_KINDS, _roc_points, plot_dataset, plot_roc
from allfuse.predictions import Predictions, load_fusion
from allfuse.stages import SplitFacts

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATASET = "ALL_IDB2"


def outputs(folder: Path) -> dict[str, Path]:
    return {kind: folder / f"{kind}.png" for kind in PLOT_KINDS}


def plot(tree, out: dict[str, Path], dataset: str = DATASET, split: SplitFacts | None = None, ensembles=None):
    """plot_dataset on the finished tree's ensembles and fusion of ``dataset``."""
    return plot_dataset(
        tree.ensembles(dataset) if ensembles is None else ensembles,
        load_fusion(tree.fusion_dir(dataset) / "run.json"),
        split or SplitFacts.read(tree.split(dataset)),
        outputs=out, ece_bins=10,
    )  # fmt: skip


def test_every_plot_is_written_non_empty_and_deterministic(finished_tree, tmp_path: Path) -> None:
    first = outputs(tmp_path / "a")
    written = plot(finished_tree, first)
    assert written == [str(first[k]) for k in PLOT_KINDS]
    for path in first.values():
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
        assert b"Software" not in data  # no version stamp that would change between installs
    # No temporary file left beside the figures.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(f"{k}.png" for k in PLOT_KINDS)
    second = outputs(tmp_path / "b")
    plot(finished_tree, second)
    for kind in PLOT_KINDS:
        assert first[kind].read_bytes() == second[kind].read_bytes(), kind
    # The figures show the data: another dataset's results draw other pictures.
    other = outputs(tmp_path / "c")
    plot(finished_tree, other, dataset="ALL_IDB1")
    assert first["confusion"].read_bytes() != other["confusion"].read_bytes()


def test_plot_titles_say_when_data_are_synthetic(finished_tree, tmp_path: Path) -> None:
    split = SplitFacts.read(finished_tree.split(DATASET))
    assert split.synthetic
    synthetic, real = outputs(tmp_path / "synthetic"), outputs(tmp_path / "real")
    plot(finished_tree, synthetic, split=split)
    plot(finished_tree, real, split=replace(split, synthetic=False))
    for kind in PLOT_KINDS:  # only the title differs
        assert synthetic[kind].read_bytes() != real[kind].read_bytes(), kind


def test_plot_outputs_must_name_every_kind(finished_tree, tmp_path: Path) -> None:
    partial = outputs(tmp_path)
    del partial["roc"]
    with pytest.raises(ConfigError, match="missing \\['roc'\\]"):
        plot(finished_tree, partial)
    extra = outputs(tmp_path) | {"pie": tmp_path / "pie.png"}
    with pytest.raises(ConfigError, match="unknown \\['pie'\\]"):
        plot(finished_tree, extra)
    assert not any(tmp_path.iterdir())


def test_ensembles_of_another_dataset_are_refused(finished_tree, tmp_path: Path) -> None:
    stray = [finished_tree.ensembles(DATASET)[0], finished_tree.ensembles("ALL_IDB1")[1]]
    with pytest.raises(DataError, match=f"plots of {DATASET} fold 0: ensembles of another dataset or fold \\(mobilenetv2\\)"):
        plot(finished_tree, outputs(tmp_path), ensembles=stray)
    assert not any(tmp_path.iterdir())


def test_roc_points_match_scikit_learn() -> None:
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 40)
    scores = np.round(rng.random(40), 1)  # many ties
    fpr, tpr = _roc_points(labels, scores)
    ref_fpr, ref_tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)


def test_roc_plot_of_a_single_class_test_set_still_renders(tmp_path: Path) -> None:
    pred = Predictions(
        image_id=np.array(["a", "b", "c"]),
        split=np.array(["test"] * 3),
        label=np.array([1, 1, 1]),
        probs=np.array([[0.2, 0.8], [0.4, 0.6], [0.7, 0.3]]),
    )
    path = tmp_path / "roc.png"
    plot_roc({"only ALL": pred}, path, "one class")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
