"""The model card: Markdown, and a self-contained HTML rendering of it, from one run's records.

Pure: the caller fetches the JSON reports the retrain flow logs (``reports/<name>.json``)
and the run's lineage tags, and logs or prints the result. Any report may be missing (an
older run, a refused one): its section then says "not recorded" instead of failing.

Reports read, by name (the ``to_dict()`` of each class):

- ``validation``: :class:`pipeline.validation.ValidationReport`
- ``data_bias``: :class:`pipeline.bias.DataBiasReport`
- ``test_metrics``, ``probe_baseline``: :class:`pipeline.evaluate.EvaluationReport`
- ``forgetting``: :class:`pipeline.forgetting.ForgettingReport`
- ``bias``: :class:`pipeline.fairness.ModelBiasReport`
- ``training``: :class:`pipeline.finetune.FineTuneResult` as a dict
- ``config``: :class:`pipeline.config.RetuneConfig` ``model_dump()``
- ``rows`` (optional): rows per split, e.g. ``{"train": 8530, "train_used": 1000, ...}``

Text taken from the records is escaped, so a ``|`` in a label cannot break a table and
``<script>`` stays text in both renderings.
"""

from __future__ import annotations

import html
import math
import re
import shlex
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import tags as tag

NOT_RECORDED = "not recorded"
NA = "n/a"
# The project's own MLflow store, relative to the project folder (pipeline.tracking).
EMBEDDED_TRACKING_URI = "sqlite:///mlflow/mlflow.db"

# Lineage tag keys (pipeline.lineage and flows.retrain; repeated here to stay import-free).

# What Markdown (CommonMark + GFM tables) could read as syntax inside a line: "<" starts
# HTML, "[" links, "&" entities, "|" table cells; "_" only at a word's edge (intraword
# underscores never make emphasis, so val_loss stays readable).
_MD_SPECIAL = re.compile(r"[\\`*\[<|&~#]|(?<![^\W_])_|_(?![^\W_])")
# What would open a block at the start of a list item: a nested list, a quote.
_BLOCK_START = re.compile(r"^(\d{1,9})([.)])|^([-+>=])")
_PUNCTUATION = frozenset(string.punctuation)


@dataclass(frozen=True)
class CardInputs:
    """What one card is made from.

    Attributes:
        version: the registered version, or None for a run that was not registered.
        reports: the run's JSON reports by name (see the module docstring); any may be absent.
        tags: the run's (and version's) lineage tags, ``retune.*``.
        verdict: the promotion verdict's one-line summary, if there was one.
    """

    model_name: str
    version: str | None
    reports: dict[str, dict[str, Any]]
    tags: dict[str, str]
    run_id: str
    verdict: str | None = None


def render_card(inputs: CardInputs) -> str:
    """The model card as Markdown (GitHub-flavoured: headings, lists, tables, code).

    Sections: title, intended use, model, data, test metrics, per-group metrics,
    forgetting, bias, limitations, reproduce.
    """
    blocks = [
        *_title(inputs),
        *_intended_use(inputs),
        *_model(inputs),
        *_data(inputs),
        *_test_metrics(inputs),
        *_group_metrics(inputs),
        *_forgetting(inputs),
        *_bias(inputs),
        *_limitations(inputs),
        *_reproduce(inputs),
    ]
    return "\n\n".join(blocks) + "\n"


# --- formatting ---------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _num(value: Any, digits: int = 4) -> str:
    """``0.8123`` with ``digits`` decimals; None, NaN and non-numbers as n/a."""
    x = _finite(value)
    return NA if x is None else f"{x:.{digits}f}"


def _signed(value: Any, digits: int = 3) -> str:
    x = _finite(value)
    return NA if x is None else f"{x:+.{digits}f}"


def _pct(value: Any) -> str:
    x = _finite(value)
    return NA if x is None else f"{x:.1%}"


def _count(value: Any) -> str:
    x = _finite(value)
    return NA if x is None else f"{int(x):,}"


def _interval(low: Any, high: Any, digits: int = 3) -> str:
    if _finite(low) is None and _finite(high) is None:
        return NA
    return f"{_signed(low, digits)} to {_signed(high, digits)}"


