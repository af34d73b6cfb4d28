"""Plots written as PNG files (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

from pipeline.finetune import FineTuneResult


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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
