"""Reports a user opens offline: validation, forgetting and bias pages, and the model card.

One rendering system: Jinja2 templates in ``pipeline/templates`` and one set of number
formatters (``fmt_*``), registered as filters on both environments. HTML pages
(``*.html.j2``) autoescape HTML; Markdown templates (``*.md.j2``, the model card) escape
every printed value for Markdown instead, and :func:`markdown_page` turns Markdown into
HTML with markdown-it-py (CommonMark and GFM tables).

Every page is one self-contained file: styles inline, charts as base64 PNGs, no script
and no network, so it reads the same from ``runs/<id>/html/`` as from MLflow's
``reports/`` artifacts.
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

    from pipeline.fairness import ModelBiasReport
    from pipeline.forgetting import ForgettingReport
    from pipeline.validation import ValidationReport

TEMPLATES = Path(__file__).parent / "templates"


# --- formatters (the templates' filters) --------------------------------------------------

from pipeline.formatting import (  # noqa: E402  (one home; re-exported for templates)
    FILTERS,
    NA,
    fmt_num,
)


def _environment(**options: Any) -> jinja2.Environment:
    """The templates folder, strict about undefined names, with the formatters as filters."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        **options,
    )
    env.filters.update(FILTERS)
    return env


@cache
def environment() -> jinja2.Environment:
    """The HTML templates (``*.html.j2``), HTML-autoescaped."""
    return _environment(autoescape=True)


def _write(template: str, path: Path, **context: Any) -> Path:
    page = environment().get_template(template).render(**context)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


# --- Markdown (the model card) --------------------------------------------------------------

# What Markdown (CommonMark + GFM tables) could read as syntax inside a line: "<" starts
# HTML, "[" links, "&" entities, "|" table cells; "_" only at a word's edge (intraword
# underscores never make emphasis, so val_loss stays readable).
_MD_SPECIAL = re.compile(r"[\\`*\[<|&~#]|(?<![^\W_])_|_(?![^\W_])")
# What would open a block at the start of a list item: a nested list, a quote, a heading.
_BLOCK_START = re.compile(r"^(\d{1,9})([.)])|^([-+>=])")


_WHITESPACE = re.compile(r"\s+")


class Markdown(str):
    """Text that already is Markdown: the Markdown templates print it as it is."""


def md_escape(value: Any) -> str:
    """Plain text made literal in Markdown: syntax characters backslash-escaped, one line
    (every run of whitespace, newlines included, becomes one space)."""
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(), _WHITESPACE.sub(" ", str(value)))


def md_code(value: Any) -> Markdown:
    """An inline code span holding ``value`` literally (a longer fence around backticks)."""
    text = NA if value is None else " ".join(str(value).split()) or NA
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return Markdown(f"{fence}{pad}{text}{pad}{fence}")


def md_codes(values: Iterable[Any]) -> Markdown:
    """Code spans joined by commas, e.g. the labels."""
    return Markdown(", ".join(md_code(v) for v in values))


def md_item(value: Any) -> Markdown:
    """Escaped text that starts a list item: a leading ``1.``, ``-`` or ``>`` stays text."""
    return Markdown(_BLOCK_START.sub(_escape_block, md_escape(value), count=1))


def _escape_block(m: re.Match[str]) -> str:
    if m.group(1):
        return f"{m.group(1)}\\{m.group(2)}"
    return "\\" + m.group(3)


def md_shell(value: Any) -> Markdown:
    """A shell word for a fenced code block, where backslash escapes would show."""
    return Markdown(shlex.quote(str(value)))


def sentence(value: Any) -> str:
    """One line ending in a full stop (not doubled after text that already has one)."""
    text = " ".join(str(value).split())
    return text if text.endswith((".", "!", "?")) else text + "."


def _md_finalize(value: Any) -> str:
    """What every ``{{ ... }}`` of a Markdown template prints: record text escaped (the
    Markdown counterpart of HTML autoescaping), None as n/a, Markdown as it is."""
    if isinstance(value, Markdown):
        return value
    return NA if value is None else md_escape(value)


