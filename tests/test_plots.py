"""Figures of one dataset: every file produced, non-empty, valid PNG, byte-identical on rerun."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from allfuse import evaluation as ev
from allfuse.errors import ConfigError
from allfuse.plots import PLOT_KINDS, _roc_points, plot_dataset, plot_roc
from test_evaluation import BACKBONES, ensemble_dir, fusion_dir, make_results, run_ensembles_and_fusion, split_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plots")
    make_results(root, datasets=("ALL_IDB2",))
    run_ensembles_and_fusion(root, datasets=("ALL_IDB2",))
    return root


def outputs(folder: Path) -> dict[str, Path]:
    return {kind: folder / f"{kind}.png" for kind in PLOT_KINDS}


def plot(results: Path, out: dict[str, Path]) -> list[str]:
    return plot_dataset(
        [ensemble_dir(results, "ALL_IDB2", b) / "predictions.csv" for b in BACKBONES],
        fusion_dir(results, "ALL_IDB2") / "predictions.csv",
        split_path(results, "ALL_IDB2"),
        dataset="ALL_IDB2", backbones=BACKBONES, outputs=out, ece_bins=10,
    )  # fmt: skip


def test_every_plot_is_written_non_empty_and_deterministic(results: Path, tmp_path: Path) -> None:
    first = outputs(tmp_path / "a")
    written = plot(results, first)
    assert written == [str(first[k]) for k in PLOT_KINDS]
    for path in first.values():
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
        assert b"Software" not in data  # no version stamp that would change between installs
    # No temporary file left beside the figures.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(f"{k}.png" for k in PLOT_KINDS)
    second = outputs(tmp_path / "b")
    plot(results, second)
    for kind in PLOT_KINDS:
        assert first[kind].read_bytes() == second[kind].read_bytes(), kind


def test_plot_outputs_must_name_every_kind(results: Path, tmp_path: Path) -> None:
    partial = outputs(tmp_path)
    del partial["roc"]
    with pytest.raises(ConfigError, match="missing \\['roc'\\]"):
        plot(results, partial)


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
    pred = ev.Predictions(
        image_id=np.array(["a", "b", "c"]),
        split=np.array(["test"] * 3),
        label=np.array([1, 1, 1]),
        probs=np.array([[0.2, 0.8], [0.4, 0.6], [0.7, 0.3]]),
    )
    path = tmp_path / "roc.png"
    plot_roc({"only ALL": pred}, path, "one class")
    assert path.read_bytes().startswith(PNG_SIGNATURE)
