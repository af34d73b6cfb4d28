"""The model-logging adapter: log a saved model folder as an MLflow pyfunc, load a version.

Every kind of task logs the same way. Its model is a folder (weights, config, tokenizer or
processor) plus a plain predictor class with ``load(folder, config)`` and
``predict(model_input, params)``, e.g. :class:`pipeline.serving.TextClassifier`. MLflow
stores the folder as an artifact and a short entry file, written here, that wraps the
predictor class in :class:`ServedModel`: the model is logged "from code", nothing is
pickled, and the weights are read in ``load_context``. A new kind of task brings its own
predictor class and signature; this module does not change.

Loading a registered version goes one way, :func:`load_version`, for serving, smoke tests,
promotion and the flow's champion alike: what is evaluated is what is served.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

import mlflow.pyfunc
import pandas as pd  # already imported by mlflow.pyfunc

ARTIFACT_KEY = "model"  # the model folder inside the logged model's artifacts
ENTRY_FILE = "retune_model.py"
# The "models from code" entry point that MLflow stores with the model and runs on load.
ENTRY_POINT = '''"""MLflow entry point for a retune model, logged from code (no pickle)."""

import mlflow

from pipeline.modelstore import ServedModel
from {module} import {name}

mlflow.models.set_model(ServedModel({name}))
'''
# MLflow loads a "models from code" model through module-level globals: one load at a time
# per process (threads of one flow may promote at once).
_LOAD_LOCK = threading.Lock()


class Predictor(Protocol):
    """What a logged model serves, built from its saved folder by its class's ``load``."""

    @classmethod
    def load(cls, folder: Path, config: dict[str, Any]) -> Predictor:
        """The predictor of a saved model folder; ``config`` is the logged model config."""
        ...

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One output row per input row, in input order."""
        ...


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # an MLflow column type: string, float, double, long, boolean, binary


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    default: Any


@dataclass(frozen=True)
class Signature:
    """The served model's input columns, output columns and inference parameters."""

    inputs: tuple[Column, ...]
    outputs: tuple[Column, ...]
    params: tuple[Param, ...] = ()


class ServedModel(mlflow.pyfunc.PythonModel):
    """Any retune predictor behind MLflow's pyfunc interface.

    Holds only the predictor's class until ``load_context`` builds the predictor from the
    artifact folder and the model config the model was logged with.
    """

    def __init__(self, predictor_class: type[Predictor]):
        self.predictor_class = predictor_class

    def load_context(self, context: Any) -> None:
        self.folder = Path(context.artifacts[ARTIFACT_KEY])
        self.predictor = self.predictor_class.load(self.folder, dict(context.model_config or {}))

    # MLflow reads the hint on model_input: pd.DataFrame turns its type-hint validation off
    # (a union with list[str] would be refused); the signature checks the columns instead.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        return self.predictor.predict(model_input, params)


def log_model(
    run_id: str,
    model_dir: Path,
    example: pd.DataFrame,
    signature: Signature,
    predictor_class: type[Predictor],
    model_config: dict[str, Any],
    requirements: list[str],
) -> str:
    """Log a saved model folder to a run as a pyfunc model served by ``predictor_class``.

    The run need not be active in this thread. The ``pipeline`` package goes with the model
    (``code/pipeline``), so it loads where only the pinned requirements are installed.

    Args:
        example: one or two input rows, stored as the input example.
        model_config: what ``predictor_class.load`` receives as ``config`` (JSON values).
        requirements: the task's own pins (e.g. torch, transformers); mlflow and pandas,
            which every pyfunc needs, are pinned after them.

    Returns:
        The model URI to register (``models:/<model_id>``).
    """
    package_dir = Path(__file__).resolve().parent
    entry_point = ENTRY_POINT.format(
        module=predictor_class.__module__, name=predictor_class.__qualname__
    )
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        entry = Path(tmp) / ENTRY_FILE
        entry.write_text(entry_point, encoding="utf-8")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=entry,
            artifacts={ARTIFACT_KEY: str(model_dir)},
            model_config=model_config,
            code_paths=[str(package_dir)],
            signature=_mlflow_signature(signature),
            input_example=example,
            pip_requirements=[*requirements, *pins("mlflow", "pandas")],
        )
    return info.model_uri


def pins(*packages: str) -> list[str]:
    """``package==version`` as installed here, without a local tag (torch's ``+cpu``)."""
    return [f"{p}=={version(p).split('+')[0]}" for p in packages]


def _mlflow_signature(signature: Signature) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(c.type, c.name) for c in signature.inputs]),
        outputs=Schema([ColSpec(c.type, c.name) for c in signature.outputs]),
        params=ParamSchema([ParamSpec(p.name, p.type, p.default) for p in signature.params])
        if signature.params
        else None,
    )


@dataclass(frozen=True)
class LoadedModel:
    """A registered version loaded as it is served.

    ``predict`` goes through MLflow's pyfunc (the signature's schema is enforced, as when
    served); ``predictor`` is the plain predictor inside (e.g. a TextClassifier with its
    torch model and tokenizer).
    """

    uri: str
    predictor: Any
    output_columns: list[str]
    digest: str | None  # of the model folder, when a digest function was given
    _pyfunc: Any

    @property
    def input_example(self) -> Any | None:
        """The input example logged with the model (a frame of its input columns)."""
        return self._pyfunc.input_example

    def predict(self, frame: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return self._pyfunc.predict(frame, params=params)


Digest = Callable[[Path], str]  # a model folder -> its digest, e.g. lineage.folder_sha256


def load_version(
    name: str, version: str, work_dir: Path | None = None, digest: Digest | None = None
) -> LoadedModel:
    """``models:/NAME/VERSION`` loaded as served; see :func:`load_model`."""
    return load_model(f"models:/{name}/{version}", work_dir, digest)


def load_model(uri: str, work_dir: Path | None = None, digest: Digest | None = None) -> LoadedModel:
    """A logged or registered model (``models:/NAME/VERSION``, ``models:/NAME@alias``,
    ``models:/<model_id>``) loaded into memory as served.

    Its artifacts are downloaded into a temporary folder (under ``work_dir`` if given) that
    is removed once the weights are read: a tracking server's download would otherwise stay.
    MLflow must already point at the store that holds ``uri``.

    Args:
        digest: applied to the model folder before it is removed (e.g. a weights hash, the
            cache key of what depends only on the weights); kept as ``digest``.
    """
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="retune-model-", dir=work_dir) as local:
        with _LOAD_LOCK:
            model = mlflow.pyfunc.load_model(uri, dst_path=local)
        served = model.unwrap_python_model()
        digested = digest(served.folder) if digest is not None else None
    schema = model.metadata.get_output_schema()
    columns = [c.name for c in schema.inputs] if schema is not None else []
    return LoadedModel(uri, served.predictor, columns, digested, model)
