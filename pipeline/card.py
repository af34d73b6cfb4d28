"""The model card: Markdown from one run's records, and an HTML page of it.

Pure apart from :func:`write_card`: the caller fetches the JSON reports the retrain flow logs
(``reports/<name>.json``) and the run's tags. Any report may be missing (an older run, a
refused one, a kind of task that has no such report): its section then says "not recorded"
instead of failing, and the card claims nothing about the task it cannot read.

Reports read, by name (the ``to_dict()`` of each class):

- ``validation``: :class:`pipeline.validation.ValidationReport`
- ``data_bias``: :class:`pipeline.bias.DataBiasReport`
- ``test_metrics``, ``probe_baseline``: :class:`pipeline.evaluate.EvaluationReport`
- ``forgetting``: :class:`pipeline.forgetting.ForgettingReport`
- ``bias``: :class:`pipeline.fairness.ModelBiasReport`
- ``training``: :class:`pipeline.finetune.FineTuneResult` as a dict
- ``config``: :class:`pipeline.config.RetuneConfig` ``model_dump()``
- ``rows`` (optional): rows per split, e.g. ``{"train": 8530, "train_used": 1000, ...}``

The wording is the template ``templates/card.md.j2`` (and its ``card_*.md.j2`` parts); this
module only reads the records into plain values, one dict per section. The template
escapes every value it prints (:mod:`pipeline.reports`), so a ``|`` in a label cannot break
a table and ``<script>`` stays text in both renderings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import formatting, reports
from pipeline import tags as tag
from pipeline.gates import GateStatus, outcomes_from_tags
from pipeline.promotion import TEXT_CLASSIFICATION

NOT_RECORDED = "not recorded"
# The project's own MLflow store, relative to the project folder (pipeline.tracking).
EMBEDDED_TRACKING_URI = "sqlite:///mlflow/mlflow.db"
MARKDOWN_NAME, HTML_NAME = "model_card.md", "model_card.html"


@dataclass(frozen=True)
class CardInputs:
    """What one card is made from.

    Attributes:
        version: the registered version, or None for a run that was not registered.
        reports: the run's JSON reports by name (see the module docstring); any may be absent.
        tags: the run's (and version's) tags, ``retune.*`` (:mod:`pipeline.tags`).
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
    view = card_view(inputs)
    task = _report(inputs, "config").get("task")
    if task in GENERATIVE or "answer_loss" in _report(inputs, "test_metrics"):
        view["generation"] = _generation(inputs)
        return reports.render_markdown("card_generative.md.j2", **view)
    return reports.render_markdown("card.md.j2", **view)


GENERATIVE = ("chat", "translation")


def _generation(inputs: CardInputs) -> dict[str, Any]:
    """A chat or translation model's figures: tuned and base on the test conversations, a
    few answers side by side, CrowS-Pairs shifts."""
    tuned, base = _report(inputs, "test_metrics"), _report(inputs, "probe_baseline")
    config = _report(inputs, "config")
    generation, task = _dict(config.get("generation")), config.get("task") or "chat"
    examples = [
        {
            "prompt": mine.get("prompt"),
            "reference": mine.get("reference"),
            "tuned": mine.get("answer"),
            "base": theirs.get("answer"),
        }
        for mine, theirs in zip(
            _records(tuned.get("examples")), _records(base.get("examples")), strict=False
        )
    ]
    bias = _report(inputs, "bias")
    return {
        "task": str(task),
        "instruction": generation.get("instruction") if task == "translation" else None,
        "system_prompt": generation.get("system_prompt"),
        "tuned": tuned,
        "base": base,
        "examples": examples,
        "shifts": _records(bias.get("shifts")),
        "bias_gate": _dict(bias.get("gate")).get("status"),
    }


def write_card(out_dir: Path, inputs: CardInputs) -> tuple[Path, Path]:
    """Write ``model_card.md`` and its HTML page ``model_card.html`` into ``out_dir``.

    Returns:
        The Markdown file's path and the HTML file's path.
    """
    markdown = render_card(inputs)
    page = reports.markdown_page(markdown, f"{inputs.model_name} model card")
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / MARKDOWN_NAME, out_dir / HTML_NAME
    md_path.write_text(markdown, encoding="utf-8")
    html_path.write_text(page, encoding="utf-8")
    return md_path, html_path