def _param(value: Any) -> str:
    """A config value as written (``0.0001``, ``True``, ``None``), for hyperparameters."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _md(text: Any) -> str:
    """Plain text made literal in Markdown: syntax characters backslash-escaped, one line."""
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(), " ".join(str(text).split()))


def _code(text: Any) -> str:
    """An inline code span holding ``text`` literally (longer fences around backticks)."""
    text = " ".join(str(text).split()) or NA
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> str:
    """A GFM table; every cell is escaped text.

    Args:
        align: ``l`` or ``r`` per column; by default the first left, the rest right.
    """
    align = align or "l" + "r" * (len(header) - 1)
    lines = [
        "| " + " | ".join(_md(h) for h in header) + " |",
        "| " + " | ".join("---:" if a == "r" else "---" for a in align) + " |",
    ]
    lines += ["| " + " | ".join(NA if c is None else _md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _bullets(items: Iterable[str]) -> str:
    """A ``- `` list; an item starting like a block (``1.``, ``-``, ``>``) is escaped."""
    return "\n".join(f"- {_BLOCK_START.sub(_escape_block, item, count=1)}" for item in items)


def _escape_block(m: re.Match[str]) -> str:
    if m.group(1):
        return f"{m.group(1)}\\{m.group(2)}"
    return "\\" + m.group(3)


def _section(title: str) -> str:
    return f"## {title}"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _not_recorded(what: str) -> str:
    return f"{_md(what)}: {NOT_RECORDED}."


def _sentence(text: str) -> str:
    """One line ending in a full stop (not doubled after text that already has one)."""
    text = " ".join(text.split())
    return text if text.endswith((".", "!", "?")) else text + "."


# --- what several sections read ----------------------------------------------------------


def _config(inputs: CardInputs, section: str) -> dict[str, Any]:
    return _dict(_dict(inputs.reports.get("config")).get(section))


def _labels(inputs: CardInputs) -> list[str]:
    labels = _config(inputs, "data").get("labels")
    if not labels:
        per_class = _list(_dict(inputs.reports.get("test_metrics")).get("per_class"))
        labels = [c.get("label") for c in per_class if isinstance(c, dict)]
    if not labels:
        labels = _dict(inputs.reports.get("bias")).get("labels")
    return [str(label) for label in _list(labels) if label is not None]


def _base_model(inputs: CardInputs) -> str | None:
    return inputs.tags.get(tag.BASE_MODEL) or _config(inputs, "train").get("base_model")


def _dataset(inputs: CardInputs) -> str | None:
    data = _config(inputs, "data")
    return inputs.tags.get(tag.DATASET) or data.get("name") or data.get("source")


def _english_only(base_model: str | None) -> bool:
    """The MiniLM sentence encoders retune ships with were pretrained on English only."""
    name = (base_model or "").lower()
    return "minilm" in name and "multilingual" not in name


def _ref(inputs: CardInputs) -> str:
    if inputs.version is None:
        return inputs.model_name
    return f"{inputs.model_name}/{inputs.version}"


# --- sections -----------------------------------------------------------------------------


def _title(inputs: CardInputs) -> list[str]:
    version = f"version {inputs.version}" if inputs.version else "(not registered)"
    items = [
        f"**Model:** {_code(inputs.model_name)} {_md(version)}",
        f"**MLflow run:** {_code(inputs.run_id)}",
        f"**Promotion:** {_md(inputs.verdict) if inputs.verdict else NOT_RECORDED}",
    ]
    if tag.VERDICT in inputs.tags:
        items.append(f"**Gates:** {_md(inputs.tags[tag.VERDICT])}")
    if inputs.tags.get(tag.FLAGGED):
        items.append(f"**Flagged:** {_md(inputs.tags[tag.FLAGGED])}")
    return [f"# Model card: {_md(inputs.model_name)} {_md(version)}", _bullets(items)]


def _intended_use(inputs: CardInputs) -> list[str]:
    labels = _labels(inputs)
    base = _base_model(inputs)
    dataset = _dataset(inputs)
    max_length = _config(inputs, "train").get("max_length")
    items = []
    if labels:
        items += [
            f"**Task:** text classification into {len(labels)} labels: "
            + ", ".join(_code(label) for label in labels)
            + ". Every input gets exactly one of them, even when none fits.",
            f"**Positive label:** {_code(labels[0])}, the first configured label: the bias "
            "figures (selection rate, false positive and false negative rates) count it as "
            "positive, one-vs-rest."
            if len(labels) <= 2
            else f"**Bias figures:** one-vs-rest for each of the {len(labels)} labels (each "
            "in turn positive, every other label negative); the per-group figures and the "
            "bias gate read the worst label, named in the per-group section.",
        ]
    else:
        items.append(f"**Labels:** {NOT_RECORDED}.")
    if dataset:
        items.append(
            f"**Trained on:** dataset {_code(dataset)}; it is meant for text like that data."
        )
    else:
        items.append(f"**Trained on:** dataset {NOT_RECORDED}.")
    if max_length is not None:
        items.append(
            f"**Input:** one text; a text longer than {_param(max_length)} tokens is truncated."
        )
    language = (
        "English (the base model was pretrained on English text)"
        if _english_only(base)
        else "the language of the training data"
    )
    items.append(
        f"**Out of scope:** languages other than {language}; domains unlike the training "
        "data; labels outside the set above; automated decisions about people without "
        "human review."
    )
    return [_section("Intended use"), _bullets(items)]


def _model(inputs: CardInputs) -> list[str]:
    train = _config(inputs, "train")
    keep = _config(inputs, "forgetting")
    training = _dict(inputs.reports.get("training"))
    base = _base_model(inputs)
    sha = inputs.tags.get(tag.BASE_MODEL_SHA256)
    items = []
    if base:
        weights = f" (weights sha256 {_code(sha[:16] + '…')})" if sha else ""
        if sha and sha.startswith("unresolved:"):
            weights = " (weights not hashed: not a local folder)"
        items.append(f"**Base model:** {_code(base)}{weights}")
    else:
        items.append(f"**Base model:** {NOT_RECORDED}")
    items.append(f"**Strategy:** {_strategy(train)}")
    items.append(f"**Training:** {_training(train, training)}")
    if train:
        extras = [
            f"learning rate {_param(train.get('learning_rate'))} (head "
            f"{_param(train.get('head_learning_rate'))})",
            f"batch size {_param(train.get('batch_size'))}",
            f"max length {_param(train.get('max_length'))} tokens",
            f"seed {_param(train.get('seed'))}",
        ]
        if train.get("layer_lr_decay") is not None:
            extras.append(f"layer-wise learning-rate decay {_param(train['layer_lr_decay'])}")
        if train.get("class_weights") == "balanced":
            extras.append("class-balanced loss weights")
        if (train.get("nproc_per_node") or 1) * (train.get("nnodes") or 1) > 1:
            extras.append(
                f"data-parallel over {train.get('nproc_per_node')} processes x "
                f"{train.get('nnodes')} nodes"
            )
        items.append("**Hyperparameters:** " + _md(", ".join(extras)))
    items.append(f"**Mitigations against forgetting:** {_mitigations(inputs, keep)}")
    commit = inputs.tags.get(tag.GIT_COMMIT)
    if commit:
        dirty = " (uncommitted changes in the working tree)" if _dirty(inputs) else ""
        config_hash = inputs.tags.get(tag.CONFIG_HASH)
        hashed = f"; config hash {_code(config_hash)}" if config_hash else ""
        items.append(f"**Code:** git commit {_code(commit)}{dirty}{hashed}")
    return [_section("Model"), _bullets(items)]


def _strategy(train: dict[str, Any]) -> str:
    strategy = train.get("strategy")
    if strategy is None:
        return NOT_RECORDED
    if strategy == "head":
        how = "the encoder is frozen; only the new classification head trains."
    elif strategy == "partial":
        how = (
            f"the embeddings and the first {_param(train.get('frozen_layers'))} encoder layers "
            "are frozen; the other layers and a new classification head train."
        )
    elif strategy == "full":
        how = "every weight of the encoder and a new classification head trains."
    elif strategy == "lora":
        kept = (
            "merged into the saved weights"
            if train.get("lora_merge", True)
            else "also kept as a separate adapter (the served model is merged)"
        )
        targets = ", ".join(str(t) for t in _list(train.get("lora_target_modules")))
        how = (
            f"LoRA adapters (r={_param(train.get('lora_r'))}, alpha "
            f"{_param(train.get('lora_alpha'))}, dropout {_param(train.get('lora_dropout'))}) "
            f"on {targets or NA} and a new classification head train; {kept}."
        )
    elif strategy == "lp-ft":
        how = (
            f"a linear probe (encoder frozen) for {_param(train.get('lpft_probe_epochs'))} "
            "epochs, then full fine-tuning."
        )
    else:
        how = ""
    return f"{_code(strategy)}" + (f": {_md(how)}" if how else "")


def _training(train: dict[str, Any], training: dict[str, Any]) -> str:
    if not training:
        return NOT_RECORDED
    history = [h for h in _list(training.get("history")) if isinstance(h, dict)]
    best = training.get("best_epoch")
    best_record = next((h for h in reversed(history) if h.get("epoch") == best), None)
    parts = [
        f"{len(history)} epochs run"
        + (f" of {_epochs(train)} configured" if "epochs" in train else "")
        + (
            f" (early stopping on {train['early_stopping_metric']}, patience "
            f"{_param(train.get('patience'))})"
            if "early_stopping_metric" in train
            else ""
        ),
        f"best epoch {_param(best)}"
        + (
            f" (validation loss {_num(best_record.get('val_loss'))}, accuracy "
            f"{_num(best_record.get('val_accuracy'))}, macro-F1 "
            f"{_num(best_record.get('val_macro_f1'))})"
            if best_record
            else ""
        ),
        f"{_num(training.get('train_seconds'), 1)} s on {training.get('device', NA)} "
        f"(bf16 {'on' if training.get('bf16') else 'off'})",
        f"{_count(training.get('trainable_parameters'))} of "
        f"{_count(training.get('total_parameters'))} parameters trainable",
    ]
    return _md("; ".join(parts))


def _epochs(train: dict[str, Any]) -> str:
    if train.get("strategy") == "lp-ft":  # the probe phase's epochs come first
        probe = train.get("lpft_probe_epochs")
        return f"{_param(probe)} probe + {_param(train['epochs'])} full"
    return _param(train["epochs"])


def _mitigations(inputs: CardInputs, keep: dict[str, Any]) -> str:
    if not keep:
        return NOT_RECORDED
    parts = []
    distill = _finite(keep.get("distill")) or 0.0
    l2sp = _finite(keep.get("l2sp")) or 0.0
    parts.append(
        f"embedding distillation toward the base model, weight {_param(distill)}"
        if distill > 0
        else "no embedding distillation"
    )
    parts.append(f"L2-SP, weight {_param(l2sp)}" if l2sp > 0 else "no L2-SP")
    if keep.get("wise_ft"):
        mitigation = _dict(_dict(inputs.reports.get("forgetting")).get("mitigation"))
        choice = _dict(mitigation.get("wise_ft"))
        if choice:
            reason = f" ({choice['reason']})" if choice.get("reason") else ""
            parts.append(f"WiSE-FT weight blending, alpha {_param(choice.get('alpha'))}{reason}")
        else:
            parts.append("WiSE-FT weight blending (chosen alpha not recorded)")
    else:
        parts.append("no WiSE-FT")
    return _md("; ".join(parts))


def _dirty(inputs: CardInputs) -> bool:
    return inputs.tags.get(tag.GIT_DIRTY) == "true"


def _data(inputs: CardInputs) -> list[str]:
    data = _config(inputs, "data")
    dataset = _dataset(inputs)
    items = []
    if dataset:
        md5 = inputs.tags.get(tag.DATA_MD5)
        items.append(f"**Dataset:** {_code(dataset)}" + (f", DVC md5 {_code(md5)}" if md5 else ""))
    else:
        items.append(f"**Dataset:** {NOT_RECORDED}")
    if inputs.tags.get(tag.DATA_DVC_MD5):
        remote = inputs.tags.get(tag.DVC_REMOTE)
        items.append(
            f"**Data version:** {_code('data/')} as a whole hashed to "
            f"{_code(inputs.tags[tag.DATA_DVC_MD5])} (in {_code('data.dvc')})"
            + (f"; DVC remote {_code(remote)}" if remote else "")
        )
    if data.get("source"):
        items.append(f"**Source:** {_code(data['source'])}")
    items.append(f"**Rows:** {_rows(inputs)}")
    items.append(f"**Validation:** {_validation_line(inputs)}")
    blocks = [_section("Data"), _bullets(items)]
    warnings = _validation_problems(inputs)
    if warnings:
        blocks += ["Validation findings:", _bullets(warnings)]
    data_bias = _dict(inputs.reports.get("data_bias"))
    groups = [g for g in _list(data_bias.get("groups")) if isinstance(g, dict)]
    if groups and data_bias.get("one_vs_rest"):
        blocks += _data_groups_one_vs_rest(data_bias, groups)
    elif groups:
        positive = data_bias.get("positive_label")
        blocks.append(
            f"Identity groups over all splits ({_count(data_bias.get('total_rows'))} rows); "
            f"positive rate is the share labelled {_code(positive)}:"
        )
        blocks.append(
            _table(
                ("group", "rows", "share", "positive rate", "rest", "difference", "flags"),
                [
                    (
                        g.get("group"),
                        _count(g.get("rows")),
                        _pct(g.get("share")),
                        _num(g.get("positive_rate"), 3),
                        _num(g.get("rest_positive_rate"), 3),
                        _signed(g.get("rate_difference")),
                        ", ".join(_group_flags(g)),
                    )
                    for g in groups
                ],
                align="lrrrrrl",
            )
        )
    elif not data_bias:
        blocks.append(_not_recorded("Identity groups in the data"))
    return blocks


def _data_groups_one_vs_rest(data_bias: dict[str, Any], groups: list[dict[str, Any]]) -> list[str]:
    """More than two labels: each group's rate is of the label furthest from the rest's."""
    return [
        f"Identity groups over all splits ({_count(data_bias.get('total_rows'))} rows); every "
        "label is measured one-vs-rest and each row shows the label whose share in the group "
        "differs most from its share in the rest:",
        _table(
            ("group", "rows", "share", "label", "rate", "rest", "difference", "flags"),
            [
                (
                    g.get("group"),
                    _count(g.get("rows")),
                    _pct(g.get("share")),
                    g.get("label"),
                    _num(g.get("positive_rate"), 3),
                    _num(g.get("rest_positive_rate"), 3),
                    _signed(g.get("rate_difference")),
                    ", ".join(_group_flags(g)),
                )
                for g in groups
            ],
            align="lrrlrrrl",
        ),
    ]


def _rows(inputs: CardInputs) -> str:
    rows = _dict(inputs.reports.get("rows"))
    if rows:
        parts = []
        for split in ("train", "validation", "test"):
            if split in rows:
                used = rows.get(f"{split}_used")
                note = f" (used {_count(used)})" if used is not None and used != rows[split] else ""
                parts.append(f"{split} {_count(rows[split])}{note}")
        return ", ".join(parts) or NOT_RECORDED
    parts = []
    total = _dict(inputs.reports.get("data_bias")).get("total_rows")
    if total is not None:
        parts.append(f"{_count(total)} over all splits")
    tested = _dict(inputs.reports.get("test_metrics")).get("n")
    if tested is not None:
        parts.append(f"{_count(tested)} test rows evaluated")
    return "; ".join(parts) if parts else f"per split {NOT_RECORDED}"


def _validation_line(inputs: CardInputs) -> str:
    report = _dict(inputs.reports.get("validation"))
    if not report:
        recorded = inputs.tags.get(tag.VALIDATION)
        return f"{_md(recorded)} (report {NOT_RECORDED})" if recorded else NOT_RECORDED
    total, failed = report.get("expectations"), report.get("failed") or 0
    errors, warnings = len(_list(report.get("errors"))), len(_list(report.get("warnings")))
    if not failed:
        return f"passed: all {_count(total)} expectations passed"
    verdict = "passed" if report.get("success", not errors) else "failed"
    if verdict == "passed" and warnings:
        verdict = f"passed with {warnings} warning{'s' * (warnings != 1)}"
    return (
        f"{verdict}: {_count(failed)} of {_count(total)} expectations failed "
        f"({errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)})"
    )


def _validation_problems(inputs: CardInputs) -> list[str]:
    report = _dict(inputs.reports.get("validation"))
    outcomes = _list(report.get("errors")) + _list(report.get("warnings"))
    return [_md(_outcome_line(o)) for o in outcomes if isinstance(o, dict)]


def _outcome_line(o: dict[str, Any]) -> str:
    """``test: class_imbalance failed on 3 of 1,066 rows [warn]: detail``."""
    count = o.get("unexpected_count")
    where = (
        f" on {_count(count)} of {_count(o.get('element_count'))} {o.get('unit', 'rows')}"
        if count is not None
        else ""
    )
    detail = f": {o['detail']}" if o.get("detail") else ""
    return f"{o.get('split')}: {o.get('check')} failed{where} [{o.get('severity')}]{detail}"


def _group_flags(g: dict[str, Any]) -> list[str]:
    flags = []
    if g.get("too_small"):
        flags.append("too small to judge")
    if g.get("under_represented"):
        flags.append("under-represented")
    if g.get("label_gap_flagged"):
        flags.append("label-rate gap")
    return flags


def _test_metrics(inputs: CardInputs) -> list[str]:
    blocks = [_section("Test metrics")]
    test = _dict(inputs.reports.get("test_metrics"))
    probe = _dict(inputs.reports.get("probe_baseline"))
    primary = _config(inputs, "registry").get("primary_metric")
    if not test:
        blocks.append(_not_recorded("Test metrics"))
    else:
        names = {"accuracy": "accuracy", "macro_f1": "macro-F1"}
        figures = ", ".join(
            f"{name} **{_num(test.get(key))}**" + (" (primary metric)" if key == primary else "")
            for key, name in names.items()
        )
        blocks.append(f"Fine-tuned model on {_count(test.get('n'))} test rows: {figures}.")
    if probe:
        gain = ""
        if test:
            gains = [
                f"{_signed(_diff(test.get(k), probe.get(k)), 4)} {name}"
                for k, name in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"))
            ]
            gain = f"; fine-tuning adds {' and '.join(gains)}"
        blocks.append(
            "Frozen-probe baseline (a logistic regression on the frozen base encoder's "
            f"embeddings): accuracy {_num(probe.get('accuracy'))}, macro-F1 "
            f"{_num(probe.get('macro_f1'))}{gain}."
        )
    else:
        blocks.append(_not_recorded("Frozen-probe baseline"))
    per_class = [c for c in _list(test.get("per_class")) if isinstance(c, dict)]
    if per_class:
        blocks.append(
            _table(
                ("label", "precision", "recall", "F1", "support"),
                [
                    (
                        c.get("label"),
                        _num(c.get("precision")),
                        _num(c.get("recall")),
                        _num(c.get("f1")),
                        _count(c.get("support")),
                    )
                    for c in per_class
                ],
            )
        )
    return blocks


def _diff(a: Any, b: Any) -> float | None:
    x, y = _finite(a), _finite(b)
    return None if x is None or y is None else x - y


GROUP_METRICS = ("accuracy", "macro_f1", "fpr", "fnr", "selection_rate")


def _group_metrics(inputs: CardInputs) -> list[str]:
    blocks = [_section("Per-group metrics")]
    bias = _dict(inputs.reports.get("bias"))
    groups = _dict(bias.get("groups"))
    if not groups:
        return [*blocks, _not_recorded("Per-group metrics")]
    rows = [g for g in _list(groups.get("groups")) if isinstance(g, dict)]
    overall = _dict(groups.get("overall"))
    per_label = [lb for lb in _list(bias.get("per_label")) if isinstance(lb, dict)]
    which = (
        f"for label {_code(_positive(bias))}, the worst of {len(per_label)} labels "
        "one-vs-rest (largest equalized odds difference)"
        if per_label
        else f"for the positive label {_code(_positive(bias))}"
    )
    blocks.append(
        "On the test split, by identity group (a text can be in several groups or none). "
        f"FPR, FNR and selection rate are {which}. "
        f"Groups with fewer than {_count(groups.get('min_group_rows'))} rows are too small: "
        "reported, not compared."
    )
    blocks.append(
        _table(
            ("group", "rows", "accuracy", "macro-F1", "FPR", "FNR", "selection rate", "too small"),
            [
                (
                    g.get("group"),
                    _count(g.get("rows")),
                    *(_num(g.get(m)) for m in GROUP_METRICS),
                    "yes" if g.get("too_small") else "no",
                )
                for g in [*rows, *([overall] if overall else [])]
            ],
            align="lrrrrrrl",
        )
    )
    compared = [str(c) for c in _list(groups.get("compared"))]
    if len(compared) >= 2:
        gaps = []
        for key, name in (
            ("demographic_parity_difference", "demographic parity difference"),
            ("equalized_odds_difference", "equalized odds difference"),
        ):
            est = _dict(groups.get(key))
            gaps.append(
                f"{name} {_num(est.get('value'), 3)} (95% CI "
                f"{_num(est.get('ci_low'), 3)} to {_num(est.get('ci_high'), 3)})"
            )
        blocks.append(
            f"Across the compared groups ({_md(', '.join(compared))}): {_md('; '.join(gaps))}."
        )
    else:
        blocks.append("Fewer than two groups are large enough to compare: no disparities.")
    if per_label:
        blocks += ["Every label one-vs-rest:", _label_disparities(per_label)]
    return blocks


def _label_disparities(per_label: list[dict[str, Any]]) -> str:
    def value(lb: dict[str, Any], key: str) -> str:
        return _num(_dict(_dict(lb.get("groups")).get(key)).get("value"), 3)

    return _table(
        ("label", "equalized odds difference", "demographic parity difference"),
        [
            (
                lb.get("label"),
                value(lb, "equalized_odds_difference"),
                value(lb, "demographic_parity_difference"),
            )
            for lb in per_label
        ],
        align="lrr",
    )


def _forgetting(inputs: CardInputs) -> list[str]:
    blocks = [_section("Forgetting")]
    report = _dict(inputs.reports.get("forgetting"))
    base = _dict(report.get("base"))
    if not base:
        return [*blocks, _not_recorded("Forgetting")]
    suite = report.get("suite_md5") or inputs.tags.get(tag.RETENTION_SUITE_MD5)
    blocks.append(
        "The base encoder and the tuned encoder scored on the retention suite"
        + (f" (md5 {_code(suite)})" if suite else "")
        + ": general-knowledge tasks the fine-tuning should not destroy. Drop is base "
        "minus tuned (positive: forgotten), with a paired bootstrap 95% interval."
    )
    champion = _dict(report.get("champion"))
    vs_champion = {t.get("task"): t for t in _list(champion.get("tasks")) if isinstance(t, dict)}
    header = ["task", "metric", "items", "base", "tuned", "drop", "95% CI", "retention"]
    if champion:
        header.append(f"drop vs {champion.get('reference', 'champion')}")
    rows = []
    for t in _list(base.get("tasks")):
        if not isinstance(t, dict):
            continue
        row = [
            t.get("task"),
            t.get("metric"),
            _count(t.get("items")),
            _num(t.get("reference"), 3),
            _num(t.get("candidate"), 3),
            _signed(t.get("drop")),
            _interval(t.get("ci_low"), t.get("ci_high")),
            _pct(t.get("retention")),
        ]
        if champion:
            row.append(_signed(_dict(vs_champion.get(t.get("task"))).get("drop")))
        rows.append(row)
    blocks.append(_table(header, rows, align="ll" + "r" * (len(header) - 2)))
    blocks.append(
        f"Mean drop {_signed(base.get('mean_drop'))} (95% CI "
        f"{_interval(base.get('mean_ci_low'), base.get('mean_ci_high'))}); worst task "
        f"{_code(base.get('worst_task'))} {_signed(base.get('worst_drop'))}."
    )
    if champion:
        blocks.append(
            f"Against {_md(champion.get('reference', 'the champion'))}: mean drop "
            f"{_signed(champion.get('mean_drop'))} (95% CI "
            f"{_interval(champion.get('mean_ci_low'), champion.get('mean_ci_high'))})."
        )
    gate = _dict(report.get("gate"))
    keep = _config(inputs, "forgetting")
    limits = (
        f"; limits: the mean drop's upper 95% bound {_num(keep.get('max_mean_drop'), 3)}, "
        f"any task's drop {_num(keep.get('max_task_drop'), 3)}"
        if keep
        else ""
    )
    blocks.append(
        f"**Gate:** {_gate_state(gate)} (mode {_md(gate.get('mode', NA))}{limits})."
        if gate
        else f"**Gate:** {NOT_RECORDED}."
    )
    failures = [_md(f) for f in _list(gate.get("failures"))]
    if failures:
        blocks.append(_bullets(failures))
    cka = [_finite(v) for v in _list(report.get("cka"))]
    if cka:
        finite = [(v, i) for i, v in enumerate(cka) if v is not None]
        lowest = f" (lowest {min(finite)[0]:.3f} at layer {min(finite)[1]})" if finite else ""
        blocks.append(
            "Linear CKA of base and tuned representations per layer (embeddings first): "
            + ", ".join(_num(v, 3) for v in cka)
            + lowest
            + "."
        )
    warnings = [_md(w) for w in _list(report.get("warnings"))]
    if warnings:
        blocks += ["Retention suite warnings:", _bullets(warnings)]
    return blocks


def _gate_state(gate: dict[str, Any]) -> str:
    if gate.get("mode") == "off":
        return "off"
    if gate.get("passed"):
        return "passed"
    return "refused" if gate.get("mode") == "error" else "warned"


def _bias(inputs: CardInputs) -> list[str]:
    blocks = [_section("Bias")]
    report = _dict(inputs.reports.get("bias"))
    if not report:
        return [*blocks, _not_recorded("Bias")]
    gate = _dict(report.get("gate"))
    if gate:
        blocks.append(f"**Gate:** {_md(gate.get('status', NA))}.")
        blocks.append(
            _table(
                ("check", "severity", "status", "value", "limit", "detail"),
                [
                    (
                        c.get("check"),
                        c.get("severity"),
                        c.get("status"),
                        _num(c.get("value"), 3),
                        _num(c.get("limit"), 3),
                        c.get("detail", ""),
                    )
                    for c in _list(gate.get("checks"))
                    if isinstance(c, dict)
                ],
                align="lllrrl",
            )
        )
    else:
        blocks.append(_not_recorded("Bias gate"))
    cf = _dict(report.get("counterfactual"))
    if cf.get("pairs"):
        rate = _dict(cf.get("flip_rate"))
        blocks.append(
            f"Counterfactual identity swaps: {_count(cf.get('flips'))} of "
            f"{_count(cf.get('pairs'))} predictions changed label when identity terms were "
            f"swapped (flip rate {_num(rate.get('value'), 3)}, 95% CI "
            f"{_num(rate.get('ci_low'), 3)} to {_num(rate.get('ci_high'), 3)}); mean "
            f"absolute change in the probability of {_code(_first_label(report))} "
            f"{_num(cf.get('mean_abs_delta'), 3)}."
        )
    else:
        blocks.append(
            "Counterfactual identity swaps: not run (no test text holds a swappable term)."
        )
    crows = [t for t in _list(report.get("crows_pairs")) if isinstance(t, dict)]
    if crows:
        blocks.append(
            "CrowS-Pairs: how often the two sentences of a pair (one more stereotyping than "
            "the other) get different labels, per bias type:"
        )
        blocks.append(
            _table(
                ("bias type", "pairs", "labels differ", "mean |Δp|"),
                [
                    (
                        t.get("bias_type"),
                        _count(t.get("pairs")),
                        _num(t.get("differ_rate"), 3),
                        _num(t.get("mean_abs_delta"), 3),
                    )
                    for t in crows
                ],
            )
        )
    else:
        blocks.append("CrowS-Pairs: not run.")
    others = [m for m in (_dict(report.get("base_probe")), _dict(report.get("champion"))) if m]
    if others:
        models = [report, *others]
        names = " and ".join(_md(m.get("model", "model")) for m in others)
        figures = [_bias_figures(m) for m in models]
        blocks.append(f"Compared with the {names} on the same test rows:")
        blocks.append(
            _table(
                ("measure", *(str(m.get("model", "model")) for m in models)),
                [(name, *(_num(f[name], 3) for f in figures)) for name in figures[0]],
            )
        )
    return blocks


def _first_label(bias: dict[str, Any]) -> str:
    """Label id 0 by name: the label whose probability the identity swaps follow."""
    labels = _list(bias.get("labels"))
    return str(labels[0]) if labels else "0"


def _positive(bias: dict[str, Any]) -> str:
    """The bias report's positive label by name (its id where the names are missing)."""
    labels = _list(bias.get("labels"))
    positive = _dict(bias.get("groups")).get("positive", 0)
    if isinstance(positive, int) and 0 <= positive < len(labels):
        return str(labels[positive])
    return str(positive)


