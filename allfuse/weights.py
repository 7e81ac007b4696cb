"""ImageNet weights a config needs, fetched into the Keras cache before any job runs.

Compute nodes often have no internet, and a job that finds its weights missing stops (Keras would
try to download them). ``allfuse fetch-weights`` runs on a machine that can download (a cluster's
login node) and puts every file the config's ``weights: imagenet`` backbones need into the Keras
cache the jobs will read (``$KERAS_HOME/models``, by default ``.keras/models`` in the workflow's
working directory: :func:`allfuse.session.keras_home_for`).

Which file, from where, and its hash are Keras' own, read from the source of
``keras.applications`` (without importing Keras, so no TensorFlow start): the file name and URL each
network's constructor downloads for ``include_top=False``, and the MD5 it checks the file against.
Keras publishes no hash for MobileNetV2's files; those are checked by loading them into the
network instead (which imports TensorFlow). A file that fails its check is refused with one line
and is not left in the cache. Files already in the cache and intact are left alone, so the
command can run again at any time.

The source defaults to Keras' own URLs; ``source`` may name a mirror (a base URL whose folder holds
the files by name, http, https or file) or a local folder holding them.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from allfuse.errors import WeightsError
from allfuse.settings import Settings

#: The keras.applications module of each backbone.
KERAS_MODULES = {"inceptionv3": "inception_v3", "efficientnetb3": "efficientnet", "mobilenetv2": "mobilenet_v2"}
#: Input sides MobileNetV2 has ImageNet weights for; any other input loads the 224 px file.
MOBILENET_ROWS = (96, 128, 160, 192, 224)


@dataclass(frozen=True)
class WeightsFile:
    """One weights file: its name in the Keras cache, Keras' URL for it, Keras' MD5 of it (None
    where Keras checks none), and the backbone and input size of a job that loads it."""

    name: str
    url: str
    md5: str | None
    backbone: str
    input_size: int


def keras_source(module: str) -> ast.Module:
    """The parsed source of ``keras/src/applications/<module>.py``, found without importing Keras."""
    spec = importlib.util.find_spec("keras")
    if spec is None or spec.origin is None:
        raise WeightsError("Keras is not installed: install the project first (see README, Quickstart)")
    path = Path(spec.origin).parent / "src" / "applications" / f"{module}.py"
    if not path.is_file():
        raise WeightsError(f"{path} not found: this Keras keeps keras.applications elsewhere; use a Keras 3 release")
    return ast.parse(path.read_text(encoding="utf-8"))


def _constants(tree: ast.Module) -> dict[str, object]:
    """The module's top-level assignments of literal values (strings, dicts of tuples)."""
    out: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError, SyntaxError):
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def _hash_in_call(tree: ast.Module, name: str) -> str | None:
    """The literal ``file_hash`` of the ``get_file`` call whose file name is ``name``, if any."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            if node.args[0].value == name:
                for kw in node.keywords:
                    if kw.arg == "file_hash" and isinstance(kw.value, ast.Constant):
                        return str(kw.value.value)
    return None


def weights_file(backbone: str, input_size: int) -> WeightsFile:
    """The no-top ImageNet weights file Keras loads for ``backbone`` at ``input_size`` pixels."""
    if backbone not in KERAS_MODULES:
        raise WeightsError(f"no ImageNet weights are known for backbone '{backbone}'")
    tree = keras_source(KERAS_MODULES[backbone])
    consts = _constants(tree)
    try:
        if backbone == "inceptionv3":
            url = str(consts["WEIGHTS_PATH_NO_TOP"])
            name = url.rsplit("/", 1)[-1]
            return WeightsFile(name, url, _hash_in_call(tree, name), backbone, input_size)
        if backbone == "efficientnetb3":
            name = "efficientnetb3_notop.h5"
            md5 = consts["WEIGHTS_HASHES"]["b3"][1]  # type: ignore[index]  # (with top, no top)
            return WeightsFile(name, f"{consts['BASE_WEIGHTS_PATH']}{name}", str(md5), backbone, input_size)
        rows = input_size if input_size in MOBILENET_ROWS else 224
        name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"
        return WeightsFile(name, f"{consts['BASE_WEIGHT_PATH']}{name}", None, backbone, input_size)
    except (KeyError, TypeError, IndexError) as exc:
        raise WeightsError(
            f"cannot read the {backbone} weights file's URL or hash from keras.applications ({exc!r}); "
            "this Keras release lays them out differently from the one allfuse was tested with"
        ) from None


def needed_weights(settings: Settings) -> list[WeightsFile]:
    """Every ImageNet weights file the config's backbones load (``weights: imagenet``), each once."""
    files: dict[str, WeightsFile] = {}
    for backbone in settings.backbones:
        hybrid = settings.hybrid(backbone)
        if hybrid.weights == "imagenet":
            wanted = weights_file(backbone, hybrid.input_size)
            files.setdefault(wanted.name, wanted)
    return list(files.values())


