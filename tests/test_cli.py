"""The `allfuse` console script: version, inspect, make-demo-archives, error handling and exit codes."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import allfuse
from allfuse import cli, synthetic


def _console_script() -> list[str]:
    """The installed entry point when present (it is in the project's venv), else ``python -m``."""
    script = Path(sys.executable).with_name("allfuse")
    return [str(script)] if script.exists() else [sys.executable, "-m", "allfuse.cli"]


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"allfuse {allfuse.__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["inspect"],
        ["no-such-command"],
        ["inspect", "x.zip", "--max-pixels", "0"],
        ["make-demo-archives", "o", "--format", "rar"],
    ],
)
def test_argument_errors_exit_2(capsys, argv):
    assert cli.main(argv) == 2
    assert "usage: allfuse" in capsys.readouterr().err


def test_inspect_valid_archive(tmp_path, idb, capsys):
    src = tmp_path / "src"
    idb.make_tree(src, "ALL_IDB1")
    idb.make_tree(src, "ALL_IDB2", [(1, 1), (2, 1), (131, 0)])
    packed = idb.pack(src, tmp_path / "both.zip")
    assert cli.main(["inspect", str(packed)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert "ALL_IDB1: 4 images (2 ALL, 2 healthy)" in out
    assert "ALL_IDB2: 3 images (2 ALL, 1 healthy)" in out
    assert "official release has 260" in out  # the subset warning is shown, not fatal
    assert out.count("\nvalid") == 2

    assert cli.main(["inspect", str(packed), "--which", "ALL_IDB2"]) == 0
    assert "ALL_IDB1" not in capsys.readouterr().out


def test_inspect_reports_a_missing_dataset_folder(tmp_path, idb, capsys):
    src = tmp_path / "src"
    idb.make_tree(src, "ALL_IDB2", [(1, 1), (131, 0)])
    assert cli.main(["inspect", str(src), "--which", "ALL_IDB1"]) == 1
    assert "no ALL_IDB1 images found" in capsys.readouterr().err


def test_make_demo_archives_passes_seed_and_format(tmp_path, monkeypatch, capsys):
    calls = []

    def fake(out_dir, spec, fmt="zip"):
        calls.append((out_dir, spec, fmt))
        return {"ALL_IDB1": out_dir / "ALL_IDB1.zip", "ALL_IDB2": out_dir / "ALL_IDB2.zip", "groups": out_dir / "g.csv"}

    monkeypatch.setattr(synthetic, "make_demo_archives", fake)
    assert cli.main(["make-demo-archives", str(tmp_path), "--seed", "11", "--format", "tar"]) == 0
    assert cli.main(["make-demo-archives", str(tmp_path)]) == 0
    assert calls == [
        (tmp_path, synthetic.DemoSpec(seed=11), "tar.gz"),
        (tmp_path, synthetic.DemoSpec(), "zip"),
    ]
    assert "ALL_IDB2: " in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["zip", "dir"])
def test_demo_archives_pass_inspection_as_synthetic(tmp_path, monkeypatch, capsys, fmt):
    small = synthetic.DemoSpec(
        idb1_all=3, idb1_healthy=4, idb1_width=64, idb1_height=64, idb2_per_class=3, idb2_size=32
    )
    monkeypatch.setattr(synthetic, "DemoSpec", lambda seed=small.seed: replace(small, seed=seed))
    assert cli.main(["make-demo-archives", str(tmp_path), "--seed", "5", "--format", fmt]) == 0
    capsys.readouterr()
    for name in ("ALL_IDB1", "ALL_IDB2"):
        path = tmp_path / (name if fmt == "dir" else f"{name}.zip")
        assert cli.main(["inspect", str(path)]) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        assert f"{name}: " in out and "[synthetic]" in out and "seed 5" in out


def test_console_script_errors_have_no_traceback(tmp_path):
    missing = tmp_path / "absent.zip"
    result = subprocess.run([*_console_script(), "inspect", str(missing)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith(f"allfuse: error: {missing}: archive not found")
    assert "Traceback" not in result.stderr


def test_console_script_version_and_usage():
    version = subprocess.run([*_console_script(), "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"allfuse {allfuse.__version__}"
    usage = subprocess.run([*_console_script(), "inspect"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "ARCHIVE" in usage.stderr
