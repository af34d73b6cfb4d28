"""Serving: the fine-tuned classifier as an MLflow pyfunc model, and batch prediction on files.

The model is logged "from code": MLflow stores a three-line entry file that builds a
:class:`TextClassifier`, and the saved classifier folder (safetensors weights, config with
the label map, tokenizer) as an artifact. Nothing is pickled; the weights are read in
``load_context``. Importing this module imports MLflow (and with it pandas), but not torch,
transformers or Prefect.
"""

from __future__ import annotations

import json
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd  # already imported by mlflow.pyfunc

from pipeline.cpu import set_cpu_threads

ARTIFACT_KEY = "classifier"  # the classifier folder inside the logged model's artifacts
TEXT_COLUMN = "text"
LABEL_COLUMN = "label"
PROB_PREFIX = "prob_"
DEFAULT_MAX_LENGTH = 128  # tokens, as TrainConfig.max_length
DEFAULT_BATCH_SIZE = 64
READERS = (".csv", ".jsonl")

# The "models from code" entry point that MLflow stores with the model and runs on load.
ENTRY_POINT = '''"""MLflow entry point for retune's classifier, logged from code (no pickle)."""

import mlflow

from pipeline.serving import TextClassifier

mlflow.models.set_model(TextClassifier())
'''


class ServingInputError(ValueError):
    """A model folder, input file or input frame that cannot be served or predicted."""


class TextClassifier(mlflow.pyfunc.PythonModel):
    """A saved sequence classifier behind MLflow's pyfunc interface.

    The instance holds no weights until ``load_context`` reads them from the artifact folder.
    ``predict`` takes a DataFrame with a ``text`` column (or a list or Series of strings) and
    returns ``label`` plus one ``prob_<label>`` column per label, in the model's label order.
    """

    def load_context(self, context: Any) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        folder = context.artifacts[ARTIFACT_KEY]
        config = context.model_config or {}
        self.max_length = int(config.get("max_length", DEFAULT_MAX_LENGTH))
        self.batch_size = int(config.get("batch_size", DEFAULT_BATCH_SIZE))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        hf_logging.disable_progress_bar()  # one "Loading weights" bar per load is noise
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            folder, use_safetensors=True, trust_remote_code=False
        ).to(device)
        self.model.eval()
        id2label = self.model.config.id2label
        self.labels = [id2label[i] for i in range(self.model.config.num_labels)]

    # MLflow reads the hint on model_input: pd.DataFrame turns its type-hint validation off
    # (a union with list[str] would be refused). Called directly, a list or Series works too.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Labels and class probabilities, one row per input text, in input order."""
        from pipeline.finetune import predict_proba  # batched, length-sorted, no grad

        texts, index = _texts_of(model_input)
        batch_size = int((params or {}).get("batch_size") or self.batch_size)
        probs = predict_proba(  # (N, num_labels), float32
            self.model, self.tokenizer, texts, batch_size, self.max_length, bf16=False
        )
        out = pd.DataFrame({LABEL_COLUMN: [self.labels[i] for i in probs.argmax(axis=1)]})
        for j, label in enumerate(self.labels):
            out[f"{PROB_PREFIX}{label}"] = probs[:, j]
        if index is not None:
            out.index = index
        return out


