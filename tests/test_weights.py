"""allfuse fetch-weights: the ImageNet weights a config needs, fetched into the Keras cache the
jobs read, checked against Keras' own hashes (or, where Keras has none, by loading them).

Nothing can be downloaded here: files come from a real HTTP server on 127.0.0.1 (python's
http.server in a subprocess) or a folder. The files Keras hashes cannot be made to match Keras'
hash, so the happy path serves stand-in files under the files' real names with their own MD5 in
the spec; the wrong-hash path serves them against Keras' real hashes.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from allfuse.cli import main
from allfuse.config import load_config_files
from allfuse.errors import WeightsError
from allfuse.settings import from_config
from allfuse.weights import fetch_weights, md5_file, needed_weights, weights_file

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(tmp_path):
    """A file server on 127.0.0.1 for tmp_path/served: its base URL, folder and request log."""
    folder, log = tmp_path / "served", tmp_path / "server.log"
    folder.mkdir()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory",
                                 str(folder)], stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
        try:
            port = re.search(r"port (\d+)", proc.stdout.readline()).group(1)
            yield SimpleNamespace(url=f"http://127.0.0.1:{port}", folder=folder, gets=lambda: log.read_text().count("GET"))
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def paper_files():
    return needed_weights(from_config(load_config_files([REPO / "config.yaml", REPO / "config.paper.yaml"])))


def stand_ins(folder: Path, files, size: int = 4096):
    """Write a stand-in for each file (distinct random bytes) and return the specs with its MD5."""
    out = []
    for i, wanted in enumerate(files):
        path = folder / wanted.name
        path.write_bytes(bytes((i * 31 + j * 7) % 256 for j in range(size)))
        out.append(dataclasses.replace(wanted, md5=md5_file(path)))
    return out


def test_the_paper_config_needs_the_three_no_top_files_with_keras_urls_and_hashes():
    files = {f.backbone: f for f in paper_files()}
    assert files["inceptionv3"].name == "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert files["efficientnetb3"].name == "efficientnetb3_notop.h5"
    assert files["mobilenetv2"].name == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    for f in files.values():
        assert f.url.startswith("https://storage.googleapis.com/") and f.url.endswith("/" + f.name)
    assert re.fullmatch(r"[0-9a-f]{32}", files["inceptionv3"].md5)
    assert re.fullmatch(r"[0-9a-f]{32}", files["efficientnetb3"].md5)
    assert files["mobilenetv2"].md5 is None  # Keras checks no hash for MobileNetV2's files
    # MobileNetV2 has files for five input sides; any other side loads the 224 px file.
    assert "_1.0_160_no_top" in weights_file("mobilenetv2", 160).name
    assert "_1.0_224_no_top" in weights_file("mobilenetv2", 100).name
    assert needed_weights(from_config(load_config_files([REPO / "config.yaml"]))) == []  # weights: null


@pytest.mark.slow
def test_the_hashes_are_the_ones_keras_checks():
    import inspect

    from keras.src.applications import efficientnet, inception_v3

    files = {f.backbone: f for f in paper_files()}
    assert files["efficientnetb3"].md5 == efficientnet.WEIGHTS_HASHES["b3"][1]
    source = inspect.getsource(inception_v3.InceptionV3)
    assert f'file_hash="{files["inceptionv3"].md5}"' in source
    assert inception_v3.WEIGHTS_PATH_NO_TOP == files["inceptionv3"].url


def test_fetch_from_a_server_checks_each_file_and_a_second_run_fetches_nothing(server, tmp_path):
    files = stand_ins(server.folder, [f for f in paper_files() if f.md5 is not None])
    cache, lines = tmp_path / "keras" / "models", []
    paths = fetch_weights(files, cache, server.url, report=lines.append)
    assert [p.name for p in paths] == [f.name for f in files]
    assert all((cache / f.name).read_bytes() == (server.folder / f.name).read_bytes() for f in files)
    assert len(lines) == 2 and all(f"fetched from {server.url}/" in line and "as Keras expects" in line for line in lines)
    assert server.gets() == 2
    again: list[str] = []
    fetch_weights(files, cache, server.url, report=again.append)
    assert all("already in" in line for line in again) and len(again) == 2
    assert server.gets() == 2  # nothing downloaded twice
    assert sorted(p.name for p in cache.iterdir()) == sorted(f.name for f in files)  # no partial files


def test_a_file_with_the_wrong_hash_is_refused_and_not_left_in_the_cache(server, tmp_path):
    wanted = weights_file("efficientnetb3", 300)  # Keras' real hash; the served file cannot match it
    (server.folder / wanted.name).write_bytes(b"not the weights")
    cache, lines = tmp_path / "models", []
    with pytest.raises(WeightsError, match="1 of 1 weights file"):
        fetch_weights([wanted], cache, server.url, report=lines.append)
    assert len(lines) == 1
    assert lines[0].startswith(f"{wanted.name}: refused: md5 ") and f"is not the {wanted.md5} Keras expects" in lines[0]
    assert list(cache.iterdir()) == []


def test_a_damaged_cached_copy_is_replaced_from_a_folder(tmp_path):
    source, cache = tmp_path / "mirror", tmp_path / "models"
    source.mkdir()
    (wanted,) = stand_ins(source, [weights_file("inceptionv3", 299)])
    cache.mkdir()
    (cache / wanted.name).write_bytes(b"truncated")
    lines: list[str] = []
    fetch_weights([wanted], cache, source, report=lines.append)
    assert (cache / wanted.name).read_bytes() == (source / wanted.name).read_bytes()
    assert f"fetched from {source / wanted.name}" in lines[0] and "replaced a cached copy that failed its check" in lines[0]


def test_an_unreachable_source_is_one_line_per_file_and_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("KERAS_HOME", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    (work / "config.yaml").write_text((REPO / "config.yaml").read_text())
    extra = tmp_path / "imagenet.yaml"
    extra.write_text(yaml.safe_dump({"backbones": {"efficientnetb3": {"weights": "imagenet"}}}))
    code = main(["fetch-weights", "--directory", str(work), "--configfile", str(extra), "--source", str(tmp_path / "none")])
    out, err = capsys.readouterr()
    assert code == 1
    assert out.splitlines() == [f"efficientnetb3_notop.h5: refused: cannot get it from {tmp_path / 'none' / 'efficientnetb3_notop.h5'} "
                                f"(No such file or directory); nothing of it is left in {work / '.keras' / 'models'}"]  # fmt: skip
    assert err.startswith("allfuse: error: 1 of 1 weights file(s) are not in")
    assert list((work / ".keras" / "models").iterdir()) == []


def mobilenet_weights(path: Path, side: int) -> Path:
    """A no-top MobileNetV2 weights file in the legacy .h5 layout Keras' own files have."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    model = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(side, side, 3))
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


