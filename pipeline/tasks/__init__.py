"""Kinds of fine-tuning task, by the name ``task:`` gives them (see :mod:`pipeline.tasks.base`).

A new kind is one module beside ``text_classification.py`` that implements
:class:`~pipeline.tasks.base.TaskKind`, plus one entry in :data:`KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.tasks.base import (
    Baseline,
    Champion,
    Evaluation,
    Frames,
    Retention,
    TaskKind,
    Trained,
)

__all__ = [
    "Baseline",
    "Champion",
    "Evaluation",
    "Frames",
    "Retention",
    "TaskKind",
    "Trained",
    "get",
]


def get(name: str) -> TaskKind:
    """The kind of task ``task:`` names."""
    if name not in KINDS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(KINDS))}")
    return KINDS[name]()


def _text_classification() -> TaskKind:
    from pipeline.tasks.text_classification import TextClassification

    return TextClassification()


def _generative(name: str) -> Callable[[], TaskKind]:
    def make() -> TaskKind:
        from pipeline.tasks.generative import Generative

        return Generative(name)

    return make


def _image_classification() -> TaskKind:
    from pipeline.tasks.image_classification import ImageClassification

    return ImageClassification()


KINDS: dict[str, Callable[[], TaskKind]] = {
    "text-classification": _text_classification,
    "chat": _generative("chat"),
    "translation": _generative("translation"),
    "image-classification": _image_classification,
}