def _texts_of(model_input: Any) -> tuple[list[str], Any]:
    """The texts of a DataFrame (``text`` column), Series or list, and the index to keep."""
    if isinstance(model_input, pd.DataFrame):
        if TEXT_COLUMN not in model_input.columns:
            found = ", ".join(map(str, model_input.columns)) or "no columns"
            raise ServingInputError(f"input has no '{TEXT_COLUMN}' column; found: {found}")
        values, index = model_input[TEXT_COLUMN].tolist(), model_input.index
    elif isinstance(model_input, pd.Series):
        values, index = model_input.tolist(), model_input.index
    elif isinstance(model_input, list | tuple):
        values, index = list(model_input), None
    else:
        raise ServingInputError(
            f"expected a DataFrame with a '{TEXT_COLUMN}' column, a Series or a list of "
            f"strings; got {type(model_input).__name__}"
        )
    bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
    if bad:
        shown = ", ".join(f"{i} ({type(values[i]).__name__})" for i in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ServingInputError(f"texts must be strings; not at positions {shown}{more}")
    return values, index


def check_model_dir(model_dir: Path) -> list[str]:
    """The labels of a saved classifier folder, after checking it holds safetensors weights.

    Raises:
        ServingInputError: the folder, its weights or its label map are missing, or it holds
            pickled (``.bin``/``.pt``/``.pkl``) weights.
    """
    if (model_dir / "adapter_config.json").is_file():
        raise ServingInputError(
            f"{model_dir} holds a PEFT adapter, not a full model; serve a merged model "
            "(train.lora_merge=true)"
        )
    if not (model_dir / "model.safetensors").is_file():
        raise ServingInputError(
            f"{model_dir} holds no model.safetensors; save it with pipeline.finetune.save_model"
        )
    pickled = sorted(
        p.name for p in model_dir.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".pkl"}
    )
    if pickled:
        raise ServingInputError(f"{model_dir} holds pickled files ({', '.join(pickled)}); remove")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ServingInputError(f"{model_dir} holds no config.json")
    id2label = json.loads(config_file.read_text(encoding="utf-8")).get("id2label") or {}
    if not id2label:
        raise ServingInputError(f"{config_file} has no id2label label map")
    return [id2label[str(i)] for i in range(len(id2label))]


def model_signature(labels: list[str]) -> Any:
    """Input: a ``text`` string column; output: ``label`` and ``prob_<label>`` floats."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    outputs = [ColSpec("string", LABEL_COLUMN)] + [
        ColSpec("float", f"{PROB_PREFIX}{label}") for label in labels
    ]
    return ModelSignature(
        inputs=Schema([ColSpec("string", TEXT_COLUMN)]),
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec("batch_size", "long", DEFAULT_BATCH_SIZE)]),
    )


def pip_requirements() -> list[str]:
    """Pinned versions of what the model needs at load time (torch without a local tag)."""
    return [
        f"torch=={version('torch').split('+')[0]}",
        f"transformers=={version('transformers')}",
        f"mlflow=={version('mlflow')}",
        f"pandas=={version('pandas')}",
    ]


def log_classifier(
    run_id: str,
    model_dir: Path,
    example_texts: list[str],
    max_length: int = DEFAULT_MAX_LENGTH,
) -> str:
    """Log a saved classifier folder to a run as a pyfunc model.

    The run need not be active in this thread. The ``pipeline`` package goes with the model
    (``code/pipeline``), so it loads where only the pinned requirements are installed.

    Args:
        model_dir: a folder written by ``pipeline.finetune.save_model``.
        example_texts: a few texts for the input example (the first two are stored).
        max_length: tokens per text at prediction time; longer texts are truncated.

    Returns:
        The model URI to register (``models:/<model_id>``).
    """
    model_dir = Path(model_dir)
    labels = check_model_dir(model_dir)
    package_dir = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        entry = Path(tmp) / "retune_classifier.py"
        entry.write_text(ENTRY_POINT, encoding="utf-8")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=entry,
            artifacts={ARTIFACT_KEY: str(model_dir)},
            model_config={"max_length": max_length, "batch_size": DEFAULT_BATCH_SIZE},
            code_paths=[str(package_dir)],
            signature=model_signature(labels),
            input_example=pd.DataFrame({TEXT_COLUMN: list(example_texts[:2])}),
            pip_requirements=pip_requirements(),
        )
    return info.model_uri


def read_table(path: Path, text_column: str) -> pd.DataFrame:
    """A CSV or JSONL file as read (CSV cells stay strings), checked for its text column.

    Raises:
        ServingInputError: missing or unreadable file, unknown suffix, missing text column,
            or texts that are not strings.
    """
    if not path.is_file():
        raise ServingInputError(f"input file {path} does not exist")
    if path.suffix.lower() not in READERS:
        raise ServingInputError(f"{path}: expected a {' or '.join(READERS)} file")
    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        else:
            frame = pd.read_json(
                path, lines=True, dtype=False, convert_dates=False, encoding="utf-8"
            )
    except pd.errors.EmptyDataError:
        raise ServingInputError(f"input file {path} is empty") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ServingInputError(f"cannot read {path}: {err}") from err
    if text_column not in frame.columns:
        found = ", ".join(map(str, frame.columns)) or "no columns"
        raise ServingInputError(
            f"column '{text_column}' missing in {path}; found: {found}. "
            "Pass the column that holds the text (--text-column)."
        )
    bad = [i for i, v in enumerate(frame[text_column]) if not isinstance(v, str)]
    if bad:
        rows = ", ".join(str(i + 1) for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise ServingInputError(f"{path}: column '{text_column}' is not text in rows {rows}")
    return frame


def write_table(frame: pd.DataFrame, out: Path) -> None:
    """Write CSV or JSONL by ``out``'s suffix."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".csv":
        frame.to_csv(out, index=False)
    else:
        frame.to_json(out, orient="records", lines=True, force_ascii=False)


