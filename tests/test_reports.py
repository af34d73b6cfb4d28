"""The HTML reports from real report objects: what the page says, and what Chromium shows.

The validation report comes from a real GX run on small frames (test_validation's), the
forgetting, bias and card reports from the tiny hand-computed run of test_card.
"""

from __future__ import annotations

import html
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from test_card import RUN_ID, TAGS, forgetting_report, model_bias_report, reports
from test_fairness import three_label_report
from test_validation import good_frames, validate

from pipeline import formatting
from pipeline import reports as pages
from pipeline.card import CardInputs, render_card, write_card
from pipeline.config import ValidationConfig
from pipeline.validation import ValidationReport, validate_dataset

LEAKED = "a warm train film, take 0"  # train's first text, copied into test
DUPLICATE = "a dull validation film, take 1"


def text_of(page: str) -> str:
    """The visible text: tags dropped, entities decoded, whitespace collapsed."""
    page = re.sub(r"<(style|script)\b.*?</\1>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page))).strip()


def failing_frames() -> dict[str, pd.DataFrame]:
    """Good frames with one test text leaked from train and a validation row repeated."""
    frames = good_frames()
    frames["test"].loc[0, "text"] = LEAKED
    frames["validation"].loc[2, "text"] = DUPLICATE
    return frames


@pytest.fixture(scope="module")
def failed_validation(tmp_path_factory: pytest.TempPathFactory) -> ValidationReport:
    docs = tmp_path_factory.mktemp("run") / "data_docs"
    return validate_dataset(failing_frames(), ValidationConfig(), ["fresh", "rotten"], docs)


# --- the validation page ------------------------------------------------------------------


def test_validation_page_shows_verdict_every_check_and_failed_rows(
    failed_validation: ValidationReport,
):
    assert failed_validation.docs_index is not None  # runs/<id>/data_docs/index.html
    run_dir = failed_validation.docs_index.parent.parent
    path = pages.render_validation_page(
        failed_validation, run_dir / "html" / "validation.html", "data/reviews.csv"
    )
    page = path.read_text(encoding="utf-8")
    text = text_of(page)
    assert "Data validation: data/reviews.csv" in text
    # leakage and leakage_normalized (the leaked row), conflicting_labels (the repeated row
    # has the other label); duplicates only warns.
    assert "Verdict: failed: 3 error-level checks failed" in text
    assert "39 expectations, 4 failed (3 errors, 1 warning)" in text
    for check in failed_validation.severities:
        assert f" {check} " in text  # every check is listed, off ones included
    leak = next(r for r in failed_validation.table_rows() if r[0] == "leakage")
    assert leak[1:] == ("error", "failed", "1 of 32")
    assert "leakage error failed 1 of 32" in text
    # The failed check's example row, with its split and counts.
    assert (
        "test leakage error 1 of 16 rows expect_column_values_to_be_null on _leaked_text "
        f"e.g. ['{LEAKED}']"
    ) in text
    assert DUPLICATE in text  # the duplicates warning's example
    assert "<script" not in page and "http" not in page.replace(
        "http-equiv", ""
    )  # nothing to fetch
    # The Data Docs are linked relative to the page, so the link holds in MLflow too.
    assert 'href="../data_docs/index.html"' in page


def test_validation_page_of_clean_data_says_passed(tmp_path: Path):
    report = validate(good_frames())
    text = text_of(pages.render_validation_page(report, tmp_path / "v.html").read_text())
    assert "Verdict: passed" in text and "None: every expectation passed." in text
    assert "Not built for this validation." in text


def test_validation_page_escapes_the_rows(tmp_path: Path):
    frames = good_frames()
    frames["test"].loc[0, "text"] = frames["train"].loc[0, "text"] = "<script>x()</script>"
    page = pages.render_validation_page(validate(frames), tmp_path / "v.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;x()&lt;/script&gt;" in page


# --- the forgetting page ------------------------------------------------------------------


def test_forgetting_page_tasks_gate_champion_mitigations_and_cka(tmp_path: Path):
    report = forgetting_report()
    page = pages.render_forgetting_page(report, tmp_path / "f.html", "retune-sentiment")
    text = text_of(page.read_text(encoding="utf-8"))
    assert "Forgetting report: retune-sentiment" in text
    # topics: base 1.000, tuned 0.800, drop +0.200, kept 80%; vs champion (0.9) +0.100.
    topics = next(r for r in report.table_rows() if r[0] == "topics")
    assert topics[:5] == ("topics", "accuracy", "1.000", "0.800", "+0.200")
    assert " ".join(topics) in text
    assert "Gate: warned" in text and report.gate.failures[0] in text
    assert "warned: 3 limits exceeded (reported, not refused)" in text  # mean, lee, topics
    assert "worst task topics (+0.200)" in text
    assert "Against champion v2: mean drop" in text
    assert "l2sp 0.0000" in text and "distill 5.0000" in text
    cka = " ".join(f"{v:.3f}" for v in report.cka)
    assert f"CKA {cka}" in text and "embeddings 1 2" in text
    assert "brown skipped: npm is not installed" in text
    assert page.read_text().count("data:image/png;base64,iVBOR") == 1


def test_forgetting_page_lists_wise_ft_and_a_missing_champion(tmp_path: Path):
    from dataclasses import replace

    report = replace(
        forgetting_report(),
        champion=None,
        mitigation={
            "l2sp": 0.01,
            "wise_ft": {
                "alpha": 0.5,
                "curve": [
                    {"alpha": 0.5, "val_metric": 0.81, "mean_drop": 0.004},
                    {"alpha": 1.0, "val_metric": 0.83, "mean_drop": 0.03},
                ],
            },
        },
    )
    text = text_of(pages.render_forgetting_page(report, tmp_path / "f.html").read_text())
    assert "No champion to compare with." in text
    assert "wise_ft: alpha 0.5000" in text
    assert "wise_ft: curve alpha val_metric mean_drop 0.5000 0.8100 0.0040" in text


# --- the bias page ------------------------------------------------------------------------


def chart_groups(page: str) -> list[list[str]]:
    """The groups each chart draws, from its alt text."""
    return [alt.split(": ", 1)[1].split("; ") for alt in re.findall(r'alt="([^"]+)"', page)]


def test_bias_page_draws_no_empty_group_and_lists_it(tmp_path: Path):
    from test_fairness import full_report

    page = pages.render_bias_page(full_report(), tmp_path / "b.html").read_text()
    charts = chart_groups(html.unescape(page))
    assert len(charts) == 5
    assert all(names == ["a (n=4)", "b (n=5)", "<b>one</b> (n=1, too small)"] for names in charts)
    text = text_of(page)
    assert "Groups with no test rows, listed here and left out of the charts: empty." in text
    assert "Positive label: fresh;" in text


def test_bias_page_with_three_labels_names_every_label(tmp_path: Path):
    page = pages.render_bias_page(three_label_report(), tmp_path / "b.html").read_text()
    text = text_of(page)
    assert "3 labels: every label is measured one-vs-rest" in text
    assert "label 'z', the worst of 3 labels one-vs-rest" in text
    assert "equalized odds difference [x] 0.500" in text
    assert "equalized odds difference [z] 1.000" in text
    assert "B [z] 4 0.500" in text  # group B, label z: 4 rows, accuracy 0.5
    assert "false negative rate, label 'z' one-vs-rest" in text
    assert all("E (n=0)" not in " ".join(names) for names in chart_groups(html.unescape(page)))


def test_formatters():
    assert formatting.fmt_num(0.12345) == "0.123" and formatting.fmt_num(float("nan")) == "n/a"
    assert formatting.fmt_num(None) == "n/a" and formatting.fmt_num(2, 1) == "2.0"
    assert formatting.fmt_pct(0.1234) == "12.3%" and formatting.fmt_pct(float("inf")) == "n/a"
    assert formatting.fmt_signed(0.01) == "+0.010" and formatting.fmt_signed(-0.5, 1) == "-0.5"
    assert formatting.fmt_num(True) == "n/a" and formatting.fmt_num("0.5") == "n/a"  # not numbers
    assert formatting.fmt_count(1234.0) == "1,234" and formatting.fmt_count(None) == "n/a"
    assert formatting.fmt_interval(-0.01, 0.03) == "-0.010 to +0.030"
    assert formatting.fmt_interval(None, math.nan) == "n/a"
    assert formatting.fmt_interval(None, 0.5) == "n/a to +0.500"
    assert formatting.fmt_param(0.0001) == "0.0001" and formatting.fmt_param(None) == "None"


def test_markdown_escaping_keeps_record_text_literal():
    assert pages.md_escape("a|b <x> *y* val_loss _z_\nnext") == (
        "a\\|b \\<x> \\*y\\* val_loss \\_z\\_ next"
    )
    assert pages.md_code("a `b` c") == "``a `b` c``" and pages.md_code("`x") == "`` `x ``"
    assert pages.md_item("1. first") == "1\\. first" and pages.md_item("- x") == "\\- x"
    assert pages.sentence("done.") == "done." and pages.sentence("done") == "done."
    # One template: a value prints escaped, a filter's Markdown as it is, None as n/a.
    env = pages.markdown_environment()
    out = env.from_string("{{ a }} {{ a | code }} {{ n }} {{ 0.5 | num }}").render(a="x|y", n=None)
    assert out == "x\\|y `x|y` n/a 0.500"


# --- every page in headless Chromium --------------------------------------------------------


def chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run installs it)")
    user_data.mkdir(parents=True, exist_ok=True)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={user_data}",
    ]
    return subprocess.run(
        [exe, *flags, *args], capture_output=True, text=True, timeout=120, check=True
    )