def _crows_pooled(report: dict[str, Any]) -> float | None:
    types = [t for t in _list(report.get("crows_pairs")) if isinstance(t, dict)]
    pairs = sum(_finite(t.get("pairs")) or 0 for t in types)
    if not pairs:
        return None
    return sum((_finite(t.get("differ_rate")) or 0) * (t.get("pairs") or 0) for t in types) / pairs


def _bias_figures(report: dict[str, Any]) -> dict[str, Any]:
    """One model's headline bias figures, by the name the comparison table shows."""
    groups = _dict(report.get("groups"))
    overall = _dict(groups.get("overall"))
    return {
        "accuracy (all rows)": overall.get("accuracy"),
        "macro-F1 (all rows)": overall.get("macro_f1"),
        "demographic parity difference": _dict(groups.get("demographic_parity_difference")).get(
            "value"
        ),
        "equalized odds difference": _dict(groups.get("equalized_odds_difference")).get("value"),
        "counterfactual flip rate": _dict(_dict(report.get("counterfactual")).get("flip_rate")).get(
            "value"
        ),
        "CrowS-Pairs labels differ": _crows_pooled(report),
    }


def _limitations(inputs: CardInputs) -> list[str]:
    items = [_md(line) for line in _found_limitations(inputs)]
    base = _base_model(inputs)
    if _english_only(base):
        items.append(
            f"The base model {_code(base)} was pretrained on English text: other languages "
            "are untested and likely to fail."
        )
    items += [
        "The test metrics come from one held-out split of the same source as the training "
        "data; they say nothing about drift or other domains.",
        "Identity groups come from term lexicons (or the data's own group column): keyword "
        "matching misses implicit mentions and miscounts ambiguous words, and groups "
        "outside the lexicons are not measured.",
        "CrowS-Pairs is a US-centric stereotype benchmark built for masked language "
        "models; here it only shows whether the classifier treats the paired sentences "
        "differently.",
        "The retention suite measures general knowledge by proxy (word and sentence "
        "similarity, a probe): a small drop does not prove nothing else was forgotten.",
        "Confidence intervals are bootstrap intervals over the rows and assume they are "
        "independent.",
    ]
    return [_section("Limitations"), _bullets(items)]


