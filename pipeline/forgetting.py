"""Forgetting: what fine-tuning destroyed of the base encoder's general knowledge.

Every retention task (:class:`pipeline.retention_tasks.RetentionTask`) scores an encoder
the same way: mean-pooled, L2-normalised embeddings (:func:`pipeline.embeddings.embed_texts`),
for the base model, the candidate and the champion alike. Similarity tasks score the Spearman
correlation of cosine similarity with human ratings; probe tasks the test accuracy of a
logistic regression on the frozen embeddings. The drop is reference - candidate, with a
paired bootstrap 95% interval over the task's items; the gate reads the upper bound of the
mean drop and the worst task's drop.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.evaluate import percentile_interval
from pipeline.gates import FORGETTING, GateOutcome, GateStatus

if TYPE_CHECKING:
    from pipeline.config import ForgettingConfig
    from pipeline.retention_tasks import RetentionTask


# --- scoring an encoder -----------------------------------------------------------------


@dataclass(frozen=True)
class TaskOutputs:
    """One encoder's per-item outputs on one task: what the paired bootstrap resamples."""

    task: str
    items: np.ndarray  # similarity: (P,) cosine per pair; probe: (N_test,) 1.0 where correct
    score: float  # Spearman (similarity) or accuracy (probe)


def score_task(embeddings: np.ndarray, task: RetentionTask, probe_c: float = 1.0) -> TaskOutputs:
    """Score one task from the embeddings of ``task.texts`` (N, H), L2-normalised."""
    if task.kind == "similarity":
        assert task.pairs is not None and task.scores is not None
        a, b = embeddings[task.pairs[:, 0]], embeddings[task.pairs[:, 1]]
        cosine = (a * b).sum(axis=1).astype(np.float64)  # (P,)
        return TaskOutputs(task.name, cosine, _spearman(cosine[None], task.scores[None])[0])
    from sklearn.linear_model import LogisticRegression

    assert task.labels is not None and task.is_test is not None
    train, test = ~task.is_test, task.is_test
    probe = LogisticRegression(C=probe_c, max_iter=2000)
    probe.fit(embeddings[train], task.labels[train])
    correct = (probe.predict(embeddings[test]) == task.labels[test]).astype(np.float64)
    return TaskOutputs(task.name, correct, float(correct.mean()))


def score_encoder(
    encoder: Any,
    tokenizer: Any,
    tasks: list[RetentionTask],
    batch_size: int = 128,
    max_length: int = 256,
) -> dict[str, TaskOutputs]:
    """Every task's outputs for one encoder (fp32: drops of 0.01 matter here)."""
    from pipeline.embeddings import embed_texts

    outputs = {}
    for task in tasks:
        emb = embed_texts(encoder, tokenizer, task.texts, batch_size, max_length, bf16=False)
        outputs[task.name] = score_task(emb, task)
    return outputs


