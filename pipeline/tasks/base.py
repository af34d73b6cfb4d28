"""The seam between kinds of fine-tuning task and everything they share: the protocol.

A kind of task (text classification today; generative chat and translation, image
classification next) is a :class:`TaskKind`: how its data is read, checked and measured,
how its model is built, trained, evaluated, probed for forgetting and bias, and logged for
serving. Everything else (splitting, DVC, GX, the gates, promotion, audit, lineage, the
card, scheduling) is shared and never asks which kind it runs. ``task:`` at the top of the
config names the kind; :func:`get` returns it.

A new kind is one module beside ``text_classification.py`` that implements the protocol,
plus one line in :data:`KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import pandas as pd

    from pipeline import bias, data, fairness, mitigation, promotion, retention, validation
    from pipeline.config import RetuneConfig

Frames = dict[str, "pd.DataFrame"]  # split name -> table (train, validation, test)
Predict = Callable[[Any], Any]  # model inputs -> outputs the kind's metrics read


@dataclass(frozen=True)
class Retention:
    """One model's scores on the retention suite and its per-layer features (for CKA)."""

    outputs: dict[str, Any]  # task name -> forgetting.TaskOutputs
    layers: Any  # np.ndarray (L + 1, N, H)
    cached: bool


@dataclass(frozen=True)
class Baseline:
    """The frozen base model before training: the probe's test metrics, its retention
    scores and the probe's predict function (the bias comparison's reference)."""

    probe: Any  # the kind's metrics report (to_dict(), the primary metric as an attribute)
    retention: Retention
    predict: Predict | None


@dataclass(frozen=True)
class Champion:
    """The model now holding the champion alias, measured on this run's suite."""

    version: str
    retention: Retention
    predict: Predict
    test_report: Any  # its metrics on this run's test split (the policy compares them)
    test_outputs: Any  # its raw outputs there (the bias comparison reads them)


@dataclass
class Trained:
    """A fine-tuned model in memory and saved to ``model_dir`` (what is registered)."""

    model: Any
    processor: Any  # tokenizer or image processor
    result: Any  # finetune.FineTuneResult: history, timings, parameters
    model_dir: Path


@dataclass(frozen=True)
class Evaluation:
    """The tuned model on the test split: task metrics, retention scores, raw outputs."""

    report: Any  # the kind's metrics report
    retention: Retention
    outputs: Any  # e.g. class probabilities (N, K)


