"""The offline ImageNet backbone, checked against its weights: scikit-image's sample
photographs classified by the base's own 1,000-class head."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import image_models

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def mobilenet():
    return image_models.load_mobilenet_v2()


def top5(model, images) -> list[list[int]]:
    with torch.no_grad():
        logits = model(image_models.imagenet_inputs(images))
    return logits.topk(5, dim=1).indices.tolist()


def test_the_packaged_weights_load_strictly_into_the_torchvision_layout(mobilenet):
    state = torch.load(image_models.mobilenet_v2_weights(), weights_only=True)
    assert set(state) == set(mobilenet.state_dict())
    assert sum(p.numel() for p in mobilenet.parameters()) == 3_504_872
    broken = dict(state)
    broken.pop("classifier.1.weight")
    with pytest.raises(RuntimeError, match="classifier.1.weight"):
        image_models.MobileNetV2().load_state_dict(broken, strict=True)


def test_the_imagenet_head_sees_a_cat_in_chelsea_and_espresso_in_coffee(mobilenet):
    from skimage import data as samples

    cat, coffee = top5(mobilenet, [samples.chelsea(), samples.coffee()])
    assert cat[0] in CATS, cat
    assert coffee[0] == ESPRESSO, coffee
    # not a fixed answer: a photograph of a rocket is neither
    (rocket,) = top5(mobilenet, [samples.rocket()])
    assert rocket[0] not in CATS | {ESPRESSO}


def test_imagenet_inputs_crop_normalise_and_take_grey_images():
    grey = np.full((300, 400), 128, dtype=np.uint8)
    batch = image_models.imagenet_inputs([grey, np.zeros((64, 32, 3), dtype=np.uint8)])
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == torch.float32
    mean, std = np.array(image_models.IMAGENET_MEAN), np.array(image_models.IMAGENET_STD)
    expected = (128 / 255 - mean) / std  # every channel of a flat grey image
    torch.testing.assert_close(batch[0, :, 100, 100], torch.tensor(expected, dtype=torch.float32))
    torch.testing.assert_close(batch[1, :, 0, 0], torch.tensor(-mean / std, dtype=torch.float32))


def test_embed_is_the_pooled_input_of_the_head(mobilenet):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = mobilenet.embed(images)
        assert features.shape == (2, 1280)
        torch.testing.assert_close(mobilenet(images), mobilenet.classifier(features))
