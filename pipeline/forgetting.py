"""Forgetting: how much general knowledge the tuned encoder kept, against its base.

First measure: the Lee document-similarity benchmark (50 news documents, 1,225 pairs
rated by humans). Score = Spearman correlation between the cosine similarity of the
encoder's embeddings and the mean human rating.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data import package_file

LEE_REQUIREMENT = "gensim==4.4.0"


@dataclass(frozen=True)
class SimilarityTask:
    name: str
    texts: list[str]
    pairs: np.ndarray  # (P, 2) indices into texts
    scores: np.ndarray  # (P,) human similarity


@dataclass(frozen=True)
class ForgettingReport:
    task: str
    base_score: float
    tuned_score: float

    @property
    def drop(self) -> float:
        """base - tuned: positive means the tuned model forgot."""
        return self.base_score - self.tuned_score

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drop": self.drop}


def load_lee(corpus: Path | None = None, ratings: Path | None = None) -> SimilarityTask:
    """The Lee benchmark from gensim's test data: documents and the 50x50 rating matrix.

    The ratings file holds the upper triangle of a 50x50 matrix (tab-separated rows).
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
    return SimilarityTask("lee", texts, np.stack([rows, cols], axis=1), matrix[rows, cols])


def similarity_spearman(embeddings: np.ndarray, task: SimilarityTask) -> float:
    """Spearman correlation of cosine similarity with the human scores.

    Args:
        embeddings: (len(task.texts), H), L2-normalised.
    """
    from scipy.stats import spearmanr

    a, b = embeddings[task.pairs[:, 0]], embeddings[task.pairs[:, 1]]
    cosine = (a * b).sum(axis=1)
    return float(spearmanr(cosine, task.scores).statistic)
