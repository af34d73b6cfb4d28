"""Plots written as PNG files (matplotlib, no display)."""

from __future__ import annotations

import base64
import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.finetune import FineTuneResult
    from pipeline.forgetting import ForgettingReport
    from pipeline.mitigation import AlphaChoice


def plot_learning_curve(result: FineTuneResult, path: Path) -> Path:
    """Training loss per step, and validation loss and accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(range(1, len(result.loss_curve) + 1), result.loss_curve, lw=0.8, label="train (step)")
    if result.history and result.loss_curve:
        steps_per_epoch = len(result.loss_curve) / len(result.history)
        ends = [round(steps_per_epoch * h.epoch) for h in result.history]
        left.plot(ends, [h.val_loss for h in result.history], "o-", label="validation (epoch)")
    left.set(xlabel="step", ylabel="loss", title="loss")
    left.legend()
    epochs = [h.epoch for h in result.history]
    right.plot(epochs, [h.val_accuracy for h in result.history], "o-", label="accuracy")
    right.plot(epochs, [h.val_macro_f1 for h in result.history], "s-", label="macro-F1")
    right.axvline(result.best_epoch, ls="--", c="grey", label=f"best epoch {result.best_epoch}")
    right.set(xlabel="epoch", title="validation")
    right.legend()
    return _save(fig, path)


def plot_forgetting(report: ForgettingReport, path: Path) -> Path:
    """Base vs tuned score per retention task; the tuned bar's whisker is the drop's 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = report.base.tasks
    x = np.arange(len(rows))
    base = np.array([r.reference for r in rows])
    tuned = np.array([r.candidate for r in rows])
    # tuned = base - drop, so the drop's interval [lo, hi] maps to [base - hi, base - lo].
    lower = tuned - (base - np.array([r.ci_high for r in rows]))
    upper = (base - np.array([r.ci_low for r in rows])) - tuned
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows) + 2), 4))
    ax.bar(x - 0.2, base, 0.4, label="base")
    ax.bar(
        x + 0.2,
        tuned,
        0.4,
        yerr=np.stack([np.clip(lower, 0, None), np.clip(upper, 0, None)]),
        capsize=4,
        label="tuned (95% CI)",
    )
    ax.set_xticks(x, [f"{r.task}\n({r.metric})" for r in rows])
    ax.set(ylabel="score", title=f"retention: gate {report.gate.summary()[:60]}")
    ax.legend()
    return _save(fig, path)


def plot_alpha_curve(choice: AlphaChoice, path: Path) -> Path:
    """WiSE-FT: validation metric and mean retention drop against alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [p.alpha for p in choice.curve]
    fig, left = plt.subplots(figsize=(6, 4))
    left.plot(alphas, [p.val_metric for p in choice.curve], "o-", c="C0")
    left.set(xlabel="alpha (0 = base encoder, 1 = tuned)", ylabel="validation metric")
    right = left.twinx()
    right.plot(alphas, [p.mean_drop for p in choice.curve], "s--", c="C1")
    right.plot(alphas, [p.mean_drop_ci_high for p in choice.curve], ":", c="C1")
    right.set_ylabel("mean retention drop (and upper 95% bound)")
    left.axvline(choice.alpha, ls="--", c="grey")
    left.set_title(f"WiSE-FT: chose alpha {choice.alpha}")
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- charts embedded in the HTML reports (base64 PNG, no pyplot state) --------------------


def group_bars_png(
    title: str, groups: Sequence[str], series: Sequence[tuple[str, Sequence[float]]]
) -> str:
    """:func:`group_bars_figure` as a base64 PNG."""
    return _png(group_bars_figure(title, groups, series))


def group_bars_figure(
    title: str, groups: Sequence[str], series: Sequence[tuple[str, Sequence[float]]]
) -> Any:
    """Horizontal grouped bars of rates in [0, 1], one row per group (a matplotlib Figure).

    Horizontal so that any number of long group names stays readable (each name on its
    own row, wrapped at 28 characters); a NaN draws no bar and is labelled "n/a".

    Args:
        groups: the row labels, top to bottom.
        series: (name, one value per group) per model, drawn side by side in each row.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    k = max(1, len(series))
    bar = 0.8 / k
    fig = Figure(figsize=(7.5, max(1.8, 0.22 * k * len(groups) + 0.35 * len(groups) + 1.0)))
    ax = fig.subplots()
    for j, (name, values) in enumerate(series):
        y = [i + (j - (k - 1) / 2) * bar for i in range(len(groups))]
        heights = [v if math.isfinite(v) else 0.0 for v in values]
        ax.barh(y, heights, bar, label=name, color=f"C{j}")
        for yi, v in zip(y, values, strict=True):
            text = f"{v:.3f}" if math.isfinite(v) else "n/a"
            ax.text(
                min(v, 1.0) + 0.01 if math.isfinite(v) else 0.01, yi, text, va="center", fontsize=7
            )
    ax.set_yticks(range(len(groups)), [textwrap.fill(g, 28) for g in groups], fontsize=8)
    ax.invert_yaxis()  # first group on top, as in the tables
    ax.set(xlim=(0, 1.12), title=title)
    if k > 1:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars
    fig.tight_layout()
    return fig


def forgetting_chart_png(report: ForgettingReport) -> str:
    """Base vs tuned score per retention task as horizontal bars; base64 PNG."""
    rows = report.base.tasks
    names = [f"{r.task} ({r.metric})" for r in rows]
    return group_bars_png(
        "retention: base vs tuned score",
        names,
        [("base", [r.reference for r in rows]), ("tuned", [r.candidate for r in rows])],
    )


def _png(fig: Any) -> str:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_confusion(confusion: list[list[int]], labels: Sequence[str], path: Path) -> Path:
    """The confusion matrix (rows true, columns predicted): colour is the row fraction, text
    the count, so a rare class's errors show as clearly as a common one's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(confusion, dtype=int)  # (K, K)
    k = len(labels)
    if counts.shape != (k, k):
        raise ValueError(f"confusion has shape {counts.shape} but labels has {k} entries")
    totals = counts.sum(axis=1, keepdims=True)
    fraction = counts / np.maximum(totals, 1)  # a class absent from the truth draws a blank row
    side = max(4.0, 0.6 * k + 2.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            colour = "white" if fraction[i, j] > 0.5 else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(k), list(labels), rotation=45, ha="right")
    ax.set_yticks(range(k), list(labels))
    ax.set(xlabel="predicted", ylabel="true", title="confusion (colour: fraction of true row)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)
