"""Serving the image classifier: its predictor, signature and logging, and batch prediction.

:class:`ImageClassifierPredictor` is the predictor the logged MLflow model serves (see
:mod:`pipeline.modelstore`): its input frame has an ``image`` column, each value a file path
or the image's bytes in base64 (optionally a ``data:image/...;base64,`` URI), and its output
``label`` plus one ``prob_<label>`` column per class, as the text classifier's. An image is
read in any Pillow mode as training reads it (:func:`pipeline.images.read_rgb`), resized and
centre-cropped as evaluation does (:func:`pipeline.image_training.predict_proba`), so what is
served scores what was evaluated. Importing this module imports neither MLflow nor torch.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.serving import (
    LABEL_COLUMN,
    PROB_PREFIX,
    READERS,
    ServingInputError,
    column_values,
    probability_frame,
)

if TYPE_CHECKING:
    from pipeline.image_models import ImageClassifier, ImageSpec
    from pipeline.modelstore import Signature

IMAGE_COLUMN = "image"
DEFAULT_BATCH_SIZE = 64  # images per forward pass
EXAMPLE_SIDE = 64  # pixels: the longest side of an input-example image
_DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
_SHOWN = 60  # characters of a bad value quoted in an error


class ImageInputError(ServingInputError):
    """An input value that is not an image; ``row`` is its 0-based position in the input."""

    def __init__(self, row: int, reason: str):
        super().__init__(f"row {row}: {reason}")
        self.row, self.reason = row, reason


class ImageClassifierPredictor:
    """A saved image classifier that predicts labels and class probabilities.

    ``predict`` takes a DataFrame with an ``image`` column (or a list or Series of values),
    each a file path or base64 image bytes, and returns ``label`` plus one
    ``prob_<label>`` column per label, in the model's label order.
    """

    def __init__(self, model: ImageClassifier, spec: ImageSpec, batch_size: int):
        self.model, self.spec, self.batch_size = model, spec, batch_size
        self.labels = list(spec.labels)

    @classmethod
    def load(cls, folder: Path, config: dict[str, Any]) -> ImageClassifierPredictor:
        """The classifier saved in ``folder`` (:func:`pipeline.image_models.save_classifier`),
        on the GPU if there is one.

        Args:
            config: the logged model config: ``batch_size`` (images per forward pass).
        """
        import torch

        from pipeline.image_models import load_classifier

        # Built from config (no weight-loading bar); a MobileNetV2 needs no transformers.
        model, spec = load_classifier(Path(folder))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        batch_size = int(config.get("batch_size", DEFAULT_BATCH_SIZE))
        return cls(model.to(device).eval(), spec, batch_size)

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Labels and class probabilities, one row per input image, in input order.

        Raises:
            ServingInputError: no ``image`` column, or a value that is neither an image file
                nor base64 image bytes (its row named).
        """
        from pipeline.image_models import square_pixels
        from pipeline.image_training import predict_proba

        values, index = _images_of(model_input)
        batch_size = int((params or {}).get("batch_size") or self.batch_size)
        probs = np.empty((0, len(self.labels)))
        if values:
            images = [decode_image(v, row) for row, v in enumerate(values)]
            pixels = square_pixels(images, self.spec.size)  # (N, 3, S, S) uint8
            probs = predict_proba(self.model, pixels, self.spec, False, batch_size)  # (N, K)
        return probability_frame(probs, self.labels, index)


def _images_of(model_input: Any) -> tuple[list[Any], Any]:
    """The values of a DataFrame (``image`` column), Series or list, and the index to keep."""
    expected = (
        f"a DataFrame with an '{IMAGE_COLUMN}' column, a Series or a list of paths or base64 images"
    )
    return column_values(model_input, IMAGE_COLUMN, expected)


