"""The image-classification kind on real backbones: the packaged MobileNetV2 at 32 pixels
and a tiny ViT (hidden size 32) through ``AutoModelForImageClassification``.

The grouped split, cached frozen outputs against recomputation, frozen BatchNorm
statistics, SIGTERM and resume, seeded runs, the best epoch's buffers restored, and odd
image modes read as RGB.
"""

from __future__ import annotations

import copy
import json
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.config import ImageConfig, RetuneConfig, TrainConfig
from pipeline.data import DataError
from pipeline.finetune import TrainingInterrupted, TrainState
from pipeline.image_models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PACKAGED_MOBILENET_V2,
    build_classifier,
    load_classifier,
    save_classifier,
    square_pixels,
)
from pipeline.image_training import (
    POOLED,
    ImageLoop,
    ImageSplits,
    fine_tune_images,
    frozen_outputs,
    predict_proba,
)
from pipeline.images import read_rgb
from pipeline.tasks import get as get_kind

LABELS = ["zero", "one", "two"]
SIZE = 32  # pixels per side the model sees; the squares are 37 (SIZE * 256 / 224)
FROZEN = 10  # partial: the stem and blocks 1..10 frozen, stages 11..18 train


@pytest.fixture(autouse=True, scope="module")
def _torch_threads():
    """The runs below use one thread (train.num_threads=1); put the count back after."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def digit(index: int) -> np.ndarray:
    """scikit-learn's digit ``index`` as 8x8 uint8 (its 0..16 values times 16)."""
    from sklearn.datasets import load_digits

    return (load_digits().images[index] * 16).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def splits() -> ImageSplits:
    """The first 120 digits 0, 1 and 2 as (N, 3, 37, 37) squares: 96 train, 24 validate."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rows = np.flatnonzero(digits.target < 3)[:120]
    pixels = square_pixels([digit(i) for i in rows], SIZE)
    labels = digits.target[rows].astype(np.int64)
    return ImageSplits(pixels[:96], labels[:96], pixels[96:], labels[96:])


def train_config(**changes) -> TrainConfig:
    values = {
        "base_model": PACKAGED_MOBILENET_V2,
        "strategy": "partial",
        "frozen_layers": FROZEN,
        "cache_frozen": False,
        "learning_rate": 1e-3,
        "head_learning_rate": 1e-2,
        "weight_decay": 1e-4,
        "epochs": 2,
        "patience": 2,
        "batch_size": 16,  # 6 steps an epoch on 96 images
        "bf16": False,
        "num_threads": 1,
    }
    return TrainConfig(**(values | changes))


def mobilenet(seed: int = 0):
    model, _, spec = build_classifier(PACKAGED_MOBILENET_V2, LABELS, SIZE, seed)
    return model, spec


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def differing(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def centre_inputs(pixels: torch.Tensor) -> torch.Tensor:
    """What the net reads for a square without augmentation, by hand: the centre 32 of
    37 pixels (offset 2), scaled to 0..1, ImageNet mean and std. (N, 3, 32, 32)."""
    x = pixels[:, :, 2:34, 2:34].float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def batchnorm_buffers(model: torch.nn.Module, stages: range) -> dict[str, torch.Tensor]:
    """running_mean, running_var and num_batches_tracked of every BatchNorm in ``stages``
    of the MobileNetV2 backbone."""
    out = {}
    for i in stages:
        for name, module in model.backbone.features[i].named_modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                for buffer, value in module.named_buffers():
                    out[f"{i}.{name}.{buffer}"] = value.detach().clone()
    return out


FROZEN_STAGES = range(0, FROZEN + 1)  # the stem (0) and blocks 1..10
TRAINED_STAGES = range(FROZEN + 1, 19)  # blocks 11..17 and the 1x1 conv (18)


# --- the split ---------------------------------------------------------------------------


def write_scans(project: Path, n: int = 120, per_patient: int = 4) -> pd.DataFrame:
    """``n`` digits as ``scans/<index>.png`` and ``manifest.csv`` (path, label,
    patient_id, site): ``per_patient`` consecutive images per patient."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    rows = np.flatnonzero(target < 3)[:n]
    (project / "scans").mkdir(parents=True)
    records = []
    for j, index in enumerate(rows):
        path = f"scans/{index:04d}.png"
        Image.fromarray(digit(index)).save(project / path)
        patient = j // per_patient
        records.append(
            {
                "path": path,
                "label": LABELS[target[index]],
                "patient_id": f"p{patient:02d}",
                "site": "north" if patient % 2 else "south",
            }
        )
    manifest = pd.DataFrame(records)
    manifest.to_csv(project / "manifest.csv", index=False)
    return manifest


