"""``allfuse predict``: a packaged predictor applied to image files, folders or ALL-IDB archives.

Inputs are gathered first (:func:`gather`): an image file is one image; a folder is every image
file under it (its name relative to the folder), unless it holds the ALL-IDB layout; an archive
(.zip, .tar, .tar.gz) or a folder with the ALL-IDB layout gives its images under their dataset ids
(``ALL_IDB2/Im001_1``, as the workflow's manifests name them). Unsafe archive members (links,
paths leaving the archive) and files too large for the pixel limit are listed, never read.

The model (:func:`load_model`) is a ``models:/<name>/<version|latest>`` or ``runs:/`` URI of a
tracking store, or a local model folder; it is loaded through MLflow's pyfunc interface, the
same code path as ``mlflow models serve``. Images go through it in chunks (a progress bar for
more than a handful); an unreadable image is reported with its reason and the others are
predicted all the same. The result is one row per image (allfuse.predictor.OUTPUT_COLUMNS).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from allfuse.errors import AllfuseError, DataError
from allfuse.predictor import OUTPUT_COLUMNS, PredictorSpec, read_spec

log = logging.getLogger(__name__)

#: File name endings read as images when a plain folder is given.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".tif", ".tiff", ".png", ".bmp")
#: Endings read as ALL-IDB archives.
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
#: Images per call of the model (each call runs every backbone on the chunk).
CHUNK = 16
#: More images than this get a progress bar.
PROGRESS_FROM = 8


@dataclass(frozen=True)
class InputImage:
    """One image to predict: its id, and a reader of its bytes (or why it cannot be read)."""

    image_id: str
    read: Callable[[], bytes] | None = None
    error: str = ""


# ---------------------------------------------------------------------------------------------
# Gathering inputs
# ---------------------------------------------------------------------------------------------


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _has_idb_layout(folder: Path) -> bool:
    from allfuse.settings import ARCHIVES

    return any((folder / name).is_dir() or (folder.name == name) for name in ARCHIVES)


def _from_archive(path: Path, stack: contextlib.ExitStack, max_bytes: int) -> list[InputImage]:
    """The images of an ALL-IDB archive (or extracted folder), under their dataset ids; unsafe
    members (allfuse.archive.member_problem) are listed, never read."""
    from allfuse.archive import member_problem, open_archive
    from allfuse.ingest import make_image_id, parse_image_name
    from allfuse.settings import ARCHIVES

    archive = stack.enter_context(open_archive(path))
    out = []
    for member in archive.members():
        parts = member.name.replace("\\", "/").split("/")
        which = next((a for a in ARCHIVES if a in parts[:-1]), None)
        if which is None or not parts[-1].lower().endswith(IMAGE_SUFFIXES) or "__MACOSX" in parts:
            continue
        try:
            number, label = parse_image_name(parts[-1])
            image_id = make_image_id(which, number, label)
        except ValueError:
            image_id = member.name
        if problem := member_problem(member):
            out.append(InputImage(image_id, error=f"{path}: {problem}"))
        elif member.kind != "file":
            continue
        elif member.size > max_bytes:
            out.append(InputImage(image_id, error=f"{member.name}: {member.size} bytes, too large for the pixel limit"))
        else:
            out.append(InputImage(image_id, read=lambda name=member.name: archive.read(name)))
    return out


def _from_file(path: Path, image_id: str, max_bytes: int) -> InputImage:
    try:
        size = path.stat().st_size
    except OSError as exc:
        return InputImage(image_id, error=f"{path}: cannot be read ({exc.strerror})")
    if size > max_bytes:
        return InputImage(image_id, error=f"{path}: {size} bytes, too large for the pixel limit")
    return InputImage(image_id, read=path.read_bytes)


def gather(paths: Sequence[str | os.PathLike[str]], stack: contextlib.ExitStack, max_pixels: int) -> list[InputImage]:
    """Every image the command-line inputs name, in order (see the module docstring). A missing
    path is an entry with its error; archives stay open until ``stack`` closes."""
    # An uncompressed RGB image of max_pixels takes 3 bytes a pixel; allow headroom for metadata.
    max_bytes = 4 * max_pixels + (1 << 20)
    out: list[InputImage] = []
    for given in paths:
        path = Path(given)
        if _is_archive(path) or (path.is_dir() and _has_idb_layout(path)):
            try:
                out.extend(_from_archive(path, stack, max_bytes))
            except DataError as exc:
                out.append(InputImage(str(path), error=str(exc).splitlines()[0]))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
            out.extend(_from_file(p, str(p), max_bytes) for p in found)
        elif path.exists():
            out.append(_from_file(path, str(path), max_bytes))
        else:
            out.append(InputImage(str(path), error=f"{path}: no such file or folder"))
    return out


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def tracking_uri(given: str | None) -> str:
    """The store ``models:/`` and ``runs:/`` URIs are looked up in: ``--tracking-uri``, else
    MLFLOW_TRACKING_URI, else the workflow's local store results/mlflow/mlflow.db."""
    from allfuse.tracking import resolve_uri

    return given or resolve_uri(None, Path("results") / "mlflow")