def card_view(inputs: CardInputs) -> dict[str, Any]:
    """The plain values the card template phrases, one dict per section.

    Record values stay as recorded (numbers unformatted, None where missing): the template
    formats them with the reports' filters.
    """
    image = _report(inputs, "config").get("task") == "image-classification"
    return {
        "image": image,  # the template names a backbone, blocks and pixels instead
        "image_size": _config(inputs, "image").get("size"),
        "title": _title(inputs),
        "use": _intended_use(inputs),
        "model": _model(inputs),
        "data": _data(inputs),
        "metrics": _test_metrics(inputs),
        "groups": _group_metrics(inputs),
        "forgetting": _forgetting(inputs),
        "bias": _bias(inputs),
        "limits": _limitations(inputs),
        "reproduce": _reproduce(inputs),
    }


# --- reading the records (malformed parts read as missing) --------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _records(value: Any) -> list[dict[str, Any]]:
    return [r for r in _list(value) if isinstance(r, dict)]


def _report(inputs: CardInputs, name: str) -> dict[str, Any]:
    return _dict(inputs.reports.get(name))


def _config(inputs: CardInputs, section: str) -> dict[str, Any]:
    return _dict(_report(inputs, "config").get(section))


def _labels(inputs: CardInputs) -> list[str]:
    labels = _config(inputs, "data").get("labels")
    if not labels:
        per_class = _records(_report(inputs, "test_metrics").get("per_class"))
        labels = [c.get("label") for c in per_class]
    if not labels:
        labels = _report(inputs, "bias").get("labels")
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


def _dirty(inputs: CardInputs) -> bool:
    return inputs.tags.get(tag.GIT_DIRTY) == "true"


def _task(inputs: CardInputs, labels: list[str]) -> str | None:
    """The kind of task as the run recorded it; runs from before the identity tag that
    have labels were text classification (as :mod:`pipeline.promotion` reads them)."""
    return inputs.tags.get(tag.IDENTITY_TASK) or (TEXT_CLASSIFICATION if labels else None)


def _gate_tag(inputs: CardInputs, gate: str) -> str | None:
    """One gate's status from the tags, where recorded (for a section whose report is not)."""
    outcome = next(o for o in outcomes_from_tags(inputs.tags) if o.gate == gate)
    return None if outcome.status == GateStatus.NOT_RECORDED else outcome.status.value


# --- sections -----------------------------------------------------------------------------


def _title(inputs: CardInputs) -> dict[str, Any]:
    recorded = [o for o in outcomes_from_tags(inputs.tags) if o.status != GateStatus.NOT_RECORDED]
    return {
        "name": inputs.model_name,
        "version": inputs.version,
        "run_id": inputs.run_id,
        "verdict": inputs.verdict,
        "gates": inputs.tags.get(tag.VERDICT),
        "statuses": [(o.gate, o.status.value) for o in recorded],
        "flagged": inputs.tags.get(tag.FLAGGED),
    }


def _intended_use(inputs: CardInputs) -> dict[str, Any]:
    labels = _labels(inputs)
    task = _task(inputs, labels)
    return {
        "labels": labels,
        "task": task.replace("-", " ") if task else None,
        "text": (task or "").startswith("text"),
        "bias_measured": bool(_report(inputs, "bias") or _report(inputs, "data_bias")),
        "dataset": _dataset(inputs),
        "max_length": _config(inputs, "train").get("max_length"),
        "english_only": _english_only(_base_model(inputs)),
    }


def _model(inputs: CardInputs) -> dict[str, Any]:
    train = _config(inputs, "train")
    keep = _config(inputs, "forgetting")
    sha = inputs.tags.get(tag.BASE_MODEL_SHA256)
    mitigation = _dict(_report(inputs, "forgetting").get("mitigation"))
    workers = (train.get("nproc_per_node") or 1) * (train.get("nnodes") or 1)
    return {
        "base": _base_model(inputs),
        "sha": sha,
        "sha_unresolved": bool(sha and sha.startswith("unresolved:")),
        "train": train,
        "lora_targets": [str(t) for t in _list(train.get("lora_target_modules"))],
        "data_parallel": workers > 1,
        "training": _training(_report(inputs, "training")),
        "keep": keep,
        "distill": formatting.finite(keep.get("distill")) or 0.0,
        "l2sp": formatting.finite(keep.get("l2sp")) or 0.0,
        "wise_ft": _dict(mitigation.get("wise_ft")),
        "commit": inputs.tags.get(tag.GIT_COMMIT),
        "dirty": _dirty(inputs),
        "config_hash": inputs.tags.get(tag.CONFIG_HASH),
    }


