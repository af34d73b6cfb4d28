"""Serving the text classifier: its predictor, signature and logging, and batch prediction.

:class:`TextClassifier` is a plain predictor: it loads a saved classifier folder
(safetensors weights, config with the label map, tokenizer) and predicts labels and class
probabilities. :func:`log_classifier` logs such a folder through :mod:`pipeline.modelstore`,
which serves the predictor as an MLflow pyfunc. Importing this module imports neither MLflow
nor torch, transformers or Prefect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipeline.cpu import set_cpu_threads

if TYPE_CHECKING:
    from pipeline.modelstore import Signature

TEXT_COLUMN = "text"
LABEL_COLUMN = "label"
PROB_PREFIX = "prob_"
DEFAULT_MAX_LENGTH = 128  # tokens, as TrainConfig.max_length
DEFAULT_BATCH_SIZE = 64
READERS = (".csv", ".jsonl")


class ServingInputError(ValueError):
    """A model folder, input file or input frame that cannot be served or predicted."""


class TextClassifier:
    """A saved sequence classifier that predicts labels and class probabilities.

    ``predict`` takes a DataFrame with a ``text`` column (or a list or Series of strings) and
    returns ``label`` plus one ``prob_<label>`` column per label, in the model's label order.
    """

    def __init__(self, model: Any, tokenizer: Any, max_length: int, batch_size: int):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        id2label = model.config.id2label
        self.labels = [id2label[i] for i in range(model.config.num_labels)]

    @classmethod
    def load(cls, folder: Path, config: dict[str, Any]) -> TextClassifier:
        """The classifier saved in ``folder``, on the GPU if there is one.

        Args:
            config: the logged model config: ``max_length`` (tokens) and ``batch_size``.
        """
        import torch
        from transformers.utils import logging as hf_logging

        from pipeline.finetune import load_saved_classifier

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per load is noise
        model, tokenizer = load_saved_classifier(Path(folder))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(
            model.to(device).eval(),
            tokenizer,
            int(config.get("max_length", DEFAULT_MAX_LENGTH)),
            int(config.get("batch_size", DEFAULT_BATCH_SIZE)),
        )

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Labels and class probabilities, one row per input text, in input order."""
        from pipeline.finetune import predict_proba  # batched, length-sorted, no grad

        texts, index = _texts_of(model_input)
        batch_size = int((params or {}).get("batch_size") or self.batch_size)
        probs = predict_proba(  # (N, num_labels), float32
            self.model, self.tokenizer, texts, batch_size, self.max_length, bf16=False
        )
        return probability_frame(probs, self.labels, index)


def probability_frame(probs: Any, labels: list[str], index: Any) -> pd.DataFrame:
    """A classifier's output: ``label`` (the argmax) and ``prob_<label>`` per class, on
    ``index`` (the input's, or a fresh range when None). ``probs``: (N, K)."""
    out = pd.DataFrame({LABEL_COLUMN: [labels[i] for i in probs.argmax(axis=1)]})
    for j, label in enumerate(labels):
        out[f"{PROB_PREFIX}{label}"] = probs[:, j]
    if index is not None:
        out.index = index
    return out


def column_values(model_input: Any, column: str, expected: str) -> tuple[list[Any], Any]:
    """The values of a DataFrame's ``column``, a Series or a list, and the index to keep.

    Raises:
        ServingInputError: a frame without ``column``, or another type (``expected`` says
            what would do).
    """
    if isinstance(model_input, pd.DataFrame):
        if column not in model_input.columns:
            found = ", ".join(map(str, model_input.columns)) or "no columns"
            raise ServingInputError(f"input has no '{column}' column; found: {found}")
        return model_input[column].tolist(), model_input.index
    if isinstance(model_input, pd.Series):
        return model_input.tolist(), model_input.index
    if isinstance(model_input, list | tuple):
        return list(model_input), None
    raise ServingInputError(f"expected {expected}; got {type(model_input).__name__}")


def _texts_of(model_input: Any) -> tuple[list[str], Any]:
    """The texts of a DataFrame (``text`` column), Series or list, and the index to keep."""
    expected = f"a DataFrame with a '{TEXT_COLUMN}' column, a Series or a list of strings"
    values, index = column_values(model_input, TEXT_COLUMN, expected)
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


def model_signature(labels: list[str]) -> Signature:
    """Input: a ``text`` string column; output: ``label`` and ``prob_<label>`` floats."""
    from pipeline.modelstore import Column, Param, Signature

    return Signature(
        inputs=(Column(TEXT_COLUMN, "string"),),
        outputs=(
            Column(LABEL_COLUMN, "string"),
            *(Column(f"{PROB_PREFIX}{label}", "float") for label in labels),
        ),
        params=(Param("batch_size", "long", DEFAULT_BATCH_SIZE),),
    )


def log_classifier(
    run_id: str,
    model_dir: Path,
    example_texts: list[str],
    max_length: int = DEFAULT_MAX_LENGTH,
) -> str:
    """Log a saved classifier folder to a run as a pyfunc model serving :class:`TextClassifier`.

    Args:
        model_dir: a folder written by ``pipeline.finetune.save_model``.
        example_texts: a few texts for the input example (the first two are stored).
        max_length: tokens per text at prediction time; longer texts are truncated.

    Returns:
        The model URI to register (``models:/<model_id>``).

    Raises:
        ServingInputError: the folder does not hold a servable classifier (see
            :func:`check_model_dir`).
    """
    from pipeline import modelstore

    model_dir = Path(model_dir)
    labels = check_model_dir(model_dir)
    return modelstore.log_model(
        run_id,
        model_dir,
        example=pd.DataFrame({TEXT_COLUMN: list(example_texts[:2])}),
        signature=model_signature(labels),
        predictor_class=TextClassifier,
        model_config={"max_length": max_length, "batch_size": DEFAULT_BATCH_SIZE},
        requirements=modelstore.pins("torch", "transformers"),
    )


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
    from pipeline import modelstore

    model = modelstore.load_model(model_uri)
    output_columns = model.output_columns or [LABEL_COLUMN]
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
