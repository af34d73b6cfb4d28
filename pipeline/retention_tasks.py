"""Retention task type and the built-in loader both the suite and the scoring read.

:mod:`pipeline.retention` builds and loads the suite's tasks, :mod:`pipeline.forgetting`
scores encoders on them; both import from here, so imports go one way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data import package_file

LEE_REQUIREMENT = "gensim==4.4.0"
LEE_SOURCE = f"{LEE_REQUIREMENT} lee.cor + similarities0-1.txt"


@dataclass(frozen=True, eq=False)  # eq=False: numpy fields make == ambiguous
class RetentionTask:
    name: str
    # "similarity" | "probe" | "likelihood" (causal LMs, pipeline.lm_retention) |
    # "agreement" (images, pipeline.image_retention)
    kind: str
    source: str  # human-readable origin
    texts: list[str]  # unique texts to embed
    pairs: np.ndarray | None = None  # similarity: (P, 2) int64 indices into texts
    scores: np.ndarray | None = None  # similarity: (P,) float64 human scores
    labels: np.ndarray | None = None  # probe: (len(texts),) int64 ids into label_names
    is_test: np.ndarray | None = None  # probe: (len(texts),) bool, the fixed split
    label_names: tuple[str, ...] = ()  # probe, sorted

    @property
    def n_items(self) -> int:
        """What the task's score is computed over: pairs (similarity) or test texts (probe)."""
        if self.kind == "similarity":
            assert self.pairs is not None
            return len(self.pairs)
        if self.kind == "likelihood":
            return len(self.texts)
        assert self.is_test is not None
        return int(self.is_test.sum())


def load_lee(corpus: Path | None = None, ratings: Path | None = None) -> RetentionTask:
    """The Lee benchmark from gensim's test data: 50 documents, 1,225 rated pairs.

    The ratings file holds the upper triangle of a 50x50 matrix (tab-separated rows).

    Raises:
        DataError: gensim (a data package) is not installed.
        ValueError: the matrix is not documents x documents.
    """
    corpus = corpus or package_file("gensim/test/test_data/lee.cor", LEE_REQUIREMENT)
    ratings = ratings or package_file("gensim/test/test_data/similarities0-1.txt", LEE_REQUIREMENT)
    # lee.cor is Latin-1 (it holds pound signs as byte 0xA3).
    texts = [
        line.strip() for line in corpus.read_text(encoding="latin-1").splitlines() if line.strip()
    ]
    matrix = np.loadtxt(ratings, dtype=np.float64)  # (50, 50), upper triangle filled
    if matrix.shape != (len(texts), len(texts)):
        raise ValueError(
            f"{ratings}: expected a {len(texts)}x{len(texts)} matrix, got {matrix.shape}"
        )
    rows, cols = np.triu_indices(len(texts), k=1)
    return RetentionTask(
        name="lee",
        kind="similarity",
        source=LEE_SOURCE,
        texts=texts,
        pairs=np.stack([rows, cols], axis=1).astype(np.int64),  # (1225, 2)
        scores=matrix[rows, cols],
    )