def _training(training: dict[str, Any]) -> dict[str, Any] | None:
    if not training:
        return None
    history = _records(training.get("history"))
    best = training.get("best_epoch")
    return {
        "epochs_run": len(history),
        "best": best,
        "best_record": next((h for h in reversed(history) if h.get("epoch") == best), None),
        "seconds": training.get("train_seconds"),
        "device": training.get("device"),
        "bf16": bool(training.get("bf16")),
        "trainable": training.get("trainable_parameters"),
        "total": training.get("total_parameters"),
    }


def _data(inputs: CardInputs) -> dict[str, Any]:
    data_bias = _report(inputs, "data_bias")
    return {
        "dataset": _dataset(inputs),
        "md5": inputs.tags.get(tag.DATA_MD5),
        "dvc_md5": inputs.tags.get(tag.DATA_DVC_MD5),
        "remote": inputs.tags.get(tag.DVC_REMOTE),
        "source": _config(inputs, "data").get("source"),
        "rows": _split_rows(inputs),
        "total_rows": data_bias.get("total_rows"),
        "tested": _report(inputs, "test_metrics").get("n"),
        "validation": _validation(inputs),
        "bias": data_bias,
        "groups": [g | {"flags": _group_flags(g)} for g in _records(data_bias.get("groups"))],
    }


def _split_rows(inputs: CardInputs) -> list[dict[str, Any]] | None:
    """Rows per split (and rows used where fewer), or None where not recorded."""
    rows = _report(inputs, "rows")
    if not rows:
        return None
    splits = []
    for split in ("train", "validation", "test"):
        if split in rows:
            used = rows.get(f"{split}_used")
            differs = used is not None and used != rows[split]
            splits.append({"split": split, "rows": rows[split], "used": used if differs else None})
    return splits


def _validation(inputs: CardInputs) -> dict[str, Any]:
    report = _report(inputs, "validation")
    errors, warnings = _list(report.get("errors")), _list(report.get("warnings"))
    return {
        "recorded": bool(report),
        "tag": inputs.tags.get(tag.VALIDATION),
        "expectations": report.get("expectations"),
        "failed": report.get("failed") or 0,
        "errors": len(errors),
        "warnings": len(warnings),
        "success": report.get("success", not errors),
        "problems": _records(errors) + _records(warnings),
    }


def _group_flags(g: dict[str, Any]) -> list[str]:
    flags = []
    if g.get("too_small"):
        flags.append("too small to judge")
    if g.get("under_represented"):
        flags.append("under-represented")
    if g.get("label_gap_flagged"):
        flags.append("label-rate gap")
    return flags


def _test_metrics(inputs: CardInputs) -> dict[str, Any]:
    test = _report(inputs, "test_metrics")
    probe = _report(inputs, "probe_baseline")
    return {
        "test": test,
        "probe": probe,
        "primary": _config(inputs, "registry").get("primary_metric"),
        "gains": {k: _diff(test.get(k), probe.get(k)) for k in ("accuracy", "macro_f1")},
        "per_class": _records(test.get("per_class")),
    }


def _diff(a: Any, b: Any) -> float | None:
    x, y = formatting.finite(a), formatting.finite(b)
    return None if x is None or y is None else x - y


def _group_metrics(inputs: CardInputs) -> dict[str, Any]:
    bias = _report(inputs, "bias")
    groups = _dict(bias.get("groups"))
    overall = _dict(groups.get("overall"))
    return {
        "recorded": bool(groups),
        "none": bool(groups) and not _records(groups.get("groups")),  # no group column
        "rows": _records(groups.get("groups")) + ([overall] if overall else []),
        "positive": _positive(bias),
        "per_label": [
            {
                "label": lb.get("label"),
                "eo": _dict(_dict(lb.get("groups")).get("equalized_odds_difference")),
                "dp": _dict(_dict(lb.get("groups")).get("demographic_parity_difference")),
            }
            for lb in _records(bias.get("per_label"))
        ],
        "min_rows": groups.get("min_group_rows"),
        "compared": [str(c) for c in _list(groups.get("compared"))],
        "dp": _dict(groups.get("demographic_parity_difference")),
        "eo": _dict(groups.get("equalized_odds_difference")),
    }