def image_config(**data) -> RetuneConfig:
    return RetuneConfig(
        task="image-classification",
        data={"source": "manifest.csv", "labels": LABELS} | data,
        image={"size": SIZE},
    )


def all_rows(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.concat([f.assign(split=s) for s, f in frames.items()], ignore_index=True)


def test_a_patients_images_stay_in_one_split_and_are_copied_from_their_files(tmp_path):
    manifest = write_scans(tmp_path)
    kind = get_kind("image-classification")
    prepared = kind.prepare(image_config(group_column="patient_id"), tmp_path)
    rows = all_rows(prepared.frames)
    assert prepared.rows_read == 120 and len(rows) == 120
    assert (rows["group"] == rows["patient_id"]).all()
    splits_per_patient = rows.groupby("patient_id")["split"].nunique()
    assert len(splits_per_patient) == 30 and (splits_per_patient == 1).all()
    assert set(rows["split"]) == {"train", "validation", "test"}
    # the manifest's metadata stays with each row; the path is the copy's, under images/
    assert set(rows["path"]) == {f"images/{p}" for p in manifest["path"]}
    expected = manifest.set_index("path")
    by_path = rows.assign(source=rows["path"].str.removeprefix("images/")).set_index("source")
    assert (by_path.loc[expected.index, "site"] == expected["site"]).all()
    assert (by_path.loc[expected.index, "label"] == expected["label"]).all()
    assert prepared.files == {f"images/{p}": tmp_path / p for p in manifest["path"]}
    assert all(source.is_file() for source in prepared.files.values())
    assert rows["decodes"].all() and (rows["width"] == 8).all()

    # Without a group column each image is its own group: patients then straddle splits.
    alone = all_rows(kind.prepare(image_config(), tmp_path).frames)
    assert (alone["group"] == alone["path"].str.removeprefix("images/")).all()
    assert alone["group"].nunique() == 120
    assert (alone.groupby("patient_id")["split"].nunique() > 1).any()


# --- cached frozen outputs ------------------------------------------------------------


def test_cached_frozen_outputs_equal_the_frozen_stages_run_on_centre_crops(splits):
    model, spec = mobilenet()
    model.eval()
    with torch.no_grad():
        by_hand = model.backbone.features[: FROZEN + 1](centre_inputs(splits.train))
        pooled = model.embed(centre_inputs(splits.train))
    assert by_hand.shape == (96, 64, 2, 2)
    cached = frozen_outputs(model, splits.train, spec, FROZEN + 1, bf16=False)
    assert cached.dtype == torch.float32
    torch.testing.assert_close(cached, by_hand)

    # What the loops train on: the stages' output (partial) and the pooled features (head).
    partial = ImageLoop(model, spec, splits, train_config(cache_frozen=True), ImageConfig(size=32))
    assert partial.k == FROZEN + 1
    torch.testing.assert_close(partial.train_in, by_hand)
    head = ImageLoop(
        copy.deepcopy(model), spec, splits, train_config(strategy="head"), ImageConfig(size=32)
    )
    assert head.k == POOLED and head.train_in.shape == (96, 1280)
    torch.testing.assert_close(head.train_in, pooled)


def test_logits_from_cached_outputs_equal_logits_from_unaugmented_images(splits):
    # Six training images: the cache is then computed on the batch the net reads (a conv's
    # float rounding depends on the batch size, which training-mode BatchNorm amplifies).
    rows = [3, 17, 40, 41, 80, 95]
    six = ImageSplits(splits.train[rows], splits.train_labels[rows], splits.val, splits.val_labels)
    model, spec = mobilenet()
    twin = copy.deepcopy(model)
    cached = ImageLoop(model, spec, six, train_config(cache_frozen=True), ImageConfig(size=32))
    images = ImageLoop(
        twin, spec, six, train_config(cache_frozen=False), ImageConfig(size=32, augment=False)
    )
    assert cached.k == FROZEN + 1 and images.k is None
    batch = list(range(6))
    torch.testing.assert_close(images.inputs(batch, step=5), centre_inputs(six.train))
    with torch.no_grad():
        for mode in (True, False):  # training (batch statistics, dropout) and evaluation
            cached.core.train(mode)
            images.core.train(mode)
            torch.manual_seed(7)  # the same dropout mask
            from_cache, cached_features = cached.core(cached.inputs(batch, step=5))
            torch.manual_seed(7)
            from_images, image_features = images.core(images.inputs(batch, step=5))
            assert from_cache.shape == (6, 3) and cached_features.shape == (6, 1280)
            torch.testing.assert_close(cached_features, image_features)
            torch.testing.assert_close(from_cache, from_images)
        # with augmentation the same step's batch is other pixels than the centre crop
        augmented = ImageLoop(copy.deepcopy(twin), spec, six, train_config(), ImageConfig(size=32))
        assert not torch.allclose(augmented.inputs(batch, step=5), images.inputs(batch, step=5))


def test_frozen_batchnorm_statistics_stay_while_trained_blocks_move(splits):
    model, spec = mobilenet()
    frozen, trained = (
        batchnorm_buffers(model, FROZEN_STAGES),
        batchnorm_buffers(model, TRAINED_STAGES),
    )
    # not cached: the frozen stages run on every augmented batch, in eval mode
    result = fine_tune_images(model, spec, splits, train_config(), ImageConfig(size=32))
    assert differing(frozen, batchnorm_buffers(model, FROZEN_STAGES)) == []
    after = batchnorm_buffers(model, TRAINED_STAGES)
    means = [k for k in trained if k.endswith("running_mean")]
    assert len(means) == 7 * 3 + 1  # 3 BatchNorms in each of blocks 11..17, 1 in stage 18
    assert set(differing(trained, after)) == set(trained)  # every buffer of every one moved
    # one update per step up to the kept (best) epoch, 6 steps an epoch
    counts = {int(v) - int(trained[k]) for k, v in after.items() if k.endswith("tracked")}
    assert counts == {6 * result.best_epoch}


# --- resume, seeds, the best epoch ----------------------------------------------------


class SigtermAfterStep:
    """A progress bar (one for every phase) that sends this process SIGTERM when the run
    has taken ``step`` steps in all: the loop then checkpoints and stops."""

    def __init__(self, step: int) -> None:
        self.step, self.done = step, 0

    def __call__(self, total: int) -> SigtermAfterStep:
        return self

    def update(self, n: int) -> None:
        self.done += n
        if n and self.done == self.step:
            signal.raise_signal(signal.SIGTERM)

    def set_postfix(self, **_: object) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("strategy", "stop", "phase_dir", "saved"),
    [
        ("full", 8, "", (8, 2, 2)),  # epoch 2, its 2nd batch
        # lp-ft: 6 head steps (one probe epoch), then full; stopped 3 steps into full
        ("lp-ft", 9, "full", (3, 1, 3)),
    ],
)
def test_a_run_stopped_by_sigterm_resumes_to_the_weights_of_an_uninterrupted_one(
    splits, tmp_path, strategy, stop, phase_dir, saved
):
    # augmented: every step's crops and flips are drawn again on resume, from its seed
    config = train_config(strategy=strategy, epochs=3, patience=3, lpft_probe_epochs=1)
    image = ImageConfig(size=32)
    straight, spec = mobilenet()
    expected = fine_tune_images(straight, spec, splits, config, image)

    with pytest.raises(TrainingInterrupted, match=f"stopped at step {saved[0]}"):
        fine_tune_images(
            mobilenet()[0],
            spec,
            splits,
            config,
            image,
            progress=SigtermAfterStep(stop),
            checkpoint_dir=tmp_path,
        )
    checkpoint = torch.load(tmp_path / phase_dir / "checkpoint.pt", weights_only=True)
    state = TrainState.from_checkpoint(checkpoint)
    assert (state.step, state.epoch, state.batch) == saved
    resumed = mobilenet()[0]
    result = fine_tune_images(resumed, spec, splits, config, image, checkpoint_dir=tmp_path)
    assert result.loss_curve == expected.loss_curve
    assert [h.val_loss for h in result.history] == [h.val_loss for h in expected.history]
    assert result.best_epoch == expected.best_epoch
    assert differing(weights(resumed), weights(straight)) == []