@pytest.mark.slow
def test_cli_puts_mobilenet_weights_into_keras_home_checked_by_loading(tmp_path, monkeypatch, capsys):
    home, mirror = tmp_path / "keras_home", tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    wanted = weights_file("mobilenetv2", 96)
    mobilenet_weights(mirror / wanted.name, 96)
    (mirror / "broken.h5").write_bytes(b"not hdf5")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"backbones": {"mobilenetv2": {"input_size": 96, "weights": "imagenet"}}}))
    args = ["fetch-weights", "--directory", str(tmp_path), "--configfile", str(REPO / "config.yaml"), "--configfile",
            str(config), "--source", mirror.as_uri()]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.strip() == (f"{wanted.name}: fetched from {mirror.as_uri()}/{wanted.name} "
                           "(loads into mobilenetv2 (Keras publishes no hash for this file))")  # fmt: skip
    assert (home / "models" / wanted.name).read_bytes() == (mirror / wanted.name).read_bytes()
    assert main(args) == 0 and "already in" in capsys.readouterr().out
    lines: list[str] = []
    with pytest.raises(WeightsError):
        fetch_weights([dataclasses.replace(wanted, name="broken.h5")], home / "models", mirror, report=lines.append)
    assert "does not load into mobilenetv2" in lines[0] and not (home / "models" / "broken.h5").exists()