def _positive(bias: dict[str, Any]) -> str:
    """The bias report's positive label by name (its id where the names are missing)."""
    labels = _list(bias.get("labels"))
    positive = _dict(bias.get("groups")).get("positive", 0)
    if isinstance(positive, int) and 0 <= positive < len(labels):
        return str(labels[positive])
    return str(positive)


def _forgetting(inputs: CardInputs) -> dict[str, Any]:
    report = _report(inputs, "forgetting")
    base, champion, gate = (_dict(report.get(k)) for k in ("base", "champion", "gate"))
    vs_champion = {t.get("task"): t for t in _records(champion.get("tasks"))}
    cka = [formatting.finite(v) for v in _list(report.get("cka"))]
    finite = [(v, i) for i, v in enumerate(cka) if v is not None]
    return {
        "recorded": bool(base),
        "status_tag": _gate_tag(inputs, "forgetting"),
        "suite": report.get("suite_md5") or inputs.tags.get(tag.RETENTION_SUITE_MD5),
        "base": base,
        "tasks": [
            t | {"vs_champion": _dict(vs_champion.get(t.get("task"))).get("drop")}
            for t in _records(base.get("tasks"))
        ],
        "champion": champion,
        "gate": gate,
        "gate_state": _gate_state(gate) if gate else None,
        "keep": _config(inputs, "forgetting"),
        "failures": _list(gate.get("failures")),
        "cka": cka,
        "lowest": min(finite) if finite else None,
        "warnings": _list(report.get("warnings")),
    }


def _gate_state(gate: dict[str, Any]) -> str:
    if gate.get("mode") == "off":
        return "off"
    if gate.get("passed"):
        return "passed"
    return "refused" if gate.get("mode") == "error" else "warned"


def _bias(inputs: CardInputs) -> dict[str, Any]:
    report = _report(inputs, "bias")
    gate = _dict(report.get("gate"))
    cf = _dict(report.get("counterfactual"))
    others = [m for m in (_dict(report.get("base_probe")), _dict(report.get("champion"))) if m]
    figures = [_bias_figures(m) for m in [report, *others]] if others else []
    return {
        "recorded": bool(report),
        "status_tag": _gate_tag(inputs, "bias"),
        "gate": gate,
        "checks": _records(gate.get("checks")),
        "counterfactual": cf,
        "flip_rate": _dict(cf.get("flip_rate")),
        "first_label": _first_label(report),
        "crows": _records(report.get("crows_pairs")),
        "others": [m.get("model", "model") for m in others],
        "models": [str(m.get("model", "model")) for m in [report, *others]],
        "comparison": [(name, [f[name] for f in figures]) for name in figures[0]]
        if figures
        else [],
    }


def _first_label(bias: dict[str, Any]) -> str:
    """Label id 0 by name: the label whose probability the identity swaps follow."""
    labels = _list(bias.get("labels"))
    return str(labels[0]) if labels else "0"


def _crows_pooled(report: dict[str, Any]) -> float | None:
    types = _records(report.get("crows_pairs"))
    pairs = sum(formatting.finite(t.get("pairs")) or 0 for t in types)
    if not pairs:
        return None
    rates = ((formatting.finite(t.get("differ_rate")) or 0) * (t.get("pairs") or 0) for t in types)
    return sum(rates) / pairs


def _bias_figures(report: dict[str, Any]) -> dict[str, Any]:
    """One model's headline bias figures, by the name the comparison table shows."""
    groups = _dict(report.get("groups"))
    overall = _dict(groups.get("overall"))
    flip_rate = _dict(_dict(report.get("counterfactual")).get("flip_rate"))
    return {
        "accuracy (all rows)": overall.get("accuracy"),
        "macro-F1 (all rows)": overall.get("macro_f1"),
        "demographic parity difference": _dict(groups.get("demographic_parity_difference")).get(
            "value"
        ),
        "equalized odds difference": _dict(groups.get("equalized_odds_difference")).get("value"),
        "counterfactual flip rate": flip_rate.get("value"),
        "CrowS-Pairs labels differ": _crows_pooled(report),
    }