def _found_limitations(inputs: CardInputs) -> list[str]:
    """Plain-text caveats read from the reports: small groups, warnings, skipped checks."""
    found = []
    if inputs.tags.get(tag.FLAGGED):
        found.append(f"This version is flagged: {inputs.tags[tag.FLAGGED]}")
    bias = _dict(inputs.reports.get("bias"))
    groups = _dict(bias.get("groups"))
    small = [
        f"{g.get('group')} ({_count(g.get('rows'))} rows)"
        for g in _list(groups.get("groups"))
        if isinstance(g, dict) and g.get("too_small")
    ]
    if small:
        found.append(
            f"Too few test rows to judge (under {_count(groups.get('min_group_rows'))}): "
            f"{', '.join(small)}; their figures are reported but not compared or gated."
        )
    data_bias = _dict(inputs.reports.get("data_bias"))
    for g in _list(data_bias.get("groups")):
        if not isinstance(g, dict):
            continue
        if g.get("under_represented"):
            found.append(
                f"Group {g.get('group')} is under-represented in the data: "
                f"{_count(g.get('rows'))} rows ({_pct(g.get('share'))})."
            )
        if g.get("label_gap_flagged"):
            found.append(
                f"Group {g.get('group')} has a different "
                f"'{g.get('label') or data_bias.get('positive_label')}' "
                f"rate in the data: {_num(g.get('positive_rate'), 3)} against "
                f"{_num(g.get('rest_positive_rate'), 3)} for the rest."
            )
    for c in _list(_dict(bias.get("gate")).get("checks")):
        if not isinstance(c, dict):
            continue
        if c.get("status") == "failed" and c.get("severity") == "warn":
            found.append(f"Bias check {c.get('check')} warned: {c.get('detail')}")
        elif c.get("status") == "not run" and c.get("check") != "champion_regression":
            found.append(f"Bias check {c.get('check')} did not run: {c.get('detail')}")
    forgetting = _dict(inputs.reports.get("forgetting"))
    gate = _dict(forgetting.get("gate"))
    if gate and not gate.get("passed") and gate.get("mode") == "warn":
        found.append(
            "The forgetting gate warned (warn mode, not refused): "
            + "; ".join(str(f) for f in _list(gate.get("failures")))
        )
    elif gate.get("mode") == "off":
        found.append("The forgetting gate was off: forgetting was measured but not enforced.")
    for warning in _list(forgetting.get("warnings")):
        found.append(f"Retention suite: {warning}")
    for o in _list(_dict(inputs.reports.get("validation")).get("warnings")):
        if isinstance(o, dict):
            found.append(f"Data validation warned: {_outcome_line(o)}")
    found += _imbalance(inputs)
    return [_sentence(line) for line in found]


