"""Image classification from an ImageNet-pretrained backbone, the third kind behind the seam.

What is its own (everything else is shared, see :mod:`pipeline.tasks.base`):
- data: an image folder (``root/<label>/*.png``) or a CSV manifest (``path,label`` and any
  metadata: patient id, site, scanner), read and described per image
  (:mod:`pipeline.images`); the images are copied under ``data/<name>/images/`` with the
  split tables, and split by ``data.group_column`` (a patient's images stay in one split).
  The GX checks of the described manifest (:func:`pipeline.validation.validate_images`).
- the model: MobileNetV2 (offline) or any ``AutoModelForImageClassification`` with a new
  head (:mod:`pipeline.image_models`), tuned by :mod:`pipeline.image_training`.
- task metrics: accuracy, macro-F1, per-class precision, recall, specificity, ROC-AUC,
  calibration (:func:`pipeline.evaluate.scored_metrics`), a confusion plot; the base's
  logistic probe on frozen pooled features is the baseline.
- forgetting: linear probes on digits and faces, and the agreement of the base's ImageNet
  head on photographs (:mod:`pipeline.image_retention`); bias: per-group metrics on
  ``data.identity_column`` (a site, a sex, an age band), none without one.
- serving: an MLflow model reading image paths or base64 bytes
  (:mod:`pipeline.image_serving`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import (
    bias,
    cache,
    data,
    evaluate,
    fairness,
    forgetting,
    identity,
    lineage,
    promotion,
    retention,
)
from pipeline.config import IMAGE_CLASSIFICATION, RetuneConfig
from pipeline.tasks.base import (
    Baseline,
    Champion,
    Evaluation,
    Frames,
    Retention,
    Trained,
    load_champion,
)

INPUT = (("image", "string"),)
IMAGES = "images"  # the folder inside data/<name>/ that holds the copied images
EXAMPLE_SOURCE_NOTE = "example: dataset-fashion-mnist (Debian) train-images-idx3-ubyte.gz"
_INT_COLUMNS = ("channels", "width", "height")


# --- data --------------------------------------------------------------------------------


def dataset_folder(config: RetuneConfig, project_dir: Path) -> Path:
    return project_dir / config.data.data_dir / data.dataset_name(config.data)


def source_of(config: RetuneConfig, project_dir: Path) -> tuple[Path, str]:
    """The folder or manifest to read, and what the manifest records as its source."""
    from pipeline.images import write_fashion_mnist

    cfg = config.data
    if cfg.source == data.EXAMPLE_SOURCE:
        per_class = config.image.example_per_class
        folder = project_dir / config.forgetting.cache_dir / "examples"
        path = write_fashion_mnist(folder / f"fashion-mnist-{per_class}", cfg.labels, per_class)
        return path, f"{EXAMPLE_SOURCE_NOTE}, the first {per_class} images per class"
    path = data.source_path(cfg.source, project_dir)
    return path, data.describe_source(cfg, project_dir)


def _metadata(table: pd.DataFrame, config: RetuneConfig, source: Path) -> pd.DataFrame:
    """``group`` (the group column, else each image its own) and ``identity``."""
    cfg = config.data
    for key, column in (
        ("group_column", cfg.group_column),
        ("identity_column", cfg.identity_column),
    ):
        if column is not None and column not in table:
            raise data.DataError(
                f"{source}: column '{column}' (data.{key}) missing; found: "
                f"{', '.join(table.columns)}"
            )
    group = table[cfg.group_column] if cfg.group_column else table["path"]
    table = table.assign(group=group.astype(str))
    if cfg.identity_column:
        table = table.assign(identity=table[cfg.identity_column].astype(str))
    return table


def prepare_images(config: RetuneConfig, project_dir: Path) -> data.PreparedData:
    """The split tables (one row per image: path inside the dataset, label, group, the
    manifest's columns and the described ones) and the files to copy with them."""
    from pipeline.images import describe_images, read_image_source

    cfg = config.data
    if cfg.source.startswith(data.DATASET_PREFIX):
        frames = {
            s: typed(f) for s, f in data.read_splits(dataset_folder(config, project_dir)).items()
        }
        return data.PreparedData(frames, {}, sum(len(f) for f in frames.values()))
    source, described_as = source_of(config, project_dir)
    table, root = read_image_source(source, config.image.path_column, cfg.label_column)
    table = describe_images(_metadata(table, config, source), root)
    if cfg.split_column:
        if cfg.split_column not in table:
            raise data.DataError(
                f"{source}: column '{cfg.split_column}' (data.split_column) missing"
            )
        table = table.assign(split=table[cfg.split_column].astype(str))
    else:
        table = data.split_by_group(table, cfg.validation_fraction, cfg.test_fraction)
    files = {f"{IMAGES}/{p}": root / p for p in table["path"]}
    table = table.assign(path=IMAGES + "/" + table["path"])
    columns = [c for c in table.columns if c != "split"]
    frames = {
        s: table.loc[table["split"] == s, columns].reset_index(drop=True) for s in data.SPLITS
    }
    return data.PreparedData(frames, {}, len(table), source=described_as, files=files)


def typed(frame: pd.DataFrame) -> pd.DataFrame:
    """A split table read back from CSV (all strings) with the described columns typed."""
    out = frame.assign(decodes=frame["decodes"].astype(str).str.lower() == "true")
    for column in _INT_COLUMNS:
        out[column] = pd.to_numeric(out[column], errors="coerce").fillna(0).astype(int)
    out["aspect"] = pd.to_numeric(out["aspect"], errors="coerce").fillna(0.0)
    return out


_PIXELS: dict[tuple[str, str, int], Any] = {}


def pixels_of(config: RetuneConfig, frame: pd.DataFrame, project_dir: Path) -> Any:
    """The frame's images as (N, 3, S, S) uint8 squares at ``image.size`` (read from the
    versioned dataset folder; the last few reads are kept for this process)."""
    from pipeline.image_models import square_pixels
    from pipeline.images import read_images

    root = dataset_folder(config, project_dir)
    key = (str(root), cache.texts_md5(frame["path"].tolist()), config.image.size)
    if key not in _PIXELS:
        if len(_PIXELS) >= 4:
            _PIXELS.pop(next(iter(_PIXELS)))
        _PIXELS[key] = square_pixels(read_images(root, frame["path"].tolist()), config.image.size)
    return _PIXELS[key]


def label_ids(frame: pd.DataFrame, labels: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    return frame["label"].map(index).to_numpy(dtype=np.int64)


# --- the base, the champion, scores ------------------------------------------------------


def base_parts(config: RetuneConfig) -> tuple[Any, Any, Any]:
    """The base backbone (on the device), its ImageNet head (or None) and its spec."""
    from pipeline.finetune import pick_device
    from pipeline.image_models import load_backbone

    backbone, head, spec = load_backbone(config.train.base_model, config.image.size)
    return backbone.to(pick_device()).eval(), head, spec


def suite_of(config: RetuneConfig) -> retention.Suite:
    from pipeline.image_models import PACKAGED_MOBILENET_V2
    from pipeline.image_retention import image_suite, photo_folder

    base = config.train.base_model
    imagenet = base == PACKAGED_MOBILENET_V2 or _has_imagenet_head(base)
    tasks, md5 = image_suite(imagenet)
    warnings = (
        []
        if imagenet
        else [f"{base} has no 1,000-class ImageNet head: the ImageNet agreement tasks are left out"]
    )
    return retention.Suite(tasks, f"images-{md5}", warnings, photo_folder())


def _has_imagenet_head(base: str) -> bool:
    import json

    config = Path(base) / "config.json"
    if not config.is_file():
        return False
    return len(json.loads(config.read_text()).get("id2label", {})) == 1000


def base_logits(config: RetuneConfig, project_dir: Path, backbone: Any, head: Any) -> np.ndarray:
    """The base's ImageNet logits on the photographs (what agreement compares with)."""
    from pipeline.image_retention import photo_logits, suite_images

    sha = lineage.weights_sha256(config.train.base_model)
    compute = lambda: photo_logits(backbone(), head, suite_images()[1])  # noqa: E731
    if sha.startswith("unresolved:"):
        return compute()
    folder = project_dir / config.forgetting.cache_dir / "images"
    return cache.cached_array(folder, {"what": "photo-logits", "weights_sha256": sha}, compute)


def score(
    config: RetuneConfig,
    model: Any,
    suite: retention.Suite,
    project_dir: Path,
    digest: str | None,
    base: bool = False,
) -> Retention:
    """Retention scores of ``model`` (a backbone or classifier), cached by ``digest``."""
    path = None
    if digest is not None and not digest.startswith("unresolved:"):
        path = forgetting.cache_file(project_dir / config.forgetting.cache_dir, digest, suite.md5)
        found = forgetting.load_cached(path, suite.tasks)
        if found is not None:
            return Retention(found[0], found[1], cached=True)
    from pipeline.image_retention import score_backbone

    backbone, head, _ = base_parts(config)
    imagenet = any(t.kind == "agreement" for t in suite.tasks)
    reference = None
    if imagenet and not base:
        reference = base_logits(config, project_dir, lambda: backbone, head)
    outputs, layers = score_backbone(model, head, reference, suite.tasks, config.forgetting.seed)
    if path is not None:
        forgetting.save_cached(path, outputs, layers)
    return Retention(outputs, layers, cached=False)


def features(
    config: RetuneConfig, backbone: Any, spec: Any, frame: pd.DataFrame, project_dir: Path
) -> np.ndarray:
    """The frozen base's pooled features of the frame's images, (N, D): cached by the base
    weights and the images' content (their SHA-256), read only when the cache misses."""
    from pipeline.finetune import pick_device, use_bf16
    from pipeline.image_training import POOLED, frozen_outputs

    bf16 = use_bf16(config.train.bf16, pick_device())
    sha = lineage.weights_sha256(config.train.base_model)

    def compute() -> np.ndarray:
        pixels = pixels_of(config, frame, project_dir)
        return frozen_outputs(backbone, pixels, spec, POOLED, bf16).float().numpy()

    if sha.startswith("unresolved:"):
        return compute()
    key = {
        "what": "image-features",
        "weights_sha256": sha,
        "images_md5": cache.texts_md5(frame["sha256"].tolist()),
        "size": str(config.image.size),
        "bf16": str(bf16),
    }
    return cache.cached_array(project_dir / config.forgetting.cache_dir / "images", key, compute)


def predict(config: RetuneConfig, model: Any, spec: Any, pixels: Any) -> np.ndarray:
    from pipeline.finetune import pick_device, use_bf16
    from pipeline.image_training import predict_proba

    device = pick_device()
    model.to(device)
    return predict_proba(model, pixels, spec, use_bf16(config.train.bf16, device))


def membership_of(frame: pd.DataFrame) -> pd.DataFrame:
    """Groups per row from the identity column; no groups (zero columns) without one."""
    if "identity" in frame:
        return identity.groups_from_column(frame["identity"].tolist())
    return pd.DataFrame(index=pd.RangeIndex(len(frame)))


def measure_base(
    config: RetuneConfig,
    train: pd.DataFrame,
    test: pd.DataFrame,
    suite: retention.Suite,
    project_dir: Path,
) -> Baseline:
    """A logistic probe on the frozen base's pooled features (the baseline to beat), the
    base's retention scores and the probe's test probabilities (cached by the base)."""
    backbone, _, spec = base_parts(config)
    labels = config.data.labels
    fitted = evaluate.fit_probe(
        features(config, backbone, spec, train, project_dir),
        label_ids(train, labels),
        config.evaluate.probe_c,
    )
    probs = fitted.predict_proba(features(config, backbone, spec, test, project_dir))
    probs = _all_classes(probs, fitted.classes_, len(labels))
    report = evaluate.scored_metrics(label_ids(test, labels), probs, labels)
    sha = lineage.weights_sha256(config.train.base_model)
    retained = score(config, backbone, suite, project_dir, sha, base=True)
    return Baseline(report, retained, lambda _: probs)


def _all_classes(probs: np.ndarray, classes: np.ndarray, k: int) -> np.ndarray:
    """Probe probabilities with a column per label (a label the training split lacks: 0)."""
    full = np.zeros((len(probs), k))
    full[:, classes] = probs
    return full


def measure_champion(
    config: RetuneConfig,
    test: pd.DataFrame,
    suite: retention.Suite,
    project_dir: Path,
    work_dir: Path,
) -> Champion | None:
    found = load_champion(config, work_dir)
    if found is None:
        return None
    version, loaded = found
    model, spec = loaded.predictor.model, loaded.predictor.spec
    retained = score(config, model, suite, project_dir, loaded.digest)
    probs = predict(config, model, spec, pixels_of(config, test, project_dir))
    report = evaluate.scored_metrics(label_ids(test, config.data.labels), probs, config.data.labels)
    return Champion(version, retained, lambda _: probs, report, probs)


def train(
    config: RetuneConfig,
    train: pd.DataFrame,
    validation: pd.DataFrame,
    run_id: str | None,
    model_dir: Path,
    project_dir: Path,
) -> Trained:
    """Fine-tune a classifier on the base (see :mod:`pipeline.image_training`), save it."""
    from tqdm.auto import tqdm

    from pipeline import tracking
    from pipeline.finetune import pick_device
    from pipeline.image_training import ImageSplits, train_image_classifier

    labels = config.data.labels
    if config.train.nnodes * config.train.nproc_per_node > 1:
        trained = train_distributed(config, train, validation, run_id, model_dir, project_dir)
        logger = tracking.MlflowLogger(run_id) if run_id else None
        for record in trained.result.history if logger is not None else []:
            logger.log_metrics(
                {"val_loss": record.val_loss, "val_accuracy": record.val_accuracy}, record.epoch
            )
        return trained
    splits = ImageSplits(
        pixels_of(config, train, project_dir),
        label_ids(train, labels),
        pixels_of(config, validation, project_dir),
        label_ids(validation, labels),
    )
    model, spec, result = train_image_classifier(
        config.train,
        config.image,
        labels,
        splits,
        model_dir,
        checkpoint_dir=model_dir.parent / "checkpoints",
        logger=tracking.MlflowLogger(run_id) if run_id else None,
        progress=lambda total: tqdm(total=total, desc="fine-tune", unit="step"),
        distill=config.forgetting.distill,
    )
    return Trained(model.to(pick_device()), spec, result, model_dir)


def train_distributed(
    config: RetuneConfig,
    train: pd.DataFrame,
    validation: pd.DataFrame,
    run_id: str | None,
    model_dir: Path,
    project_dir: Path,
) -> Trained:
    """Data-parallel fine-tuning under torchrun (:mod:`pipeline.worker`, one process per
    rank reading the images from the dataset folder); rank 0 saves the model."""
    from pipeline import worker
    from pipeline.finetune import pick_device
    from pipeline.image_models import load_classifier

    def write(work: Path, out: Path, checkpoints: Path) -> Path:
        train.to_csv(work / "train.csv", index=False)
        validation.to_csv(work / "validation.csv", index=False)
        return worker.write_spec(
            work / "spec.json",
            config.train,
            config.data.labels,
            work / "train.csv",
            work / "validation.csv",
            out,
            checkpoints,
            config.forgetting,
            kind=worker.IMAGES,
            base=str(dataset_folder(config, project_dir)),
            image=config.image,
        )

    result = worker.train_with_torchrun(config.train, run_id, model_dir, write)
    model, spec = load_classifier(model_dir)
    return Trained(model.to(pick_device()), spec, result, model_dir)


def blend_with_base(
    config: RetuneConfig,
    trained: Trained,
    validation: pd.DataFrame,
    suite: retention.Suite,
    base: Baseline,
    project_dir: Path,
) -> Any:
    """WiSE-FT on the backbone (the new head stays as tuned): the best-validating blend
    within the forgetting budget replaces the model in place and in its folder."""
    from pipeline.image_models import save_classifier
    from pipeline.tasks.base import sweep_blends

    model, spec, labels = trained.model, trained.processor, config.data.labels
    backbone, _, _ = base_parts(config)
    base_state = {n: t.detach().clone() for n, t in backbone.state_dict().items()}
    del backbone
    pixels, truth = pixels_of(config, validation, project_dir), label_ids(validation, labels)

    def validate(blend: Any) -> float:
        report = evaluate.scored_metrics(truth, predict(config, blend, spec, pixels), labels)
        return float(getattr(report, config.registry.primary_metric))

    def retain(blend: Any) -> Any:
        return score(config, blend, suite, project_dir, None).outputs

    choice = sweep_blends(
        config, model, base_state, validate, retain, base, suite, lambda m: m.backbone
    )
    save_classifier(model, spec, trained.model_dir)
    return choice


def evaluate_images(
    config: RetuneConfig,
    trained: Trained,
    test: pd.DataFrame,
    suite: retention.Suite,
    project_dir: Path,
) -> Evaluation:
    """Test metrics (and the confusion plot beside the model), retention, test probs."""
    from pipeline import plots

    labels = config.data.labels
    probs = predict(config, trained.model, trained.processor, pixels_of(config, test, project_dir))
    report = evaluate.scored_metrics(label_ids(test, labels), probs, labels)
    plots.plot_confusion(
        report.confusion, labels, trained.model_dir.parent / "plots" / "confusion.png"
    )
    retained = score(config, trained.model, suite, project_dir, None)
    return Evaluation(report, retained, probs)


def check_model_bias(
    config: RetuneConfig,
    test: pd.DataFrame,
    trained: Trained,
    evaluation: Evaluation,
    base: Baseline,
    champion: Champion | None,
    project_dir: Path,
) -> fairness.ModelBiasReport:
    """Per-group metrics on the identity column for candidate, base probe and champion;
    the bias gate on the candidate (its group checks are not run without groups)."""
    labels = config.data.labels
    y_true, membership = label_ids(test, labels), membership_of(test)

    def measure(probs: np.ndarray, name: str) -> fairness.ModelBiasReport:
        return fairness.check_model_bias(
            y_true, probs.argmax(1), membership, config.bias, labels, model=name
        )

    champion_report = None
    if champion is not None:
        champion_report = measure(champion.test_outputs, f"champion v{champion.version}")
    probe = base.predict(None) if base.predict is not None else None
    return fairness.evaluate_model_bias(
        measure(evaluation.outputs, "candidate"),
        config.bias,
        base_probe=measure(probe, "base probe") if probe is not None else None,
        champion=champion_report,
    )


class ImageClassification:
    """Labelled images -> a fine-tuned ImageNet backbone with a new head (see the module)."""

    name = IMAGE_CLASSIFICATION

    def identity(self, config: RetuneConfig) -> promotion.ModelIdentity:
        return promotion.ModelIdentity(self.name, tuple(config.data.labels), INPUT)

    def prepare(self, config: RetuneConfig, project_dir: Path) -> data.PreparedData:
        return prepare_images(config, project_dir)

    def validate(
        self, config: RetuneConfig, frames: Frames, docs_dir: Path | None, project_dir: Path
    ) -> Any:
        from pipeline.validation import validate_images

        return validate_images(frames, config.validation, config.data.labels, docs_dir)

    def check_data_bias(
        self, config: RetuneConfig, frames: Frames, project_dir: Path
    ) -> bias.DataBiasReport:
        """Rows and label rates per identity group (none without an identity column)."""
        frame = pd.concat([frames[s] for s in data.SPLITS], ignore_index=True)
        return bias.check_data_bias(
            frame["path"].tolist(),
            frame["label"].tolist(),
            None,
            config.data.labels,
            config.bias.min_group_rows,
            min_group_share=config.bias.min_group_share,
            max_label_rate_gap=config.bias.max_label_rate_gap,
            membership=membership_of(frame),
        )

    def retention_suite(
        self, config: RetuneConfig, project_dir: Path, versioned: retention.Suite | None = None
    ) -> retention.Suite:
        """Probes and photographs from installed packages (pinned: the same every run)."""
        return suite_of(config)

    measure_base = staticmethod(measure_base)
    measure_champion = staticmethod(measure_champion)
    train = staticmethod(train)
    blend_with_base = staticmethod(blend_with_base)
    evaluate = staticmethod(evaluate_images)
    check_model_bias = staticmethod(check_model_bias)

    def loaded_metric(
        self, config: RetuneConfig, model: Any, test: pd.DataFrame, project_dir: Path
    ) -> float:
        predictor, labels = model.predictor, config.data.labels
        probs = predict(
            config, predictor.model, predictor.spec, pixels_of(config, test, project_dir)
        )
        report = evaluate.scored_metrics(label_ids(test, labels), probs, labels)
        return float(getattr(report, config.registry.primary_metric))

    def examples(self, config: RetuneConfig, test: pd.DataFrame, project_dir: Path) -> pd.DataFrame:
        """Two test images, base64-encoded (a path would not exist where it is served)."""
        from pipeline.image_serving import example_frame

        root = dataset_folder(config, project_dir)
        return example_frame([root / p for p in test["path"].head(2)])

    def log_model(
        self,
        config: RetuneConfig,
        run_id: str,
        model_dir: Path,
        test: pd.DataFrame,
        project_dir: Path,
    ) -> str:
        from pipeline.image_serving import log_image_classifier

        return log_image_classifier(run_id, model_dir, self.examples(config, test, project_dir))