@contextlib.contextmanager
def no_bytecode() -> Iterator[None]:
    """No bytecode is written in the block. MLflow loads a packaged model by importing its entry
    file (models from code) where it lies: in a local model folder, or, for a ``models:/`` URI on a
    local store, in the registry's own artifact folder. Python would cache the compiled entry in a
    ``__pycache__`` beside it, so reading a model would change the model's files."""
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = before


def load_model(uri: str, store: str) -> tuple[Any, PredictorSpec]:
    """The pyfunc model at ``uri`` and its predictor spec; one AllfuseError naming the URI when it
    cannot be found or read, or was packaged by another allfuse version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from allfuse import serving
    from allfuse.tracking import fluent_store

    is_local = "://" not in uri and ":/" not in uri
    if is_local and not Path(uri).is_dir():
        raise AllfuseError(f"model {uri}: no such model folder; give a folder written by the package_model rule "
                           "(results/models/<dataset>/model) or a models:/ or runs:/ URI")  # fmt: skip
    if uri.startswith("sqlite:") or (not is_local and store.startswith("sqlite:///") and not Path(store[10:]).is_file()):
        raise AllfuseError(f"model {uri}: no tracking store at {store}; pass --tracking-uri or set MLFLOW_TRACKING_URI")
    try:
        with fluent_store(store), no_bytecode():
            local = uri if is_local else mlflow.artifacts.download_artifacts(artifact_uri=uri)
            spec = read_spec(serving.predictor_folder(local), where=uri)
            model = mlflow.pyfunc.load_model(local)
    except (MlflowException, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise AllfuseError(f"model {uri} cannot be loaded from {store if not is_local else 'disk'}: {reason}") from None
    return model, spec


# ---------------------------------------------------------------------------------------------
# Predicting
# ---------------------------------------------------------------------------------------------


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_images(model: Any, images: Sequence[InputImage], progress: bool = True) -> list[dict[str, Any]]:
    """One row per image (OUTPUT_COLUMNS), in order; unreadable images keep their error."""
    import pandas as pd
    from tqdm import tqdm

    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(images), unit="image", file=sys.stderr, disable=not progress or len(images) <= PROGRESS_FROM)
    with bar:
        for chunk in _chunks(images, CHUNK):
            frame, failed = [], {}
            for k, image in enumerate(chunk):
                data, error = None, image.error
                if not error and image.read is not None:
                    try:
                        data = image.read()
                    except (OSError, DataError) as exc:
                        error = str(exc).splitlines()[0]
                if error:
                    failed[k] = error
                frame.append({"image_id": image.image_id, "image": data})
            out = model.predict(pd.DataFrame(frame)).to_dict("records")
            for k, error in failed.items():
                out[k]["error"] = error
            rows.extend(out)
            bar.update(len(chunk))
    return rows


def summary(rows: Sequence[dict[str, Any]], model: str) -> str:
    """The last line of ``allfuse predict``: counts per outcome."""
    good = [r for r in rows if not r["error"]]
    n_all = sum(1 for r in good if r["label"] == 1)
    referred = sum(1 for r in good if r["referred"])
    text = (f"{len(good)} of {len(rows)} image(s) predicted with {model}: {n_all} ALL, {len(good) - n_all} healthy, "
            f"{referred} referred to an expert")  # fmt: skip
    bad = len(rows) - len(good)
    return text + (f"; {bad} could not be read (listed above)" if bad else "")


def write_rows(rows: Sequence[dict[str, Any]], out: str | None) -> None:
    """The rows as CSV: to ``out`` (written atomically), or to stdout for None or '-'."""
    import csv

    from allfuse.files import write_csv

    if out and out != "-":
        write_csv(out, rows, OUTPUT_COLUMNS)
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=list(OUTPUT_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