def _imbalance(inputs: CardInputs) -> list[str]:
    per_class = [
        c
        for c in _list(_dict(inputs.reports.get("test_metrics")).get("per_class"))
        if isinstance(c, dict) and _finite(c.get("support")) is not None
    ]
    if len(per_class) < 2:
        return []
    most = max(per_class, key=lambda c: c["support"])
    least = min(per_class, key=lambda c: c["support"])
    weakest = min(per_class, key=lambda c: _finite(c.get("f1")) or 0.0)
    lines = []
    if least["support"] == 0:
        lines.append(f"The test split holds no '{least.get('label')}' rows: its metrics are void.")
    elif most["support"] / least["support"] >= 1.5:
        lines.append(
            f"The labels are imbalanced: '{most.get('label')}' has "
            f"{most['support'] / least['support']:.1f}x the test rows of "
            f"'{least.get('label')}' ({_count(most['support'])} against "
            f"{_count(least['support'])}); accuracy flatters the majority label."
        )
    lines.append(f"The weakest label is '{weakest.get('label')}' (F1 {_num(weakest.get('f1'))}).")
    return lines


def _reproduce(inputs: CardInputs) -> list[str]:
    blocks = [_section("Reproduce")]
    if inputs.version is not None:
        blocks += [
            "Retrain from the recorded data version and config, and check that the metrics "
            "match (nothing is registered):",
            _fenced(f"retune reproduce {shlex.quote(_ref(inputs))} --project-dir ."),
        ]
    else:
        blocks.append(
            "This run was not registered, so `retune reproduce` (which takes NAME/VERSION) "
            "cannot find it; the commands below still work."
        )
    commit = inputs.tags.get(tag.GIT_COMMIT)
    commit_arg = shlex.quote(commit) if commit and commit != "unknown" else "<commit>"
    data_md5 = inputs.tags.get(tag.DATA_DVC_MD5)
    blocks.append(
        "The same by hand: the code at its commit, the data it was trained on, its exact "
        "config (this registers a new version):"
    )
    blocks.append(
        _fenced(
            "\n".join(
                [
                    f"git checkout {commit_arg}",
                    "dvc checkout data.dvc"
                    + (f"  # data/ at md5 {data_md5}; dvc pull if not cached" if data_md5 else ""),
                    f"mlflow artifacts download --run-id {shlex.quote(inputs.run_id)} "
                    "--artifact-path reports/config.json --dst-path .",
                    "retune run --config config.json --project-dir .",
                ]
            )
        )
    )
    notes = [
        f"{_code('mlflow')} reads the store from {_code('MLFLOW_TRACKING_URI')}; the "
        f"project's own store is {_code(EMBEDDED_TRACKING_URI)}."
    ]
    if commit_arg == "<commit>":
        notes.append(f"The code commit is {NOT_RECORDED}.")
    if _dirty(inputs):
        notes.append(
            "The run's working tree had uncommitted changes: the commit may not hold the "
            f"exact code or {_code('data.dvc')}. {_code('retune reproduce')} restores the "
            "data by its md5 either way."
        )
    blocks.append(_bullets(notes))
    return blocks


