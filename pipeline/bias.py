"""Per-group figures on the data: size, label balance and positive-rate gap (pure).

Groups come from ``pipeline.identity`` (term lexicons over the text, or a user's group
column); ``Lexicon``, ``assign_groups`` and ``load_gender_lexicon`` are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from pipeline.identity import Lexicon, assign_groups, load_gender_lexicon

__all__ = [
    "DataBiasReport",
    "GroupFigures",
    "LabelRate",
    "Lexicon",
    "assign_groups",
    "check_data_bias",
    "load_gender_lexicon",
]


@dataclass(frozen=True)
class LabelRate:
    """One label's share of a group's rows against the rest's (one-vs-rest)."""

    label: str
    rate: float | None  # share of the group's rows with this label (None: empty group)
    rest_rate: float | None  # the same for rows outside the group
    difference: float | None  # group - rest
    ratio: float | None  # group / rest (None where the rest's rate is 0 or undefined)


@dataclass(frozen=True)
class GroupFigures:
    """One group's figures; ``positive_rate`` and the gap describe the label ``label``.

    With two labels that is the positive (first) label. With more, every label is
    measured one-vs-rest (``per_label``) and the rate fields repeat the label whose rate
    differs most from the rest's (the worst one), which the label-gap flag reads.
    """

    group: str
    rows: int
    share: float
    label_counts: dict[str, int]
    positive_rate: float | None  # share of rows with the positive label
    rest_positive_rate: float | None  # the same for rows outside the group
    rate_difference: float | None  # group - rest
    rate_ratio: float | None  # group / rest
    too_small: bool  # fewer rows than min_group_rows: listed, never judged
    under_represented: bool = False  # share below min_group_share
    label_gap_flagged: bool = False  # |rate_difference| beyond max_label_rate_gap
    label: str = ""  # the label positive_rate .. rate_ratio describe
    per_label: list[LabelRate] = field(default_factory=list)  # more than two labels only


@dataclass(frozen=True)
class DataBiasReport:
    positive_label: str
    min_group_rows: int
    total_rows: int
    groups: list[GroupFigures] = field(default_factory=list)
    min_group_share: float = 0.0
    max_label_rate_gap: float = 1.0
    # More than two labels: every label one-vs-rest; positive_label is then "" and each
    # group names the label its rate fields describe.
    one_vs_rest: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def flags(self) -> list[str]:
        """One line per finding, in group order: too small, under-represented, label gap."""
        lines = []
        for g in self.groups:
            if g.too_small:
                lines.append(
                    f"{g.group}: {_rows(g.rows)}, fewer than {self.min_group_rows}; "
                    "too small to judge"
                )
            if g.under_represented:
                lines.append(
                    f"{g.group}: under-represented, {_rows(g.rows)} of {self.total_rows} "
                    f"({g.share:.1%}), below {self.min_group_share:.1%}"
                )
            if g.label_gap_flagged:
                ratio = "undefined" if g.rate_ratio is None else f"{g.rate_ratio:.2f}"
                worst = " (the label furthest from the rest's)" if self.one_vs_rest else ""
                lines.append(
                    f"{g.group}: '{g.label}'{worst} rate {g.positive_rate:.3f} vs "
                    f"{g.rest_positive_rate:.3f} for the rest (difference "
                    f"{g.rate_difference:+.3f}, ratio {ratio}), beyond the limit "
                    f"{self.max_label_rate_gap:.3f}"
                )
        return lines


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


# Float slack so a gap equal to the limit (0.1 computed as 0.10000000000000003) is not beyond it.
_EPS = 1e-12


def check_data_bias(
    texts: Sequence[str],
    labels: Sequence[str],
    lexicon: Lexicon | None,
    label_set: Sequence[str],
    min_group_rows: int,
    *,
    min_group_share: float = 0.0,
    max_label_rate_gap: float = 1.0,
    membership: pd.DataFrame | None = None,
) -> DataBiasReport:
    """Rows, label balance and positive-rate gap per identity group.

    Args:
        texts, labels: one per row.
        lexicon: identity terms that assign rows to groups (unused when ``membership`` is
            given).
        label_set: the labels. With two, the first is the positive one; with more, every
            label is measured one-vs-rest and each group reports (and is flagged on) the
            label whose rate differs most from the rest's.
        min_group_rows: smaller groups are kept in the report, marked ``too_small``, and
            never flagged for their label gap.
        min_group_share: groups with a smaller share of the rows are ``under_represented``.
        max_label_rate_gap: groups whose positive rate differs from the rest's by more are
            ``label_gap_flagged``.
        membership: boolean rows x groups, e.g. ``identity.groups_from_column(...)`` for a
            user's group column.

    Raises:
        ValueError: lengths disagree, or neither a lexicon nor a membership is given.
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    membership = _membership(texts, lexicon, membership)
    one_vs_rest = len(label_set) > 2
    label_series = pd.Series(list(labels), dtype=object)
    total = len(texts)
    figures = []
    for group in membership.columns:
        inside = membership[group]
        n_in = int(inside.sum())
        share = n_in / total if total else 0.0
        too_small = n_in < min_group_rows
        rates = [
            _label_rate(label_series, inside, lab)
            for lab in (label_set if one_vs_rest else label_set[:1])
        ]
        shown = _furthest(rates)
        figures.append(
            GroupFigures(
                group=str(group),
                rows=n_in,
                share=share,
                label_counts={lab: int((label_series[inside] == lab).sum()) for lab in label_set},
                positive_rate=shown.rate,
                rest_positive_rate=shown.rest_rate,
                rate_difference=shown.difference,
                rate_ratio=shown.ratio,
                too_small=too_small,
                under_represented=share < min_group_share - _EPS,
                label_gap_flagged=not too_small
                and shown.difference is not None
                and abs(shown.difference) > max_label_rate_gap + _EPS,
                label=shown.label,
                per_label=rates if one_vs_rest else [],
            )
        )
    return DataBiasReport(
        "" if one_vs_rest else label_set[0],
        min_group_rows,
        total,
        figures,
        min_group_share,
        max_label_rate_gap,
        one_vs_rest,
    )


def _membership(
    texts: Sequence[str], lexicon: Lexicon | None, membership: pd.DataFrame | None
) -> pd.DataFrame:
    """Boolean rows x groups: the given membership, or the lexicon's groups of the texts."""
    if membership is None:
        if lexicon is None:
            raise ValueError("pass a lexicon or a membership frame to assign groups")
        membership = assign_groups(texts, lexicon)
    elif len(membership) != len(texts):
        raise ValueError(f"membership has {len(membership)} rows but there are {len(texts)} texts")
    return membership.reset_index(drop=True).astype(bool)


def _label_rate(labels: pd.Series, inside: pd.Series, label: str) -> LabelRate:
    """``label``'s share of the rows inside the group against outside it."""
    is_label = labels == label
    n_in, n_out = int(inside.sum()), int((~inside).sum())
    rate = float(is_label[inside].mean()) if n_in else None
    rest = float(is_label[~inside].mean()) if n_out else None
    difference = None if rate is None or rest is None else rate - rest
    ratio = None if rate is None or not rest else rate / rest
    return LabelRate(label, rate, rest, difference, ratio)


def _furthest(rates: list[LabelRate]) -> LabelRate:
    """The label whose rate differs most from the rest's; the first on ties or if none is
    defined (an empty group)."""
    defined = [r for r in rates if r.difference is not None]
    if not defined:
        return rates[0]
    return max(defined, key=lambda r: abs(r.difference or 0.0))