def test_the_same_seed_gives_the_same_weights_and_another_seed_others(splits):
    config, image = train_config(), ImageConfig(size=32)  # partial on augmented images
    runs = []
    for seed in (0, 0, 1):
        model, spec = mobilenet(seed)
        result = fine_tune_images(
            model, spec, splits, config.model_copy(update={"seed": seed}), image
        )
        runs.append((weights(model), result.loss_curve))
    (first, curve), (again, curve_again), (other, other_curve) = runs
    assert differing(first, again) == [] and curve == curve_again
    moved = differing(first, other)
    assert "head.weight" in moved and any(k.startswith("backbone.features.17.") for k in moved)
    assert curve != other_curve
    # the frozen stages are the pretrained ones whatever the seed
    assert not [k for k in moved if k.startswith(("backbone.features.0.", "backbone.features.10."))]


class SnapshotEachEpoch:
    """A logger that copies the model's state when an epoch's validation is logged."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.states = model, []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if "val_loss" in metrics:
            self.states.append(weights(self.model))


def test_the_best_epoch_is_restored_with_its_batchnorm_statistics(splits):
    # Validation labels shifted by one: the better the model learns the digits, the worse
    # it validates, so the first epoch is the best and the last two are not.
    wrong = ImageSplits(splits.train, splits.train_labels, splits.val, (splits.val_labels + 1) % 3)
    model, spec = mobilenet()
    snapshots = SnapshotEachEpoch(model)
    config = train_config(epochs=3, patience=3, cache_frozen=True)
    result = fine_tune_images(model, spec, wrong, config, ImageConfig(size=32), logger=snapshots)
    losses = [h.val_loss for h in result.history]
    assert len(losses) == 3 and result.best_epoch == 1 and losses[0] < min(losses[1:]), losses
    final = weights(model)
    best, last = snapshots.states[0], snapshots.states[-1]
    assert differing(final, best) == []  # the weights and every buffer of epoch 1
    bn = [k for k in final if k.startswith("backbone.features.17.") and "running_" in k]
    assert len(bn) == 6 and set(bn) <= set(differing(final, last))
    tracked = final["backbone.features.17.conv.0.1.num_batches_tracked"]
    base = mobilenet()[0].state_dict()["backbone.features.17.conv.0.1.num_batches_tracked"]
    assert int(tracked - base) == 6  # the 6 steps of epoch 1, not the 18 of the run


# --- AutoModelForImageClassification ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer ViT, hidden size 32, 8-pixel patches of 32x32 images, with an image
    processor whose mean and std are 0.5 (not ImageNet's)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def _vit_parts(model) -> dict[str, list[str]]:
    """Parameter names by part; encoder layers are ``vit.layers.<i>`` (transformers 5) or
    ``vit.encoder.layer.<i>``."""
    import re

    names = [n for n, _ in model.named_parameters()]
    layer = lambda i: [n for n in names if re.search(rf"\.(layers|layer)\.{i}\.", n)]  # noqa: E731
    return {
        "embeddings": [n for n in names if n.startswith("backbone.model.vit.embeddings.")],
        "layer0": layer(0),
        "layer1": layer(1),
        "head": [n for n in names if n.startswith("head.")],
    }


@pytest.mark.parametrize("strategy", ["head", "partial"])
def test_a_transformers_vit_trains_saves_and_loads_with_the_same_predictions(
    splits, tiny_vit, tmp_path, strategy
):
    model, imagenet, spec = build_classifier(str(tiny_vit), LABELS, SIZE, seed=0)
    assert imagenet is None  # a 2-class head, not ImageNet's
    assert spec.architecture == "transformers" and spec.base_model == str(tiny_vit)
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    parts = _vit_parts(model)
    params = dict(model.named_parameters())
    size = {part: sum(params[n].numel() for n in names) for part, names in parts.items()}
    assert size["head"] == 32 * 3 + 3 and size["layer0"] == size["layer1"] > 0
    before = weights(model)
    # partial: the embeddings and the first of 2 layers frozen
    config = train_config(strategy=strategy, frozen_layers=1, learning_rate=1e-2)
    result = fine_tune_images(model, spec, splits, config, ImageConfig(size=32))
    moved = set(differing(before, weights(model)))
    total = sum(p.numel() for p in model.parameters())
    assert result.total_parameters == total
    if strategy == "head":
        assert result.trainable_parameters == size["head"]
        assert moved and all(n.startswith("head.") for n in moved)
    else:
        assert result.trainable_parameters == total - size["embeddings"] - size["layer0"]
        assert not moved & set(parts["embeddings"] + parts["layer0"])
        assert set(parts["head"]) <= moved and moved & set(parts["layer1"])

    folder = save_classifier(model, spec, tmp_path / "model")
    loaded, loaded_spec = load_classifier(folder)
    assert loaded_spec == spec
    assert json.loads((folder / "image_model.json").read_text())["labels"] == LABELS
    assert differing(weights(loaded), weights(model.cpu())) == []
    probs = predict_proba(model, splits.val, spec, bf16=False)
    assert probs.shape == (24, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_array_equal(predict_proba(loaded, splits.val, loaded_spec, False), probs)


# --- odd image modes ------------------------------------------------------------------


def test_read_rgb_converts_cmyk_16_bit_alpha_and_palette_images_to_8_bit_rgb(tmp_path):
    # CMYK JPEG: no ink is white, full black ink is black (JPEG: within a few levels)
    cmyk = Image.new("CMYK", (16, 8), (0, 0, 0, 0))
    cmyk.paste((0, 0, 0, 255), (8, 0, 16, 8))
    cmyk.save(tmp_path / "cmyk.jpg")
    # 16-bit grey: scaled by its range (1000..5000 -> 0..255), not clipped to 255
    deep = np.array([[1000, 3000, 5000]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    Image.fromarray(np.full((2, 2), 40_000, np.uint16)).save(tmp_path / "flat.png")
    # RGBA: opaque red, fully transparent blue, half-transparent black -> onto white
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 255, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    # palette: index 1 is (10, 20, 30); with index 0 transparent it turns white
    palette = Image.fromarray(np.array([[0, 1, 1]], dtype=np.uint8), "P")
    palette.putpalette([200, 100, 50, 10, 20, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    palette.save(tmp_path / "clear.png", transparency=0)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"

    read = {p.name: read_rgb(p) for p in sorted(tmp_path.iterdir())}
    for name, array in read.items():
        assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3, name
    cmyk_rgb = read["cmyk.jpg"].astype(int)
    assert cmyk_rgb.shape == (8, 16, 3)
    assert (cmyk_rgb[:, :6] >= 250).all() and (cmyk_rgb[:, 10:] <= 5).all()
    assert read["deep.png"].tolist() == [[[0, 0, 0], [128, 128, 128], [255, 255, 255]]]
    assert (read["flat.png"] == 0).all()  # one value: no range to scale by
    alpha = read["alpha.png"].astype(int)
    assert alpha[0, 0].tolist() == [255, 0, 0] and alpha[0, 1].tolist() == [255, 255, 255]
    assert np.abs(alpha[0, 2] - 127).max() <= 1
    assert read["palette.png"].tolist() == [[[200, 100, 50], [10, 20, 30], [10, 20, 30]]]
    assert read["clear.png"].tolist() == [[[255, 255, 255], [10, 20, 30], [10, 20, 30]]]


def test_read_rgb_names_a_file_that_is_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("a note, not a picture")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name in ("notes.png", "cut.png"):
        with pytest.raises(DataError, match=rf"{name}: does not decode as an image"):
            read_rgb(tmp_path / name)