def _limitations(inputs: CardInputs) -> dict[str, Any]:
    """The caveats found in the records, then the standing ones of each measurement made."""
    bias = _report(inputs, "bias")
    measured = {
        "test": bool(_report(inputs, "test_metrics")),
        "groups": bool(bias or _report(inputs, "data_bias")),
        "crows": bool(_list(bias.get("crows_pairs"))),
        "retention": bool(_report(inputs, "forgetting")),
        "intervals": bool(bias or _report(inputs, "forgetting")),
    }
    return {
        "found": _findings(inputs),
        "base": _base_model(inputs),
        "english_only": _english_only(_base_model(inputs)),
        "measured": measured,
    }


def _findings(inputs: CardInputs) -> list[dict[str, Any]]:
    """Caveats read from the reports, each a ``kind`` and its values (the template says them)."""
    found: list[dict[str, Any]] = []
    if inputs.tags.get(tag.FLAGGED):
        found.append({"kind": "flagged", "text": inputs.tags[tag.FLAGGED]})
    groups = _dict(_report(inputs, "bias").get("groups"))
    small = [g for g in _records(groups.get("groups")) if g.get("too_small")]
    if small:
        found.append(
            {"kind": "small_groups", "groups": small, "under": groups.get("min_group_rows")}
        )
    data_bias = _report(inputs, "data_bias")
    for g in _records(data_bias.get("groups")):
        if g.get("under_represented"):
            found.append({"kind": "under_represented", "group": g})
        if g.get("label_gap_flagged"):
            label = g.get("label") or data_bias.get("positive_label")
            found.append({"kind": "label_gap", "group": g, "label": label})
    for c in _records(_dict(_report(inputs, "bias").get("gate")).get("checks")):
        if c.get("status") == "failed" and c.get("severity") == "warn":
            found.append({"kind": "bias_warned", "check": c})
        elif c.get("status") == "not run" and c.get("check") != "champion_regression":
            found.append({"kind": "bias_not_run", "check": c})
    found += _forgetting_findings(_report(inputs, "forgetting"))
    for o in _records(_report(inputs, "validation").get("warnings")):
        found.append({"kind": "validation_warned", "outcome": o})
    return found + _imbalance(inputs)


def _forgetting_findings(forgetting: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    gate = _dict(forgetting.get("gate"))
    if gate and not gate.get("passed") and gate.get("mode") == "warn":
        found.append({"kind": "forgetting_warned", "failures": _list(gate.get("failures"))})
    elif gate.get("mode") == "off":
        found.append({"kind": "forgetting_off"})
    found += [{"kind": "retention_warning", "text": w} for w in _list(forgetting.get("warnings"))]
    return found


def _imbalance(inputs: CardInputs) -> list[dict[str, Any]]:
    per_class = [
        c
        for c in _records(_report(inputs, "test_metrics").get("per_class"))
        if formatting.finite(c.get("support")) is not None
    ]
    if len(per_class) < 2:
        return []
    most = max(per_class, key=lambda c: c["support"])
    least = min(per_class, key=lambda c: c["support"])
    weakest = min(per_class, key=lambda c: formatting.finite(c.get("f1")) or 0.0)
    found: list[dict[str, Any]] = []
    if least["support"] == 0:
        found.append({"kind": "no_test_rows", "label": least.get("label")})
    elif most["support"] / least["support"] >= 1.5:
        ratio = most["support"] / least["support"]
        found.append({"kind": "imbalance", "most": most, "least": least, "ratio": ratio})
    return [*found, {"kind": "weakest", "label": weakest.get("label"), "f1": weakest.get("f1")}]


def _reproduce(inputs: CardInputs) -> dict[str, Any]:
    commit = inputs.tags.get(tag.GIT_COMMIT)
    return {
        "ref": None if inputs.version is None else f"{inputs.model_name}/{inputs.version}",
        "commit": commit if commit and commit != "unknown" else None,
        "data_md5": inputs.tags.get(tag.DATA_DVC_MD5),
        "run_id": inputs.run_id,
        "dirty": _dirty(inputs),
        "tracking_uri": EMBEDDED_TRACKING_URI,
    }
