"""The predictor as an MLflow pyfunc model: what is registered, served and loaded by ``allfuse predict``.

Input: a DataFrame with one row per image and the columns

- ``image``: the bytes of an image file (JPEG, TIFF, PNG or BMP); over HTTP (``mlflow models
  serve``) a base64 string, which MLflow decodes because the signature types the column binary;
- ``pixels``: instead of ``image``, an RGB array (height, width, 3) of 0-255 integers (nested lists
  in JSON);
- ``image_id`` (optional): a name echoed in the output.

Output: one row per input row with :data:`allfuse.predictor.OUTPUT_COLUMNS`: ``p_all``, ``label``
(1 ALL, 0 healthy, -1 unreadable), ``predictive_entropy`` and ``mutual_information`` (nats),
``referred`` (to an expert), ``model_version`` and ``error`` (empty, or why the image could not
be read; the other rows are predicted all the same).

The model is saved "from code": MLflow runs :mod:`allfuse.pyfunc_entry` when it loads it, which
builds a :class:`PyfuncModel`; no pickled object is stored. The predictor folder travels as the
artifact ``predictor``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from allfuse.predictor import OUTPUT_COLUMNS, FusedEnsemble, predict_rows, prediction_threads, read_spec
from allfuse.session import configure_threads

#: The artifact key under which the predictor folder travels with the MLflow model.
ARTIFACT = "predictor"
#: The file MLflow runs to build the model (models from code).
ENTRY = Path(__file__).with_name("pyfunc_entry.py")


class PyfuncModel(mlflow.pyfunc.PythonModel):
    """The fused ensemble behind MLflow's pyfunc interface (see the module docstring)."""

    ensemble: FusedEnsemble | None = None

    def load_context(self, context: Any) -> None:
        folder = context.artifacts[ARTIFACT]
        # Before TensorFlow runs its first op: the thread count the run predicted with
        # (allfuse.predictor.prediction_threads), so a CPU reproduces the run's numbers.
        configure_threads(prediction_threads(read_spec(folder)))
        self.ensemble = FusedEnsemble.load(folder)

    # model_input typed as a DataFrame: MLflow then takes the signature from the model, not from
    # the type hint.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if self.ensemble is None:
            self.load_context(context)
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        rows = predict_rows(self.ensemble, frame.to_dict("records"))
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def predictor_folder(model_dir: str | Path) -> Path:
    """Where a saved pyfunc model keeps its predictor folder (MLflow names the copy itself)."""
    from mlflow.models import Model

    flavor = Model.load(str(model_dir)).flavors.get("python_function", {})
    entry = flavor.get("artifacts", {}).get(ARTIFACT, {})
    return Path(model_dir) / str(entry.get("path", f"artifacts/{ARTIFACT}"))


def signature() -> Any:
    """The model signature: optional ``image_id`` (string), ``image`` (binary) and ``pixels``
    (array of arrays of arrays of integers) in; the prediction columns out."""
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([
        ColSpec(DataType.string, "image_id", required=False),
        ColSpec(DataType.binary, "image", required=False),
        ColSpec(Array(Array(Array(DataType.long))), "pixels", required=False),
    ])  # fmt: skip
    types = {"image_id": DataType.string, "p_all": DataType.double, "label": DataType.long,
             "predictive_entropy": DataType.double, "mutual_information": DataType.double,
             "referred": DataType.boolean, "model_version": DataType.string, "error": DataType.string}  # fmt: skip
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(types[c], c) for c in OUTPUT_COLUMNS]))


@contextlib.contextmanager
def saving() -> Iterator[None]:
    """Around saving or logging the model: MLflow's advice to add an input example is left out
    on purpose (see :func:`model_arguments`), so its warning says nothing here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        yield


def model_arguments(folder: str | Path) -> dict[str, Any]:
    """What ``mlflow.pyfunc.save_model`` / ``log_model`` take for the predictor folder: the code
    entry, the folder as an artifact, the signature and the requirements.

    No input example is stored: MLflow would load every Keras model of the package once more to
    try it, and allfuse.packaging has already checked the predictor against the run's fused
    predictions; the input format is the module docstring's (and the README's).
    """
    return {"python_model": str(ENTRY), "artifacts": {ARTIFACT: str(folder)}, "signature": signature(),
            "pip_requirements": pip_requirements()}  # fmt: skip


def pip_requirements() -> list[str]:
    """What the served model imports, at the versions that packaged it (``--env-manager local``
    serves from the installed allfuse environment)."""
    from importlib import metadata

    names = ("mlflow", "keras", "tensorflow", "numpy", "pandas", "pillow", "scikit-learn")
    return [f"{name}=={metadata.version(name)}" for name in names]
