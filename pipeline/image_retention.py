"""What an image backbone must keep: general visual features and its ImageNet behaviour.

The image kind's forgetting measures, per item so that the shared paired bootstrap can
resample them (:func:`pipeline.forgetting.compare`):

- **linear probes** on labelled image sets the model is never tuned on: scikit-learn's
  8x8 digits (1,797, 10 classes) and scikit-image's faces/non-faces subset (200 LFW
  crops). Each image is scored 1 or 0 by a cross-validated logistic regression on the
  backbone's pooled features (:func:`probe_correct`): the accuracy a fresh head can still
  reach on them.
- **ImageNet agreement** on natural photographs that ship with scikit-image (each photo
  and four corner crops): whether the tuned backbone under the *original* 1,000-class head
  keeps the base's top-1 class, and how many of its top-5 (:func:`head_agreement`).

Every source is a file installed with a package: nothing is downloaded.

Measured with the offline MobileNetV2 at 64 px: the probes score 0.952 on digits and 0.990
on faces. A randomly initialised MobileNetV2 scores 0.954 and 0.960: random convolutions
already separate 8x8 digits, so the digits probe says little about forgetting on its own.
The faces probe and the ImageNet agreement are what tell a pretrained backbone from one
that has lost its training.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.forgetting import TaskOutputs
from pipeline.image_models import imagenet_inputs
from pipeline.retention_tasks import RetentionTask

PHOTOS = (  # scikit-image's bundled photographs (skimage/data/), natural scenes and objects
    "astronaut.png",
    "camera.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
    "moon.png",
    "page.png",
    "text.png",
    "brick.png",
    "grass.png",
    "gravel.png",
    "color.png",
    "clock_motion.png",
)
PROBE_SIZE = 64  # px: the probe sets are 8x8 and 25x25 images


def photo_folder() -> Path:
    from pipeline.data import package_file

    return package_file("skimage/data/chelsea.png", "scikit-image==0.26.0").parent


def photographs(crop: float = 0.6) -> list[np.ndarray]:
    """Each photo of :data:`PHOTOS` and its four corner crops (``crop`` of each side):
    5 images per photo, in a fixed order."""
    from PIL import Image

    out = []
    for name in PHOTOS:
        with Image.open(photo_folder() / name) as image:
            pixels = np.asarray(image.convert("RGB"))
        h, w = pixels.shape[:2]
        ch, cw = int(h * crop), int(w * crop)
        out.append(pixels)
        out += [pixels[:ch, :cw], pixels[:ch, -cw:], pixels[-ch:, :cw], pixels[-ch:, -cw:]]
    return out


def probe_sets() -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
    """name -> (grey uint8 images, integer labels): ``digits`` and ``faces``."""
    from skimage import data as samples
    from sklearn.datasets import load_digits

    digits = load_digits()
    faces = samples.lfw_subset()  # (200, 25, 25) in [0, 1]: 100 faces, then 100 non-faces
    return {
        "digits": (
            [(x * 16).clip(0, 255).astype(np.uint8) for x in digits.images],
            digits.target.astype(np.int64),
        ),
        "faces": (
            [(x * 255).astype(np.uint8) for x in faces],
            np.repeat(np.array([1, 0], dtype=np.int64), 100),
        ),
    }


@torch.no_grad()
def embed(model: nn.Module, images: Sequence[np.ndarray], size: int, batch: int = 64):
    """Pooled backbone features of ``images`` (ImageNet preprocessing at ``size`` px):
    (N, D) float32 numpy."""
    model.eval()
    device = next(model.parameters()).device
    parts = [
        model.embed(imagenet_inputs(images[i : i + batch], size).to(device)).float().cpu()
        for i in range(0, len(images), batch)
    ]
    return torch.cat(parts).numpy()


@torch.no_grad()
def imagenet_logits(model: nn.Module, images: Sequence[np.ndarray], batch: int = 16):
    """The 1,000-class logits at 224 px: (N, 1000) float32 numpy."""
    model.eval()
    device = next(model.parameters()).device
    parts = [
        model(imagenet_inputs(images[i : i + batch]).to(device)).float().cpu()
        for i in range(0, len(images), batch)
    ]
    return torch.cat(parts).numpy()


def probe_correct(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0):
    """Per image, 1.0 if a logistic regression fitted on the other folds' features
    (standardised, stratified ``folds``-fold) labels it right, else 0.0: (N,)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    predicted = cross_val_predict(probe, features, labels, cv=split)
    return (predicted == labels).astype(np.float64)


def head_agreement(base: np.ndarray, tuned: np.ndarray, k: int = 5):
    """Per image: (tuned top-1 == base top-1, share of base's top-``k`` in tuned's top-``k``),
    each (N,) float64, from (N, C) logits."""
    top1 = (base.argmax(1) == tuned.argmax(1)).astype(np.float64)
    base_k = np.argsort(-base, axis=1)[:, :k]
    tuned_k = np.argsort(-tuned, axis=1)[:, :k]
    overlap = np.array([len(set(b) & set(t)) / k for b, t in zip(base_k, tuned_k, strict=True)])
    return top1, overlap