def _spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Spearman correlation of (B, P) arrays -> (B,); NaN where a row is constant."""
    from scipy.stats import rankdata

    rx = rankdata(x, axis=1)
    ry = rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    denom = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (rx * ry).sum(axis=1) / denom, np.nan)


def bootstrap_drops(
    task: RetentionTask,
    reference: TaskOutputs,
    candidate: TaskOutputs,
    resamples: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Drops (reference - candidate) on ``resamples`` paired resamples of the items, (B,)."""
    n = len(reference.items)
    drops = np.empty(resamples)
    chunk = max(1, 2_000_000 // max(n, 1))  # bound the (chunk, n) index matrices' memory
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        if task.kind == "similarity":
            assert task.scores is not None
            human = task.scores[idx]
            drops[start : start + len(idx)] = _spearman(reference.items[idx], human) - _spearman(
                candidate.items[idx], human
            )
        else:
            drops[start : start + len(idx)] = reference.items[idx].mean(1) - candidate.items[
                idx
            ].mean(1)
    return drops


# What each kind of retention task scores (a likelihood's drop is in nats per token).
METRIC_OF_KIND = {
    "similarity": "spearman",
    "probe": "accuracy",
    "likelihood": "log-likelihood",
    "agreement": "agreement",  # images: the base's ImageNet predictions kept (top-1, top-5)
}


@dataclass(frozen=True)
class TaskDrop:
    task: str
    kind: str
    metric: str  # "spearman", "accuracy" or "log-likelihood" (see METRIC_OF_KIND)
    items: int
    reference: float
    candidate: float
    drop: float  # reference - candidate; positive = forgot
    retention: float  # candidate / reference; likelihood: perplexity base / tuned
    ci_low: float  # paired bootstrap 95% interval of the drop
    ci_high: float
    gated: bool = True  # False: reported only (forgetting.report_only), not in the mean


@dataclass(frozen=True)
class Comparison:
    """A candidate against one reference (the base model or the champion), task by task."""

    reference: str
    tasks: list[TaskDrop]
    mean_drop: float
    mean_ci_low: float
    mean_ci_high: float
    worst_task: str
    worst_drop: float


def _retention(kind: str, reference: float, candidate: float) -> float:
    """What share the candidate kept: its score over the reference's; for a likelihood
    (log-probabilities, negative) the base's perplexity over the candidate's."""
    if kind == "likelihood":
        return math.exp(candidate - reference)
    return candidate / reference if reference else math.nan


def compare(
    reference: dict[str, TaskOutputs],
    candidate: dict[str, TaskOutputs],
    tasks: list[RetentionTask],
    reference_name: str = "base",
    resamples: int = 1000,
    seed: int = 0,
    report_only: Sequence[str] = (),
) -> Comparison:
    """Per-task drops with paired bootstrap intervals, and the mean and worst drop.

    The mean's interval comes from the per-resample means over tasks (each task resampled
    independently, the same number of times). Tasks named in ``report_only`` get their
    row but stay out of the mean and the worst (unless every task is report-only).
    """
    if not tasks:
        raise ValueError("compare needs at least one retention task")
    rows, per_resample = [], []
    for i, task in enumerate(tasks):
        ref, cand = reference[task.name], candidate[task.name]
        if len(ref.items) != len(cand.items):
            raise ValueError(
                f"retention task '{task.name}': the reference has {len(ref.items)} items, the "
                f"candidate {len(cand.items)}; they were scored on different suite versions"
            )
        drops = bootstrap_drops(task, ref, cand, resamples, np.random.default_rng([seed, i]))
        per_resample.append(drops)
        low, high = percentile_interval(drops)
        rows.append(
            TaskDrop(
                task=task.name,
                kind=task.kind,
                metric=METRIC_OF_KIND[task.kind],
                items=len(ref.items),
                reference=ref.score,
                candidate=cand.score,
                drop=ref.score - cand.score,
                retention=_retention(task.kind, ref.score, cand.score),
                ci_low=low,
                ci_high=high,
                gated=task.name not in report_only,
            )
        )
    gated = [i for i, r in enumerate(rows) if r.gated] or list(range(len(rows)))
    means = np.mean(np.stack([per_resample[i] for i in gated]), axis=0)
    mean_low, mean_high = percentile_interval(means)
    worst = max((rows[i] for i in gated), key=lambda r: r.drop)
    return Comparison(
        reference=reference_name,
        tasks=rows,
        mean_drop=float(np.mean([rows[i].drop for i in gated])),
        mean_ci_low=mean_low,
        mean_ci_high=mean_high,
        worst_task=worst.task,
        worst_drop=worst.drop,
    )


# --- the gate ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    mode: str  # "error" refuses a failing model; "warn" reports; "off" skips the check
    failures: list[str]

    @property
    def refused(self) -> bool:
        return not self.passed and self.mode == "error"

    def summary(self) -> str:
        if self.mode == "off":
            return "off"
        if self.passed:
            return "passed"
        return ("refused: " if self.mode == "error" else "warning: ") + "; ".join(self.failures)

    def outcome(self) -> GateOutcome:
        status = (
            GateStatus.OFF
            if self.mode == "off"
            else GateStatus.PASSED
            if self.passed
            else GateStatus.REFUSED
            if self.mode == "error"
            else GateStatus.WARNED
        )
        return GateOutcome(FORGETTING, status, self.summary())


def forgetting_gate(base: Comparison, config: ForgettingConfig) -> GateVerdict:
    """Pass if the mean drop's upper 95% bound and every task's drop are within limits."""
    failures = []
    if config.gate != "off":
        if not base.mean_ci_high <= config.max_mean_drop:  # NaN fails too
            failures.append(
                f"mean drop {base.mean_drop:.3f} (95% CI {base.mean_ci_low:.3f} to "
                f"{base.mean_ci_high:.3f}): upper bound above {config.max_mean_drop:.3f}"
            )
        for row in base.tasks:
            if row.gated and not row.drop <= config.max_task_drop:
                failures.append(
                    f"{row.task}: {row.metric} {row.reference:.3f} -> {row.candidate:.3f}, drop "
                    f"{row.drop:.3f} (95% CI {row.ci_low:.3f} to {row.ci_high:.3f}) above "
                    f"{config.max_task_drop:.3f}"
                )
    return GateVerdict(passed=not failures, mode=config.gate, failures=failures)


# --- CKA --------------------------------------------------------------------------------


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two representations of the same N inputs, (N, D1) and (N, D2).

    1.0 for identical representations (up to rotation and isotropic scaling).
    """
    x = x.astype(np.float64) - x.mean(axis=0, keepdims=True)
    y = y.astype(np.float64) - y.mean(axis=0, keepdims=True)
    cross = np.linalg.norm(y.T @ x) ** 2
    denom = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / denom) if denom > 0 else math.nan


def layer_cka(base_layers: np.ndarray, candidate_layers: np.ndarray) -> list[float]:
    """CKA per layer of (L + 1, N, H) stacks from :func:`pipeline.embeddings.embed_layers`."""
    if base_layers.shape[:2] != candidate_layers.shape[:2]:
        raise ValueError(
            f"CKA needs the same layers and texts, got {base_layers.shape} and "
            f"{candidate_layers.shape}"
        )
    return [linear_cka(b, c) for b, c in zip(base_layers, candidate_layers, strict=True)]


def cka_texts(tasks: list[RetentionTask], count: int) -> list[str]:
    """A fixed probe set: ``count`` texts evenly spaced over every task's texts."""
    texts = [t for task in tasks for t in task.texts]
    if len(texts) <= count:
        return texts
    return [texts[i] for i in np.linspace(0, len(texts) - 1, count).round().astype(int)]


# --- the base model's scores, cached -----------------------------------------------------


def cache_file(cache_dir: Path, weights_sha: str, suite_md5: str) -> Path:
    """Where one encoder's outputs on one suite version are cached."""
    return cache_dir / f"retention-{weights_sha[:20]}-{suite_md5.replace('.', '_')}.npz"


def load_cached(
    path: Path, tasks: list[RetentionTask]
) -> tuple[dict[str, TaskOutputs], np.ndarray] | None:
    """Cached outputs and CKA layers, or None if absent or not for these tasks."""
    if not path.is_file():
        return None
    with np.load(path) as saved:
        if any(f"{t.name}.items" not in saved for t in tasks) or "layers" not in saved:
            return None
        outputs = {
            t.name: TaskOutputs(t.name, saved[f"{t.name}.items"], float(saved[f"{t.name}.score"]))
            for t in tasks
        }
        return outputs, saved["layers"]


def save_cached(path: Path, outputs: dict[str, TaskOutputs], layers: np.ndarray) -> None:
    arrays: dict[str, np.ndarray] = {"layers": layers}
    for name, out in outputs.items():
        arrays[f"{name}.items"] = out.items
        arrays[f"{name}.score"] = np.asarray(out.score)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)  # atomic: concurrent runs never read a torn cache file