def _fenced(text: str, language: str = "bash") -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


# --- HTML -----------------------------------------------------------------------------------

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em;"
    "line-height:1.45}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:.25em .6em;vertical-align:top}"
    "th{background:#f4f4f4}code{background:#f4f4f4;padding:0 .2em}"
    "pre{background:#f4f4f4;padding:.8em;overflow-x:auto}pre code{padding:0}"
)
_HEADING = re.compile(r"^(#{1,6}) +(.*)$")
_FENCE = re.compile(r"^(`{3,})(.*)$")
_TABLE_RULE = re.compile(r"^\|? *:?-{3,}:? *(\| *:?-{3,}:? *)*\|? *$")


def card_html(markdown: str, title: str) -> str:
    """A self-contained HTML page for the Markdown that :func:`render_card` writes.

    Converts exactly its constructs: ATX headings, paragraphs, ``- `` bullet lists, GFM
    tables, fenced code blocks, inline code, ``**bold**`` and backslash escapes. Every other
    character is HTML-escaped, so no markup passes through.
    """
    lines = markdown.splitlines()
    body: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif fence := _FENCE.match(line):
            ticks = len(fence.group(1))
            code, i = [], i + 1
            while i < len(lines) and not re.fullmatch(rf"`{{{ticks},}} *", lines[i]):
                code.append(lines[i])
                i += 1
            i += 1  # the closing fence
            body.append("<pre><code>" + html.escape("\n".join(code)) + "</code></pre>")
        elif heading := _HEADING.match(line):
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
            i += 1
        elif line.startswith("|") and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1]):
            header, rule, rows = line, lines[i + 1], []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            body.append(_html_table(header, rule, rows))
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
        else:
            text = []
            while i < len(lines) and lines[i].strip() and not _starts_block(lines, i):
                text.append(lines[i])
                i += 1
            body.append("<p>" + _inline("\n".join(text)) + "</p>")
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _starts_block(lines: list[str], i: int) -> bool:
    line = lines[i]
    return bool(
        _FENCE.match(line)
        or _HEADING.match(line)
        or line.startswith("- ")
        or (line.startswith("|") and i + 1 < len(lines) and _TABLE_RULE.match(lines[i + 1]))
    )