def visible_text(path: Path, user_data: Path) -> str:
    """The page's text after Chromium loaded it (and ran any script) from the file."""
    dom = chromium("--dump-dom", path.resolve().as_uri(), user_data=user_data).stdout
    assert "<body" in dom, dom[:500]
    return text_of(dom)


def write_every_page(failed: ValidationReport, folder: Path) -> dict[str, Path]:
    card = CardInputs("retune-sentiment", "3", reports(), dict(TAGS), RUN_ID, "champion")
    _, card_page = write_card(folder / "card", card)
    html_dir = folder / "html"
    return {
        "validation": pages.render_validation_page(
            failed, html_dir / "validation.html", "data/reviews.csv"
        ),
        "bias": pages.render_bias_page(model_bias_report(), html_dir / "bias.html"),
        "bias3": pages.render_bias_page(three_label_report(), html_dir / "bias3.html"),
        "forgetting": pages.render_forgetting_page(
            forgetting_report(), html_dir / "forgetting.html", "retune-sentiment"
        ),
        "card": card_page,
    }


@pytest.mark.integration
def test_every_report_reads_in_headless_chromium(failed_validation, tmp_path: Path):
    written = write_every_page(failed_validation, tmp_path)
    profile = tmp_path / "chromium-profile"
    seen = {name: visible_text(path, profile) for name, path in written.items()}

    validation = seen["validation"]
    assert "Verdict: failed: 3 error-level checks failed" in validation
    assert "leakage error failed 1 of 32" in validation
    assert f"e.g. ['{LEAKED}']" in validation  # a failed check's example row

    bias = seen["bias"]
    assert "Bias report: candidate" in bias and "Gate: " in bias
    assert "equalized_odds" in bias and "counterfactual_flips" in bias
    assert "women 5 1.000" in bias  # group, rows, accuracy
    assert "Positive label: fresh;" in bias
    assert "equalized odds difference [z] 1.000" in seen["bias3"]

    forgetting = seen["forgetting"]
    assert "Gate: warned" in forgetting
    assert "topics accuracy 1.000 0.800 +0.200" in forgetting and "lee spearman" in forgetting

    card = seen["card"]
    assert "Model card: retune-sentiment version 3" in card
    assert "Per-group metrics" in card and "Forgetting" in card and "topics" in card
    assert "women" in card and "0.800" in card  # a group and the test accuracy

    # A picture of the bias page, to look at the charts' labels (RETUNE_SCREENSHOT_DIR
    # keeps it; by default it stays under tmp_path).
    shot = Path(os.environ.get("RETUNE_SCREENSHOT_DIR", tmp_path)) / "bias.png"
    chromium(
        f"--screenshot={shot}",
        "--window-size=1200,2400",
        written["bias"].resolve().as_uri(),
        user_data=profile,
    )
    assert shot.stat().st_size > 10_000