def md5_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_file(wanted: WeightsFile, path: Path) -> str:
    """How ``path`` was found to be the right file (a phrase for the report line); WeightsError
    when it is not: a hash other than Keras', or (no hash known) a file the network cannot load."""
    if wanted.md5 is not None:
        got = md5_file(path)
        if got != wanted.md5:
            raise WeightsError(f"md5 {got} is not the {wanted.md5} Keras expects")
        return f"md5 {got} as Keras expects"
    from allfuse.models import build_backbone

    try:
        build_backbone(wanted.backbone, wanted.input_size, str(path))
    except WeightsError:
        raise WeightsError(f"it does not load into {wanted.backbone} (Keras publishes no hash for this file)") from None
    return f"loads into {wanted.backbone} (Keras publishes no hash for this file)"


def source_of(wanted: WeightsFile, source: str | os.PathLike[str] | None) -> str:
    """Where to get ``wanted``: Keras' URL, ``<base URL>/<name>``, or ``<folder>/<name>``."""
    if source is None:
        return wanted.url
    text = os.fspath(source)
    if urllib.parse.urlsplit(text).scheme in ("http", "https", "file"):
        return f"{text.rstrip('/')}/{wanted.name}"
    return str(Path(text).expanduser().resolve() / wanted.name)


def _retrieve(origin: str, dest: Path, timeout: float = 60.0) -> None:
    """Copy a URL or a local file to ``dest``; WeightsError on failure."""
    try:
        if urllib.parse.urlsplit(origin).scheme in ("http", "https", "file"):
            with urllib.request.urlopen(origin, timeout=timeout) as response, open(dest, "wb") as out:  # noqa: S310
                shutil.copyfileobj(response, out, 1 << 20)
        else:
            shutil.copyfile(origin, dest)
    except (OSError, ValueError) as exc:  # urllib's URLError and HTTPError are OSErrors
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise WeightsError(f"cannot get it from {origin} ({reason})") from None


def _fetch_one(wanted: WeightsFile, cache: Path, source: str | os.PathLike[str] | None) -> str:
    """Make sure ``cache/<name>`` is the right file; what was done, as a phrase."""
    target = cache / wanted.name
    replaced = ""
    if target.is_file():
        try:
            return f"already in {cache} ({check_file(wanted, target)})"
        except WeightsError as exc:  # a damaged or foreign file would stop every job that loads it
            target.unlink()
            replaced = f"; replaced a cached copy that failed its check ({exc})"
    origin = source_of(wanted, source)
    # The temporary name ends like the real one: Keras picks the weights format by the suffix.
    fd, part = tempfile.mkstemp(prefix=".part-", suffix=f"-{wanted.name}", dir=cache)
    os.close(fd)
    try:
        _retrieve(origin, Path(part))
        how = check_file(wanted, Path(part))
        os.replace(part, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
    return f"fetched from {origin} ({how}){replaced}"


def fetch_weights(files: Iterable[WeightsFile], cache: str | os.PathLike[str], source: str | os.PathLike[str] | None = None,
                  report: Callable[[str], None] = print) -> list[Path]:  # fmt: skip
    """Put each file into the Keras cache folder ``cache`` (``<Keras home>/models``), checked, and
    report one line per file; return their paths.

    source: None (Keras' own URLs), a base URL (http, https, file) or a folder holding the files by
    name. A file already in the cache and intact is left alone. A file that fails its check, or
    cannot be got, is reported and not left in the cache; WeightsError at the end names how many.
    """
    folder = Path(cache)
    folder.mkdir(parents=True, exist_ok=True)
    wanted = list(files)
    refused = []
    for item in wanted:
        try:
            report(f"{item.name}: {_fetch_one(item, folder, source)}")
        except WeightsError as exc:
            report(f"{item.name}: refused: {exc}; nothing of it is left in {folder}")
            refused.append(item.name)
    if refused:
        raise WeightsError(f"{len(refused)} of {len(wanted)} weights file(s) are not in {folder}: {', '.join(refused)}")
    return [folder / item.name for item in wanted]