def _html_table(header: str, rule: str, rows: list[str]) -> str:
    aligns = [
        " style='text-align:right'" if cell.endswith(":") else "" for cell in _split_row(rule)
    ]

    def cells(row: str, tag: str) -> str:
        out = []
        for k, cell in enumerate(_split_row(row)):
            align = aligns[k] if k < len(aligns) and tag == "td" else ""
            out.append(f"<{tag}{align}>{_inline(cell)}</{tag}>")
        return "<tr>" + "".join(out) + "</tr>"

    body = "".join(cells(r, "td") for r in rows)
    return f"<table><thead>{cells(header, 'th')}</thead><tbody>{body}</tbody></table>"


def _split_row(row: str) -> list[str]:
    """A table row's cells, split on unescaped pipes; escapes stay for :func:`_inline`."""
    cells, cell, i = [], [], 0
    while i < len(row):
        if row[i] == "\\" and i + 1 < len(row):
            cell.append(row[i : i + 2])
            i += 2
            continue
        if row[i] == "|":
            cells.append("".join(cell))
            cell = []
        else:
            cell.append(row[i])
        i += 1
    cells.append("".join(cell))
    if row.lstrip().startswith("|"):
        cells = cells[1:]
    if cells and not cells[-1].strip():
        cells = cells[:-1]
    return [c.strip() for c in cells]