def test_card_names_the_label_of_each_bias_figure_with_three_labels():
    from test_card import jsonable

    from pipeline.bias import check_data_bias

    body = reports()
    model = three_label_report()
    body["bias"] = jsonable(model.to_dict())
    data_bias = check_data_bias(
        ["t"] * 8,
        [["x", "y", "z"][i] for i in [0, 0, 1, 2, 0, 1, 2, 2]],
        None,
        ["x", "y", "z"],
        1,
        membership=model_membership(),
    )
    body["data_bias"] = jsonable(data_bias.to_dict())
    body["config"]["data"]["labels"] = ["x", "y", "z"]
    md = render_card(CardInputs("retune-topics", "1", body, dict(TAGS), RUN_ID, "champion"))
    assert "one-vs-rest for each of the 3 labels" in md
    assert "FPR, FNR and selection rate are for label `z`, the worst of 3 labels" in md
    assert "| z | 1.000 | 0.250 |" in md and "| x | 0.500 | 0.250 |" in md
    # Data: group A (x, x, y, z) vs B (x, y, z, z): x +0.25, y 0, z -0.25; x comes first.
    assert "| A | 4 | 50.0% | x | 0.500 | 0.250 | +0.250 |  |" in md
    assert "| B | 4 | 50.0% | x | 0.250 | 0.500 | -0.250 |  |" in md


def model_membership() -> pd.DataFrame:
    from test_fairness import MEMBERSHIP3

    return MEMBERSHIP3