@cache
def markdown_environment() -> jinja2.Environment:
    """The Markdown templates (``*.md.j2``): every printed value is Markdown-escaped."""
    env = _environment(autoescape=False, finalize=_md_finalize)
    env.filters.update(
        code=md_code,
        codes=md_codes,
        item=md_item,
        shell=md_shell,
        sentence=sentence,
        rendered=Markdown,  # a macro's output: already escaped inside
    )
    return env


def render_markdown(template: str, **context: Any) -> str:
    """A Markdown template rendered, blank-line runs left by skipped blocks closed up."""
    text = markdown_environment().get_template(template).render(**context)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def markdown_page(markdown: str, title: str) -> str:
    """A self-contained HTML page of ``markdown`` (CommonMark with GFM tables), styled as
    the other pages. Raw HTML in the Markdown is not passed through: it shows as text."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return environment().get_template("markdown.html.j2").render(title=title, body=body)


# --- validation ---------------------------------------------------------------------------


def render_validation_page(report: ValidationReport, path: Path, title: str = "dataset") -> Path:
    """Retune's own page of a GX validation: the verdict, every check with its severity,
    status and flagged rows, and each failed expectation with its example rows.

    Args:
        report: :func:`pipeline.validation.validate_dataset`'s result.
        path: where to write, e.g. ``runs/<id>/html/validation.html``.
        title: what was validated (the data source), shown in the heading.

    Returns:
        ``path``. The page links the GX Data Docs (``report.docs_index``) by a path
        relative to itself, so the link holds where both folders are copied together.
    """
    from pipeline.validation import TABLE_HEADER

    errors, warnings = len(report.errors), len(report.warnings)
    if report.success:
        verdict = "passed" + (
            f" with {warnings} warning{'s' * (warnings != 1)}" if warnings else ""
        )
    else:
        verdict = f"failed: {errors} error-level check{'s' * (errors != 1)} failed"
    docs_link = None
    if report.docs_index is not None:
        docs_link = Path(os.path.relpath(report.docs_index, path.parent)).as_posix()
    return _write(
        "validation.html.j2",
        path,
        report=report,
        title=title,
        verdict=verdict,
        header=TABLE_HEADER,
        rows=report.table_rows(),
        status_class=_status_class,
        docs_link=docs_link,
    )


def _status_class(status: str, severity: str) -> str:
    if status == "failed":
        return "failed" if severity == "error" else "warned"
    return "passed" if status == "passed" else ""


# --- forgetting ---------------------------------------------------------------------------


def render_forgetting_page(report: ForgettingReport, path: Path, model: str = "candidate") -> Path:
    """The retention suite per task (base, tuned, drop, CI, kept, vs champion), the gate's
    verdict and why, the mitigations used and the CKA per layer.

    Args:
        model: the model's name for the heading (e.g. the registered model name).
    """
    from pipeline.forgetting import TABLE_HEADER
    from pipeline.plots import forgetting_chart_png

    gate = report.gate
    status = (
        "off"
        if gate.mode == "off"
        else "passed"
        if gate.passed
        else ("refused" if gate.refused else "warned")
    )
    n = len(gate.failures)
    verdict = {
        "off": "off: the gate is not checked (forgetting.gate: off)",
        "passed": "passed: the mean drop's upper bound and every task's drop are within limits",
        "refused": f"refused: {n} limit{'s' * (n != 1)} exceeded",
        "warned": f"warned: {n} limit{'s' * (n != 1)} exceeded (reported, not refused)",
    }[status]
    scalars, tables = _mitigation_rows(report.mitigation)
    return _write(
        "forgetting.html.j2",
        path,
        report=report,
        model=model,
        gate_status=status,
        verdict=verdict,
        gate_class={"refused": "failed", "warned": "warned", "passed": "passed"}.get(status, ""),
        header=TABLE_HEADER,
        rows=report.table_rows(),
        chart=forgetting_chart_png(report) if report.base.tasks else None,
        mitigations=scalars,
        mitigation_tables=tables,
    )


def _mitigation_rows(
    mitigation: dict[str, Any],
) -> tuple[list[tuple[str, str]], list[tuple[str, list[str], list[list[str]]]]]:
    """Scalar settings as (name, value) rows; lists of records (WiSE-FT's alpha curve)
    as their own tables."""
    scalars: list[tuple[str, str]] = []
    tables: list[tuple[str, list[str], list[list[str]]]] = []
    for name, value in mitigation.items():
        if isinstance(value, dict):
            for key, inner in value.items():
                if isinstance(inner, list) and inner and all(isinstance(r, dict) for r in inner):
                    header = list(inner[0])
                    body = [[_cell(r.get(k)) for k in header] for r in inner]
                    tables.append((f"{name}: {key}", header, body))
                else:
                    scalars.append((f"{name}: {key}", _cell(inner)))
        else:
            scalars.append((name, _cell(value)))
    return scalars, tables


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "-"
    if isinstance(value, float):
        return fmt_num(value, 4)
    return str(value)


# --- bias ---------------------------------------------------------------------------------


def render_bias_page(report: Any, path: Path) -> Path:
    """The gate, the headline and per-group tables, one bar chart per metric over the
    groups that have test rows (base probe and champion beside the candidate), the flipped
    identity swaps and CrowS-Pairs. With more than two labels every figure names its label.
    A causal LM's report (:class:`pipeline.lm_bias.LMBiasReport`) has its own page.
    """
    from pipeline.lm_bias import TABLE_HEADER as LM_HEADER
    from pipeline.lm_bias import LMBiasReport

    if isinstance(report, LMBiasReport):
        return _write("lm_bias.html.j2", path, report=report, table_header=LM_HEADER)
    from pipeline.fairness import (
        GROUP_TABLE_HEADER,
        METRIC_TITLES,
        METRICS,
        TABLE_HEADER,
    )
    from pipeline.plots import group_bars_png

    models = [r for r in (report, report.base_probe, report.champion) if r is not None]
    shown = [g for g in report.groups.groups if g.rows > 0]
    charts = []
    for metric in METRICS:
        title = METRIC_TITLES[metric]
        if report.per_label and metric in ("fpr", "fnr", "selection_rate"):
            title += f", label '{report.positive_label}' one-vs-rest"
        series = []
        for model in models:
            by_name = {r.group: getattr(r, metric) for r in model.groups.groups}
            series.append((model.model, [by_name.get(g.group, math.nan) for g in shown]))
        names = [f"{g.group} (n={g.rows}{', too small' if g.too_small else ''})" for g in shown]
        charts.append((metric, title, group_bars_png(title, names, series), names))
    return _write(
        "bias.html.j2",
        path,
        report=report,
        table_header=TABLE_HEADER,
        group_header=GROUP_TABLE_HEADER,
        empty_groups=[g.group for g in report.groups.groups if g.rows == 0],
        charts=charts,
        label_name=lambda i: report.labels[i] if 0 <= i < len(report.labels) else str(i),
        crows_header=_crows_header(models),
        crows_rows=_crows_rows(models),
    )


def _crows_header(models: Sequence[ModelBiasReport]) -> list[str]:
    return ["bias type", "pairs", *(f"{m.model}: differ / mean |Δp|" for m in models)]


def _crows_rows(models: Sequence[ModelBiasReport]) -> list[list[str]]:
    per_model = [{t.bias_type: t for t in m.crows_pairs} for m in models]
    types = sorted({t for d in per_model for t in d})
    return [
        [
            t,
            str(next(d[t].pairs for d in per_model if t in d)),
            *(
                f"{fmt_num(d[t].differ_rate)} / {fmt_num(d[t].mean_abs_delta)}" if t in d else "-"
                for d in per_model
            ),
        ]
        for t in types
    ]