class _Bold:
    """A ``**`` marker, paired up after the scan."""


def _inline(text: str) -> str:
    """Inline Markdown to HTML: backslash escapes, code spans, ``**bold**``; the rest escaped."""
    out: list[str | _Bold] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in _PUNCTUATION:
            out.append(html.escape(text[i + 1]))
            i += 2
        elif c == "`":
            run = len(text[i:]) - len(text[i:].lstrip("`"))
            close = _closing_run(text, i + run, run)
            if close is None:
                out.append("`" * run)
                i += run
                continue
            code = text[i + run : close]
            if len(code) > 1 and code.startswith(" ") and code.endswith(" ") and code.strip():
                code = code[1:-1]
            out.append(f"<code>{html.escape(code)}</code>")
            i = close + run
        elif text.startswith("**", i):
            out.append(_Bold())
            i += 2
        else:
            out.append(html.escape(c))
            i += 1
    usable = sum(isinstance(part, _Bold) for part in out) // 2 * 2  # a last odd ** stays text
    parts, seen = [], 0
    for part in out:
        if isinstance(part, _Bold):
            parts.append(("<strong>", "</strong>")[seen % 2] if seen < usable else "**")
            seen += 1
        else:
            parts.append(part)
    return "".join(parts)


def _closing_run(text: str, start: int, run: int) -> int | None:
    """Where a backtick run of exactly ``run`` starts at or after ``start``, or None."""
    for m in re.finditer(r"`+", text[start:]):
        if len(m.group()) == run:
            return start + m.start()
    return None