def predict_file(
    model_uri: str,
    path: Path,
    out: Path,
    text_column: str = "text",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> int:
    """Predict every row of a CSV or JSONL file; write its rows plus ``label`` and ``prob_*``.

    Rows are predicted in length-sorted chunks of ``batch_size`` (less padding) and written
    in input order. MLflow must already point at the store that holds ``model_uri``.

    Returns:
        The number of rows written.

    Raises:
        ServingInputError: bad input (see :func:`read_table`), an output suffix other than
            .csv/.jsonl, ``out`` equal to ``path``, or input columns that the predictions
            would overwrite.
    """
    path, out = Path(path), Path(out)
    if out.suffix.lower() not in READERS:
        raise ServingInputError(f"output {out}: expected a {' or '.join(READERS)} file")
    if out.resolve() == path.resolve():
        raise ServingInputError(f"output {out} is the input file; write somewhere else")
    frame = read_table(path, text_column).reset_index(drop=True)
    set_cpu_threads()  # the cores this process may use, before the model's first forward
    with tempfile.TemporaryDirectory(prefix="retune-model-") as local:
        # Load from a copy that is removed afterwards: a server's download would otherwise stay.
        model = mlflow.pyfunc.load_model(model_uri, dst_path=local)
    schema = model.metadata.get_output_schema()
    output_columns = [c.name for c in schema.inputs] if schema is not None else [LABEL_COLUMN]
    clash = [c for c in output_columns if c in frame.columns]
    if clash:
        raise ServingInputError(
            f"{path} already has column(s) {', '.join(clash)}, which the predictions would "
            "overwrite; rename them first"
        )
    predictions = _predict_by_length(model, frame[text_column].tolist(), batch_size, progress)
    if predictions.empty:
        predictions = pd.DataFrame(columns=output_columns)
    write_table(pd.concat([frame, predictions], axis=1), out)
    return len(frame)


def _predict_by_length(
    model: Any, texts: list[str], batch_size: int, progress: bool
) -> pd.DataFrame:
    """Predictions in input order (RangeIndex), computed in chunks of similar length."""
    import numpy as np
    from tqdm.auto import tqdm

    order = np.argsort([len(t) for t in texts], kind="stable")
    parts: list[pd.DataFrame] = []
    with tqdm(total=len(texts), desc="predict", unit="row", disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            chunk = pd.DataFrame({TEXT_COLUMN: [texts[i] for i in idx]})
            parts.append(model.predict(chunk, params={"batch_size": batch_size}).set_axis(idx))
            bar.update(len(idx))
    return pd.concat(parts).sort_index() if parts else pd.DataFrame()


def download_classifier(name: str, version: str, dest: Path) -> Path:
    """The saved classifier folder of a registered version, downloaded under ``dest``.

    Returns the folder that :func:`pipeline.finetune.load_saved_classifier` reads.
    """
    root = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=str(dest)
        )
    )
    found = [
        p.parent for p in root.rglob("config.json") if (p.parent / "model.safetensors").is_file()
    ]
    if not found:
        raise ServingInputError(f"models:/{name}/{version} holds no saved classifier folder")
    return found[0]
