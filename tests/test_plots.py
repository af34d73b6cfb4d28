"""The report charts: every label readable, none drawn over another."""

from __future__ import annotations

import itertools
import math

import pytest

from pipeline.plots import group_bars_figure

# Long, similar names as a real identity column holds them, and a count that crowds a chart.
GROUPS = [
    f"{name} (n={n})"
    for name, n in zip(
        [
            "women over sixty living in rural areas",
            "women over sixty living in urban areas",
            "men under thirty",
            "non-binary",
            "unknown",
            "very long group name without any space" + "x" * 30,
            "b",
            "c",
            "d",
            "e",
            "f",
            "g",
        ],
        range(10, 130, 10),
        strict=True,
    )
]


def _boxes(texts) -> list:
    return [t.get_window_extent() for t in texts if t.get_text() and t.get_visible()]


def _overlapping(boxes) -> list[tuple[int, int]]:
    return [
        (i, j) for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2) if a.overlaps(b)
    ]


@pytest.mark.parametrize("models", [1, 2, 3])
def test_group_names_and_values_never_overlap(models: int):
    values = [[(i * 0.07 + m * 0.2) % 1.0 for i in range(len(GROUPS))] for m in range(models)]
    values[0][3] = math.nan  # drawn as "n/a"
    series = [(f"model {m}", values[m]) for m in range(models)]
    fig = group_bars_figure("false-negative rate by group", GROUPS, series)
    fig.canvas.draw()
    ax = fig.axes[0]

    names = ax.get_yticklabels()
    # Every name in full (wrapped onto lines, a long word broken), in the given order.
    assert ["".join(t.get_text().split()) for t in names] == ["".join(g.split()) for g in GROUPS]
    assert _overlapping(_boxes(names)) == []
    assert _overlapping(_boxes(ax.texts)) == []  # the value printed at each bar
    assert sorted(t.get_text() for t in ax.texts if t.get_text() == "n/a") == ["n/a"]
    figure = fig.bbox
    for box in _boxes([*names, *ax.texts, ax.title]):  # nothing is cut off at the edges
        assert box.x0 >= figure.x0 - 1 and box.x1 <= figure.x1 + 1
        assert box.y0 >= figure.y0 - 1 and box.y1 <= figure.y1 + 1
    if models > 1:
        legend = ax.get_legend().get_window_extent()
        assert not any(legend.overlaps(b) for b in _boxes(ax.texts))
