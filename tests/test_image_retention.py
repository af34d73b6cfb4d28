"""The image kind's forgetting measures on the real offline MobileNetV2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import image_models, image_retention


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return image_models.load_mobilenet_v2()


def test_head_agreement_by_hand():
    base = np.array([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5]])
    tuned = np.array([[5.0, 4, 3, 2, 0, 1], [5, 4, 3, 2, 1, 0]])
    top1, overlap = image_retention.head_agreement(base, tuned, k=3)
    assert top1.tolist() == [1.0, 0.0]
    assert overlap.tolist() == [1.0, 0.0]  # {0,1,2} == {0,1,2}; {5,4,3} vs {0,1,2}
    top1, overlap = image_retention.head_agreement(base, tuned, k=5)
    assert overlap.tolist() == [0.8, 0.8]  # {0,1,2,3,4} vs {0,1,2,3,5}; {5..1} vs {0..4}


def test_the_photographs_are_bundled_and_cropped(base):
    photos = image_retention.photographs()
    assert len(photos) == 5 * len(image_retention.PHOTOS)
    logits = image_retention.imagenet_logits(base, photos[:15])
    top1, overlap = image_retention.head_agreement(logits, logits)
    assert top1.all() and (overlap == 1.0).all()  # a model agrees with itself
    assert logits[10].argmax() in {281, 282, 283, 284, 285}  # chelsea, uncropped: a cat


def test_imagenet_features_probe_digits_and_faces_far_above_chance(base):
    sets = image_retention.probe_sets()
    assert [len(sets[n][0]) for n in ("digits", "faces")] == [1797, 200]
    for name, (images, labels), chance in [
        ("digits", sets["digits"], 0.1),
        ("faces", sets["faces"], 0.5),
    ]:
        images, labels = images[:300], labels[:300]
        features = image_retention.embed(base, images, image_retention.PROBE_SIZE)
        correct = image_retention.probe_correct(features, labels)
        assert correct.shape == (len(labels),) and set(np.unique(correct)) <= {0.0, 1.0}
        assert correct.mean() > chance + 0.3, (name, correct.mean())
    # a backbone whose weights are scrambled has lost what ImageNet taught it
    scrambled = image_models.MobileNetV2().eval()
    images, labels = sets["faces"]
    kept = image_retention.probe_correct(image_retention.embed(base, images, 64), labels).mean()
    lost = image_retention.probe_correct(image_retention.embed(scrambled, images, 64), labels)
    assert lost.mean() < kept, (lost.mean(), kept)