# --- the report -------------------------------------------------------------------------


@dataclass(frozen=True)
class ForgettingReport:
    suite_md5: str
    base: Comparison
    gate: GateVerdict
    champion: Comparison | None = None
    champion_version: str | None = None
    cka: list[float] = field(default_factory=list)  # base vs candidate; index 0 = embeddings
    warnings: list[str] = field(default_factory=list)
    mitigation: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["gate"]["refused"] = self.gate.refused
        body["gate"]["summary"] = self.gate.summary()
        return json.loads(json.dumps(body, default=_jsonable))

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the MLflow run."""
        out = {
            "forgetting_mean_drop": self.base.mean_drop,
            "forgetting_mean_drop_ci_high": self.base.mean_ci_high,
            "forgetting_worst_drop": self.base.worst_drop,
        }
        for row in self.base.tasks:
            out[f"retention_{row.task}_base"] = row.reference
            out[f"retention_{row.task}"] = row.candidate
            out[f"retention_{row.task}_drop"] = row.drop
        if self.champion is not None:
            out["forgetting_vs_champion_mean_drop"] = self.champion.mean_drop
        for i, value in enumerate(self.cka):
            out[f"cka_layer_{i}"] = value
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def table_rows(self) -> list[tuple[str, ...]]:
        """(task, metric, base, tuned, drop, 95% CI, retention, vs champion) per task + mean."""
        champ = {r.task: r for r in self.champion.tasks} if self.champion else {}
        rows = []
        for r in self.base.tasks:
            vs = champ.get(r.task)
            rows.append(
                (
                    r.task if r.gated else f"{r.task} (reported)",
                    r.metric,
                    f"{r.reference:.3f}",
                    f"{r.candidate:.3f}",
                    f"{r.drop:+.3f}",
                    f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}]",
                    f"{r.retention:.0%}",
                    f"{vs.drop:+.3f}" if vs else "-",
                )
            )
        b = self.base
        rows.append(
            (
                "mean",
                "",
                "",
                "",
                f"{b.mean_drop:+.3f}",
                f"[{b.mean_ci_low:+.3f}, {b.mean_ci_high:+.3f}]",
                "",
                f"{self.champion.mean_drop:+.3f}" if self.champion else "-",
            )
        )
        return rows


TABLE_HEADER = ("task", "metric", "base", "tuned", "drop", "95% CI", "kept", "vs champion")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def evaluate_forgetting(
    base: dict[str, TaskOutputs],
    candidate: dict[str, TaskOutputs],
    tasks: list[RetentionTask],
    config: ForgettingConfig,
    suite_md5: str,
    base_layers: np.ndarray | None = None,
    candidate_layers: np.ndarray | None = None,
    champion: dict[str, TaskOutputs] | None = None,
    champion_version: str | None = None,
    warnings: list[str] | None = None,
    mitigation: dict[str, Any] | None = None,
) -> ForgettingReport:
    """Compare the candidate with the base (gated) and the champion (reported)."""
    vs_base = compare(
        base, candidate, tasks, "base", config.bootstrap, config.seed, config.report_only
    )
    vs_champion = (
        compare(
            champion,
            candidate,
            tasks,
            f"champion v{champion_version}",
            config.bootstrap,
            config.seed,
            config.report_only,
        )
        if champion is not None
        else None
    )
    cka = (
        layer_cka(base_layers, candidate_layers)
        if base_layers is not None and candidate_layers is not None
        else []
    )
    return ForgettingReport(
        suite_md5=suite_md5,
        base=vs_base,
        gate=forgetting_gate(vs_base, config),
        champion=vs_champion,
        champion_version=champion_version,
        cka=cka,
        warnings=list(warnings or []),
        mitigation=dict(mitigation or {}),
    )