# --- the suite and its scores --------------------------------------------------------------

TOP1, TOP5 = "imagenet_top1", "imagenet_top5"
PROBE_SOURCES = {
    "digits": "scikit-learn load_digits (1,797 8x8 digits, 10 classes)",
    "faces": "scikit-image lfw_subset (100 faces, 100 non-faces, 25x25)",
}
PHOTO_SOURCE = f"scikit-image data/: {len(PHOTOS)} photographs and 4 corner crops each"


@functools.cache
def suite_images() -> tuple[dict[str, tuple[list[np.ndarray], np.ndarray]], list[np.ndarray]]:
    """The probe sets and the photographs, read once per process (they never change)."""
    return probe_sets(), photographs()


def image_suite(imagenet: bool) -> tuple[list[RetentionTask], str]:
    """The image kind's retention tasks and their md5 (over every image's pixels and
    label): a probe task per labelled set; with ``imagenet`` (the base has an ImageNet-1k
    head) the top-1 and top-5 agreement on the photographs.

    A probe's items are all its images (cross-validated); an agreement task's items are
    the photographs, each 1.0 for the base itself.
    """
    probes, photos = suite_images()
    digest = hashlib.md5()
    tasks = []
    for name, (images, labels) in probes.items():
        for image in images:
            digest.update(image.tobytes())
        digest.update(labels.tobytes())
        tasks.append(
            RetentionTask(
                name=name,
                kind="probe",
                source=PROBE_SOURCES[name],
                texts=[f"{name}/{i}" for i in range(len(images))],
                labels=labels,
                is_test=np.ones(len(images), dtype=bool),
                label_names=tuple(str(x) for x in sorted(set(labels.tolist()))),
            )
        )
    if imagenet:
        for photo in photos:
            digest.update(photo.tobytes())
        ids = [f"photo/{i}" for i in range(len(photos))]
        for name in (TOP1, TOP5):
            tasks.append(
                RetentionTask(
                    name, "agreement", PHOTO_SOURCE, ids, is_test=np.ones(len(ids), dtype=bool)
                )
            )
    return tasks, digest.hexdigest()


def score_backbone(
    model: nn.Module,
    imagenet_head: nn.Module | None,
    base_logits: np.ndarray | None,
    tasks: Sequence[RetentionTask],
    seed: int = 0,
) -> tuple[dict[str, TaskOutputs], np.ndarray]:
    """A backbone (anything with ``embed``) on the suite: per-item outputs by task, and
    per-stage pooled features of the photographs for CKA, (L, N, H) zero-padded to the
    widest stage (zero columns leave linear CKA unchanged).

    Args:
        imagenet_head: the *base's* 1,000-class head, read on this backbone's features.
        base_logits: the base's own logits on the photographs (what agreement compares
            with); None scores the base itself (agreement 1.0 everywhere).
    """
    probes, photos = suite_images()
    outputs = {}
    for task in tasks:
        if task.kind == "probe":
            images, labels = probes[task.name]
            correct = probe_correct(embed(model, images, PROBE_SIZE), labels, seed=seed)
            outputs[task.name] = TaskOutputs(task.name, correct, float(correct.mean()))
    if any(t.kind == "agreement" for t in tasks):
        assert imagenet_head is not None
        logits = photo_logits(model, imagenet_head, photos)
        top1, top5 = head_agreement(logits if base_logits is None else base_logits, logits)
        for name, items in ((TOP1, top1), (TOP5, top5)):
            outputs[name] = TaskOutputs(name, items, float(items.mean()))
    return outputs, stage_features(model, photos)


@torch.no_grad()
def photo_logits(model: nn.Module, head: nn.Module, photos: Sequence[np.ndarray]) -> np.ndarray:
    """``head`` on the backbone's pooled features of each photo at 224 px: (N, 1000)."""
    device = next(model.parameters()).device
    features = torch.from_numpy(embed(model, photos, 224, batch=16)).to(device)
    return head.to(device)(features).float().cpu().numpy()


@torch.no_grad()
def stage_features(model: nn.Module, photos: Sequence[np.ndarray], size: int = 128) -> np.ndarray:
    """Pooled output of every stage of the backbone (MobileNetV2) on the photos, or of
    its final features alone (other backbones): (L, N, H) float32, zero-padded."""
    backbone = getattr(model, "backbone", model)
    model.eval()
    device = next(model.parameters()).device
    x = imagenet_inputs(photos, size).to(device)
    if not hasattr(backbone, "run"):
        return embed(model, photos, size)[None]
    layers = []
    for stage in backbone.stages:
        x = stage(x)
        layers.append(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1).float().cpu().numpy())
    width = max(a.shape[1] for a in layers)
    return np.stack([np.pad(a, ((0, 0), (0, width - a.shape[1]))) for a in layers])