def decode_image(value: Any, row: int) -> np.ndarray:
    """One input value as (H, W, 3) uint8 RGB: an existing image file, else base64 bytes
    (a ``data:image/...;base64,`` prefix dropped, whitespace ignored).

    Raises:
        ImageInputError: missing or not a string, a file that does not decode, or a value
            that is neither an existing file nor base64 image bytes; ``row`` (0-based) named.
    """
    from pipeline.data import DataError
    from pipeline.images import read_rgb

    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise ImageInputError(row, f"no '{IMAGE_COLUMN}' (a missing value)")
    if not isinstance(value, str):
        raise ImageInputError(
            row,
            f"'{IMAGE_COLUMN}' must be a file path or base64 image bytes (a string); got "
            f"{type(value).__name__}",
        )
    uri = _DATA_URI.match(value)
    if uri is None and _is_file(value):
        try:
            return read_rgb(Path(value))
        except DataError as err:
            raise ImageInputError(row, str(err)) from err
    shown = repr(value if len(value) <= _SHOWN else f"{value[:_SHOWN]}...")
    try:
        data = base64.b64decode("".join(value[uri.end() if uri else 0 :].split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(
            row,
            f"{shown} is neither an existing image file nor base64-encoded image bytes; give a "
            "path readable where the model runs, or the file's bytes in base64",
        ) from None
    try:
        return rgb_from_bytes(data)
    except ServingInputError as err:
        what = "the data URI's" if uri else f"{shown} is not an existing file, and as base64 its"
        raise ImageInputError(row, f"{what} {err}") from None


def _is_file(value: str) -> bool:
    try:
        return Path(value).is_file()
    except (OSError, ValueError):  # a base64 string too long for a file name, a NUL
        return False


def rgb_from_bytes(data: bytes) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, TIFF...) as (H, W, 3) uint8 RGB, whatever the mode,
    as :func:`pipeline.images.read_rgb` reads a file.

    Raises:
        ServingInputError: the bytes do not decode as an image.
    """
    from PIL import Image, UnidentifiedImageError

    from pipeline.images import _to_rgb

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # Pillow's "cannot identify image file <_io.BytesIO object at 0x...>" names no file
        unknown = isinstance(err, UnidentifiedImageError)
        reason = "no image format Pillow reads" if unknown else f"{type(err).__name__}: {err}"
        raise ServingInputError(f"{len(data)} bytes do not decode as an image ({reason})") from err


def example_frame(paths: list[Path], max_side: int = EXAMPLE_SIDE) -> pd.DataFrame:
    """An input example: each image read as RGB, shrunk to at most ``max_side`` pixels a
    side and sent as base64 PNG bytes (a path would not exist where the model is served;
    a full-size scan would bloat the logged model)."""
    from PIL import Image

    from pipeline.images import read_rgb

    encoded = []
    for path in paths:
        image = Image.fromarray(read_rgb(Path(path)))
        image.thumbnail((max_side, max_side))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return pd.DataFrame({IMAGE_COLUMN: encoded})


def check_image_model_dir(model_dir: Path) -> ImageSpec:
    """The spec of a saved image classifier folder, after checking what it must hold.

    Raises:
        ServingInputError: no spec or safetensors weights, or pickled weights.
    """
    from pipeline.image_models import SPEC_FILE, WEIGHTS_FILE, ImageSpec

    for name in (SPEC_FILE, WEIGHTS_FILE):
        if not (model_dir / name).is_file():
            raise ServingInputError(
                f"{model_dir} holds no {name}; save it with pipeline.image_models.save_classifier"
            )
    pickled = sorted(
        p.name for p in model_dir.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl"}
    )
    if pickled:
        raise ServingInputError(f"{model_dir} holds pickled files ({', '.join(pickled)}); remove")
    spec = ImageSpec.load(model_dir)
    if not spec.labels:
        raise ServingInputError(f"{model_dir / SPEC_FILE} lists no labels")
    return spec


def image_signature(labels: list[str]) -> Signature:
    """Input: an ``image`` string column; output: ``label`` and ``prob_<label>`` doubles."""
    from pipeline.modelstore import Column, Param, Signature

    return Signature(
        inputs=(Column(IMAGE_COLUMN, "string"),),
        outputs=(
            Column(LABEL_COLUMN, "string"),
            *(Column(f"{PROB_PREFIX}{label}", "double") for label in labels),
        ),
        params=(Param("batch_size", "long", DEFAULT_BATCH_SIZE),),
    )


def log_image_classifier(run_id: str, model_dir: Path, example: pd.DataFrame) -> str:
    """Log a saved image classifier folder to a run as a pyfunc serving
    :class:`ImageClassifierPredictor`.

    Args:
        model_dir: a folder written by :func:`pipeline.image_models.save_classifier`.
        example: the input example, an ``image`` column (see :func:`example_frame`).

    Returns:
        The model URI to register (``models:/<model_id>``).

    Raises:
        ServingInputError: the folder does not hold a servable classifier (see
            :func:`check_image_model_dir`), or the example has no ``image`` column.
    """
    from pipeline import modelstore

    model_dir = Path(model_dir)
    spec = check_image_model_dir(model_dir)
    if list(example.columns) != [IMAGE_COLUMN]:
        found = ", ".join(map(str, example.columns)) or "no columns"
        raise ServingInputError(f"the input example must have one '{IMAGE_COLUMN}' column; {found}")
    packages = ["torch", "pillow", "safetensors"]
    if spec.architecture == "transformers":
        packages.append("transformers")
    return modelstore.log_model(
        run_id,
        model_dir,
        example=example,
        signature=image_signature(spec.labels),
        predictor_class=ImageClassifierPredictor,
        model_config={"batch_size": DEFAULT_BATCH_SIZE},
        requirements=modelstore.pins(*packages),
    )


# --- batch prediction ---------------------------------------------------------------------


def read_image_inputs(source: Path, path_column: str = "path") -> tuple[pd.DataFrame, Path]:
    """The images to predict: every image file under a folder (recursively, so
    ``root/<label>/*.png`` too) as a ``path`` column relative to it, or a CSV manifest's
    rows with its path column (relative to the manifest's folder, or absolute).

    Returns:
        The table (folder: path order; manifest: its rows, in order) and the root its paths
        are relative to.

    Raises:
        ServingInputError: no such folder or file, not a CSV, no images, no path column,
            or a listed image that does not exist (its row named).
    """
    from pipeline.images import IMAGE_SUFFIXES

    if source.is_dir():
        files = sorted(
            f for f in source.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise ServingInputError(
                f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)}) under it; give an "
                "image folder or a CSV manifest with a path column"
            )
        return pd.DataFrame({"path": [f.relative_to(source).as_posix() for f in files]}), source
    if not source.is_file():
        raise ServingInputError(f"input {source} does not exist")
    if source.suffix.lower() != ".csv":
        raise ServingInputError(
            f"{source}: an image classifier reads an image folder or a CSV manifest with a "
            f"'{path_column}' column"
        )
    try:
        table = pd.read_csv(source, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise ServingInputError(f"input file {source} is empty") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise ServingInputError(f"cannot read {source}: {err}") from err
    if path_column not in table.columns:
        found = ", ".join(map(str, table.columns)) or "no columns"
        raise ServingInputError(
            f"column '{path_column}' missing in {source}; found: {found}. "
            "Pass the column that holds the image paths (--path-column)."
        )
    if table.empty:
        raise ServingInputError(f"{source}: the manifest lists no images")
    root = source.parent
    absent = [(i, p) for i, p in enumerate(table[path_column]) if not (root / p).is_file()]
    if absent:
        row, path = absent[0]
        raise ServingInputError(
            f"{source} row {row + 2}: image {path!r} does not exist under {root} "
            f"({len(absent)} missing in all)"
        )
    return table, root


def predict_images(
    model_uri: str,
    source: Path,
    out: Path,
    path_column: str = "path",
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
) -> int:
    """Predict every image of a folder or CSV manifest (:func:`read_image_inputs`); write
    its rows (a folder: ``path``) plus ``label`` and ``prob_*``, in input order.

    Images are read and predicted ``batch_size`` at a time, through the served model (its
    signature enforced). MLflow must already point at the store that holds ``model_uri``.

    Returns:
        The number of rows written.

    Raises:
        ServingInputError: bad input, an output suffix other than .csv/.jsonl, ``out``
            equal to ``source``, input columns the predictions would overwrite, or an image
            that does not decode (named).
    """
    from tqdm.auto import tqdm

    from pipeline import modelstore
    from pipeline.cpu import set_cpu_threads
    from pipeline.serving import write_table

    source, out = Path(source), Path(out)
    if out.suffix.lower() not in READERS:
        raise ServingInputError(f"output {out}: expected a {' or '.join(READERS)} file")
    if out.resolve() == source.resolve():
        raise ServingInputError(f"output {out} is the input file; write somewhere else")
    table, root = read_image_inputs(source, path_column)
    set_cpu_threads()  # the cores this process may use, before the model's first forward
    model = modelstore.load_model(model_uri)
    output_columns = model.output_columns or [LABEL_COLUMN]
    clash = [c for c in output_columns if c in table.columns]
    if clash:
        raise ServingInputError(
            f"{source} already has column(s) {', '.join(clash)}, which the predictions would "
            "overwrite; rename them first"
        )
    files = [str((root / p).resolve()) for p in table[path_column]]
    parts: list[pd.DataFrame] = []
    with tqdm(total=len(files), desc="predict", unit="image", disable=not progress) as bar:
        for start in range(0, len(files), batch_size):
            chunk = pd.DataFrame({IMAGE_COLUMN: files[start : start + batch_size]})
            try:
                predicted = model.predict(chunk, params={"batch_size": batch_size})
            except ImageInputError as err:  # a row of the chunk -> its input row
                image = table[path_column].iloc[start + err.row]
                raise ServingInputError(f"{source}: image {image!r}: {err.reason}") from err
            parts.append(predicted.reset_index(drop=True))
            bar.update(len(chunk))
    predictions = pd.concat(parts, ignore_index=True)
    write_table(pd.concat([table.reset_index(drop=True), predictions], axis=1), out)
    return len(table)