class TaskKind(Protocol):
    """What differs between kinds of task. Every method is plain (no Prefect, no MLflow)."""

    name: str

    def identity(self, config: RetuneConfig) -> promotion.ModelIdentity:
        """What kind of model this run makes (task, output labels, input signature)."""
        ...

    def prepare(self, config: RetuneConfig, project_dir: Path) -> data.PreparedData:
        """Read and normalise the user's data into the split tables."""
        ...

    def validate(
        self, config: RetuneConfig, frames: Frames, docs_dir: Path | None, project_dir: Path
    ) -> validation.ValidationReport:
        """The shared GX checks plus the kind's own, on the split tables."""
        ...

    def check_data_bias(
        self, config: RetuneConfig, frames: Frames, project_dir: Path
    ) -> bias.DataBiasReport:
        """Group representation and label rates in the training data."""
        ...

    def retention_suite(
        self, config: RetuneConfig, project_dir: Path, versioned: retention.Suite | None = None
    ) -> retention.Suite:
        """The general tasks the model is never tuned on (the forgetting benchmark), from
        the versioned suite: ``versioned`` (a restored one, for reproduce) or the project's,
        built and committed to DVC when it changed."""
        ...

    def measure_base(
        self,
        config: RetuneConfig,
        train: pd.DataFrame,
        test: pd.DataFrame,
        suite: retention.Suite,
        project_dir: Path,
    ) -> Baseline: ...

    def measure_champion(
        self,
        config: RetuneConfig,
        test: pd.DataFrame,
        suite: retention.Suite,
        project_dir: Path,
        work_dir: Path,
    ) -> Champion | None:
        """The model holding the champion alias, on the suite and the test split; None
        when there is no champion."""
        ...

    def train(
        self,
        config: RetuneConfig,
        train: pd.DataFrame,
        validation: pd.DataFrame,
        run_id: str | None,
        model_dir: Path,
        project_dir: Path,
    ) -> Trained:
        """Build the model from the base, fine-tune it (batches, loss) and save it; what
        depends only on the base and fixed data may be cached under ``project_dir``."""
        ...

    def blend_with_base(
        self,
        config: RetuneConfig,
        trained: Trained,
        validation: pd.DataFrame,
        suite: retention.Suite,
        base: Baseline,
        project_dir: Path,
    ) -> mitigation.AlphaChoice:
        """WiSE-FT: the best-validating blend of tuned and base weights within the budget."""
        ...

    def evaluate(
        self,
        config: RetuneConfig,
        trained: Trained,
        test: pd.DataFrame,
        suite: retention.Suite,
        project_dir: Path,
    ) -> Evaluation: ...

    def check_model_bias(
        self,
        config: RetuneConfig,
        test: pd.DataFrame,
        trained: Trained,
        evaluation: Evaluation,
        base: Baseline,
        champion: Champion | None,
        project_dir: Path,
    ) -> fairness.ModelBiasReport:
        """The bias probes on candidate, base and champion; the bias gate on the candidate."""
        ...

    def loaded_metric(
        self, config: RetuneConfig, model: Any, test: pd.DataFrame, project_dir: Path
    ) -> float:
        """The primary metric, on this test split, of a registered model loaded through
        :func:`pipeline.modelstore.load_version` (a champion that changed mid-run)."""
        ...

    def examples(self, config: RetuneConfig, test: pd.DataFrame, project_dir: Path) -> pd.DataFrame:
        """A few inputs from the test split, as the model's input frame: the registered
        model's input example and its smoke test (image paths resolve in ``project_dir``)."""
        ...

    def log_model(
        self,
        config: RetuneConfig,
        run_id: str,
        model_dir: Path,
        test: pd.DataFrame,
        project_dir: Path,
    ) -> str:
        """Log the saved model for serving (signature, example, requirements); its URI."""
        ...


def load_champion(config: RetuneConfig, work_dir: Path) -> tuple[str, Any] | None:
    """The version holding the champion alias of this run's model name and its loaded
    model (:func:`pipeline.modelstore.load_version`, digest by weights), or None."""
    from pipeline import lineage, modelstore, registry

    try:
        champion = registry.resolve_version(f"{registry.model_name(config)}@{registry.CHAMPION}")
    except registry.ModelRefError:
        return None
    loaded = modelstore.load_version(
        champion.name, champion.version, work_dir, digest=lineage.folder_sha256
    )
    return champion.version, loaded


def sweep_blends(
    config: RetuneConfig,
    model: Any,
    base_state: dict[str, Any],
    validate: Callable[[Any], float],
    score: Callable[[Any], Any],
    base: Baseline,
    suite: retention.Suite,
    part: Callable[[Any], Any],
) -> mitigation.AlphaChoice:
    """WiSE-FT's sweep for any kind (:func:`pipeline.mitigation.wise_ft`): each blend's
    retention outputs (``score``) are compared with the base's and judged by the
    forgetting gate's criteria; the chosen blend stays in ``model``."""
    from pipeline import forgetting
    from pipeline import mitigation as mitigate

    cfg = config.forgetting
    budget = cfg.model_copy(update={"gate": "error"})

    def retain(blend: Any) -> forgetting.Comparison:
        return forgetting.compare(
            base.retention.outputs,
            score(blend),
            suite.tasks,
            "base",
            cfg.bootstrap,
            cfg.seed,
            cfg.report_only,
        )

    return mitigate.wise_ft(
        model,
        base_state,
        cfg.wise_ft_alphas,
        validate,
        retain,
        lambda kept: forgetting.forgetting_gate(kept, budget).passed,
        part,
    )
