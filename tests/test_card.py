"""The model card, from real report objects of a tiny hand-computed run."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipeline import bias, card, fairness, forgetting
from pipeline import tags as tag
from pipeline.card import CardInputs, render_card, write_card
from pipeline.config import BiasConfig, ForgettingConfig, RetuneConfig
from pipeline.evaluate import classification_metrics
from pipeline.finetune import EpochRecord, FineTuneResult
from pipeline.forgetting import TaskOutputs
from pipeline.gates import GateOutcome, GateStatus
from pipeline.reports import markdown_page
from pipeline.retention_tasks import RetentionTask
from pipeline.validation import ExpectationOutcome, ValidationReport

LABELS = ["fresh", "rotten"]
# 10 test rows: 6 fresh (id 0), 4 rotten. The tuned model misses row 5 and row 9:
# fresh P = R = 5/6, rotten P = R = 3/4, accuracy 0.8, macro-F1 (5/6 + 3/4) / 2 = 0.7917.
Y_TRUE = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
Y_PRED = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 0])
Y_PROBE = np.zeros(10, dtype=np.int64)  # the probe says fresh: accuracy 0.6, macro-F1 0.375
TEXTS = [f"review {i}" for i in range(10)]
# women: rows 0-4 (all fresh, all right); men: rows 5-9; old|er: rows 0-1 (too small).
MEMBERSHIP = pd.DataFrame(
    {
        "women": [True] * 5 + [False] * 5,
        "men": [False] * 5 + [True] * 5,
        "old|er": [True] * 2 + [False] * 8,
    }
)
RUN_ID = "0123456789abcdef0123456789abcdef"
TAGS = {
    "retune.data_md5": "aaaabbbbccccdddd.dir",
    "retune.dataset": "tiny-reviews",
    "retune.data_dvc_md5": "eeeeffff00001111.dir",
    "retune.dvc_remote": "/tmp/remote",
    "retune.git_commit": "c0ffee1234567890c0ffee1234567890c0ffee12",
    "retune.git_dirty": "false",
    "retune.config_hash": "1234abcd1234abcd",
    "retune.base_model": "packaged:all-MiniLM-L6-v2",
    "retune.base_model_sha256": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "retune.verdict": "accepted",
}


def jsonable(body: dict[str, Any]) -> dict[str, Any]:
    """What the flow writes and MLflow hands back: ``json.dumps(..., default=str)``."""
    return json.loads(json.dumps(body, default=str))


def forgetting_report() -> forgetting.ForgettingReport:
    """Two tasks. topics (probe, 10 items): base 10 right, tuned 8 -> drop 0.2. lee
    (similarity, 6 pairs): tuned swaps the last two ranks -> Spearman 1 - 6*2/210."""
    human = np.arange(1.0, 7.0)
    lee = RetentionTask(
        "lee",
        "similarity",
        "test",
        [f"doc {i}" for i in range(4)],
        pairs=np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]),
        scores=human,
    )
    topics = RetentionTask(
        "topics",
        "probe",
        "test",
        [f"text {i}" for i in range(20)],
        labels=np.arange(20) % 2,
        is_test=np.arange(20) >= 10,
        label_names=("a", "b"),
    )
    tasks = [lee, topics]
    swapped = np.array([1.0, 2.0, 3.0, 4.0, 6.0, 5.0])

    def outputs(lee_items: np.ndarray, right: int) -> dict[str, TaskOutputs]:
        from scipy.stats import spearmanr

        correct = (np.arange(10) < right).astype(np.float64)
        return {
            "lee": TaskOutputs("lee", lee_items, float(spearmanr(lee_items, human).statistic)),
            "topics": TaskOutputs("topics", correct, float(correct.mean())),
        }

    rng = np.random.default_rng(0)
    base_layers = rng.normal(size=(3, 20, 8))
    return forgetting.evaluate_forgetting(
        outputs(human, 10),
        outputs(swapped, 8),
        tasks,
        ForgettingConfig(gate="warn", bootstrap=200),
        "5u1te.dir",
        base_layers,
        base_layers + 0.1 * rng.normal(size=base_layers.shape),
        champion=outputs(human, 9),
        champion_version="2",
        warnings=["brown skipped: npm is not installed"],
        mitigation={"l2sp": 0.0, "distill": 5.0},
    )


def model_bias_report() -> fairness.ModelBiasReport:
    config = BiasConfig(
        min_group_rows=3,
        min_gate_rows=3,
        bootstrap=100,
        severity={"counterfactual_flips": "warn"},
    )
    originals = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    swaps = np.array([[0.85, 0.15], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]])  # the second flips
    flips = fairness.counterfactual_flips(
        originals, swaps, ["she a", "she b", "he c", "he d"], ["he a", "he b", "she c", "she d"]
    )
    crows = fairness.crows_pairs_divergence(
        ["gender", "gender", "gender", "race"],
        np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]]),
        np.array([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.7, 0.3]]),
    )
    candidate = fairness.check_model_bias(
        Y_TRUE, Y_PRED, MEMBERSHIP, config, LABELS, flips, crows, "candidate"
    )
    probe = fairness.check_model_bias(
        Y_TRUE, Y_PROBE, MEMBERSHIP, config, LABELS, None, crows, "base probe"
    )
    return fairness.evaluate_model_bias(candidate, config, base_probe=probe)


def reports() -> dict[str, dict[str, Any]]:
    validation = ValidationReport(
        outcomes=[
            ExpectationOutcome(
                "train", "schema", "expect_table_columns_to_match_set", None, True, "error", None, 1
            ),
            ExpectationOutcome(
                "all",
                "duplicates",
                "expect_column_values_to_be_null",
                "_repeated_text",
                False,
                "warn",
                1,
                10,
            ),
        ],
        severities={"schema": "error", "duplicates": "warn"},
    )
    data_bias = bias.check_data_bias(
        TEXTS,
        [LABELS[i] for i in Y_TRUE],
        None,
        LABELS,
        3,
        min_group_share=0.25,
        membership=MEMBERSHIP,
    )
    training = FineTuneResult(
        history=[
            EpochRecord(1, 0.62, 0.51, 0.70, 6.0, 100.0, 0.69),
            EpochRecord(2, 0.41, 0.45, 0.80, 6.5, 95.0, 0.79),
        ],
        best_epoch=2,
        train_seconds=12.5,
        trainable_parameters=1_234,
        total_parameters=22_000,
        device="cpu",
        bf16=False,
    )
    config = RetuneConfig.model_validate(
        {"data": {"name": "tiny-reviews", "labels": LABELS}, "train": {"epochs": 3}}
    )
    return {
        "validation": jsonable(validation.to_dict()),
        "data_bias": jsonable(data_bias.to_dict()),
        "test_metrics": jsonable(classification_metrics(Y_TRUE, Y_PRED, LABELS).to_dict()),
        "probe_baseline": jsonable(classification_metrics(Y_TRUE, Y_PROBE, LABELS).to_dict()),
        "forgetting": jsonable(forgetting_report().to_dict()),
        "bias": jsonable(model_bias_report().to_dict()),
        "training": jsonable(asdict(training)),
        "config": jsonable(config.model_dump()),
    }


@pytest.fixture(scope="module")
def full() -> CardInputs:
    return CardInputs(
        "retune-sentiment", "3", reports(), dict(TAGS), RUN_ID, "champion: beats v2 by 0.0100"
    )


def section(markdown: str, title: str) -> str:
    """The text of one ``## title`` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert match, f"no section {title!r}"
    return match.group(1)


def cells(row: str) -> list[str]:
    """A Markdown table row's cells, split on pipes that are not backslash-escaped."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


SECTIONS = (
    "Intended use",
    "Model",
    "Data",
    "Test metrics",
    "Per-group metrics",
    "Forgetting",
    "Bias",
    "Limitations",
    "Reproduce",
)


def test_full_card_title_and_every_section_in_order(full):
    md = render_card(full)
    assert md.startswith("# Model card: retune-sentiment version 3\n")
    assert f"**MLflow run:** `{RUN_ID}`" in md
    assert "**Promotion:** champion: beats v2 by 0.0100" in md
    assert [line[3:] for line in md.splitlines() if line.startswith("## ")] == list(SECTIONS)
    assert card.NOT_RECORDED not in md.replace("**Promotion:** not recorded", "")


def test_intended_use_lists_the_labels_positive_first(full):
    text = section(render_card(full), "Intended use")
    assert "text classification into 2 labels: `fresh`, `rotten`." in text
    assert "**Positive label:** `fresh`, the first configured label" in text
    assert "dataset `tiny-reviews`" in text
    assert "a text longer than 128 tokens is truncated" in text
    assert "English (the base model was pretrained on English text)" in text


def test_model_section_reads_config_training_and_tags(full):
    text = section(render_card(full), "Model")
    assert "`packaged:all-MiniLM-L6-v2` (weights sha256 `53aa51172d142c89…`)" in text
    assert "`partial`: the embeddings and the first 3 encoder layers are frozen" in text
    assert "2 epochs run of 3 configured (early stopping on val_loss, patience 1)" in text
    assert "best epoch 2 (validation loss 0.4500, accuracy 0.8000, macro-F1 0.7900)" in text
    assert "12.5 s on cpu (bf16 off); 1,234 of 22,000 parameters trainable" in text
    assert "weight 5; no L2-SP; no WiSE-FT" in text
    assert f"git commit `{TAGS['retune.git_commit']}`; config hash `1234abcd1234abcd`" in text


def test_data_section_has_versions_rows_validation_and_groups(full):
    text = section(render_card(full), "Data")
    assert "**Dataset:** `tiny-reviews`, DVC md5 `aaaabbbbccccdddd.dir`" in text
    assert "hashed to `eeeeffff00001111.dir`" in text
    assert "**Rows:** 10 over all splits; 10 test rows evaluated" in text
    assert (
        "**Validation:** passed with 1 warning: 1 of 2 expectations failed (0 errors, 1 warning)"
        in text
    )
    assert "- all: duplicates failed on 1 of 10 rows \\[warn]" in text
    # old|er: 2 of 10 rows, all fresh; the rest 4 of 8 fresh -> +0.500, under 25% share.
    assert (
        "| old\\|er | 2 | 20.0% | 1.000 | 0.500 | +0.500 | too small to judge, under-represented |"
        in text
    )


def test_rows_per_split_when_recorded(full):
    rows = {"train": 80, "validation": 10, "test": 10, "train_used": 40, "test_used": 10}
    inputs = replace(full, reports=full.reports | {"rows": rows})
    assert "**Rows:** train 80 (used 40), validation 10, test 10" in render_card(inputs)


def test_test_metrics_match_the_hand_computed_values(full):
    text = section(render_card(full), "Test metrics")
    assert "on 10 test rows: accuracy **0.8000**, macro-F1 **0.7917** (primary metric)." in text
    assert "accuracy 0.6000, macro-F1 0.3750; fine-tuning adds +0.2000 accuracy and +0.4167" in text
    assert "| fresh | 0.8333 | 0.8333 | 0.8333 | 6 |" in text
    assert "| rotten | 0.7500 | 0.7500 | 0.7500 | 4 |" in text


def test_per_group_table_and_disparities(full):
    text = section(render_card(full), "Per-group metrics")
    # women: all fresh and right: FPR undefined. men: rows 5-9, truth 0 1 1 1 1, predicted
    # 1 1 1 1 0: accuracy 0.6, macro-F1 (0 + 0.75) / 2, FPR 1/4, FNR 1/1, selection 1/5.
    assert "| women | 5 | 1.0000 | 1.0000 | n/a | 0.0000 | 1.0000 | no |" in text
    assert "| men | 5 | 0.6000 | 0.3750 | 0.2500 | 1.0000 | 0.2000 | no |" in text
    assert "| old\\|er | 2 | 1.0000 | 1.0000 | n/a | 0.0000 | 1.0000 | yes |" in text
    assert "| (all rows) | 10 | 0.8000 | 0.7917 | 0.2500 | 0.1667 | 0.6000 | no |" in text
    # selection 1.0 vs 0.2; only FNR is defined in both compared groups: 1.0 - 0.0.
    assert "Across the compared groups (women, men): demographic parity difference 0.800" in text
    assert "equalized odds difference 1.000" in text


def test_forgetting_table_drops_and_gate(full):
    text = section(render_card(full), "Forgetting")
    lee_drop = 12 / 210  # 1 - Spearman of the swapped ranks
    assert f"| lee | spearman | 6 | 1.000 | {1 - lee_drop:.3f} | +{lee_drop:.3f} |" in text
    assert "| topics | accuracy | 10 | 1.000 | 0.800 | +0.200 |" in text
    assert "| 80.0% | +0.100 |" in text  # retention, and the drop against champion v2 (0.9)
    assert f"Mean drop +{(0.2 + lee_drop) / 2:.3f}" in text
    assert "worst task `topics` +0.200" in text
    assert (
        "**Gate:** warned (mode warn; limits: the mean drop's upper 95% bound 0.020, any " in text
    )
    assert "- topics: accuracy 1.000 -> 0.800, drop 0.200" in text
    assert "drop vs champion v2" in text
    assert "- brown skipped: npm is not installed" in text


def test_bias_section_gate_swaps_crows_and_comparison(full):
    text = section(render_card(full), "Bias")
    assert "**Gate:** refused." in text  # equalized odds 1.0, above 0.10
    assert "| equalized_odds | error | failed | 1.000 | 0.100 |" in text
    assert "| counterfactual_flips | warn | failed | 0.250 | 0.050 |" in text
    assert "| champion_regression | error | not run | n/a | 0.020 | no champion |" in text
    assert "1 of 4 predictions changed label" in text
    assert "| gender | 3 | 0.333 |" in text  # the second gender pair differs
    assert "| measure | candidate | base probe |" in text
    assert "| accuracy (all rows) | 0.800 | 0.600 |" in text


def test_limitations_come_from_the_data(full):
    text = section(render_card(full), "Limitations")
    assert "Too few test rows to judge (under 3): old\\|er (2 rows)" in text
    assert "Group old\\|er is under-represented in the data: 2 rows (20.0%)." in text
    assert "Bias check counterfactual_flips warned: counterfactual flip rate 0.250" in text
    assert "The forgetting gate warned (warn mode, not refused): mean drop 0.129" in text
    assert "Retention suite: brown skipped: npm is not installed." in text
    assert "Data validation warned: all: duplicates failed on 1 of 10 rows" in text
    assert "The labels are imbalanced: 'fresh' has 1.5x the test rows of 'rotten'" in text
    assert "The weakest label is 'rotten' (F1 0.7500)." in text
    assert "pretrained on English text" in text
    assert ".." not in text


def test_reproduce_names_model_version_commit_and_run(full):
    text = section(render_card(full), "Reproduce")
    assert "```bash\nretune reproduce retune-sentiment/3 --project-dir .\n```" in text
    assert f"git checkout {TAGS['retune.git_commit']}\n" in text
    assert "dvc checkout data.dvc  # data/ at md5 eeeeffff00001111.dir" in text
    assert f"--run-id {RUN_ID} --artifact-path reports/config.json --dst-path ." in text
    assert "retune run --config config.json --project-dir ." in text
    assert "uncommitted changes" not in text


def test_reproduce_for_a_dirty_tree_and_an_unregistered_run(full):
    dirty = replace(full, tags=full.tags | {"retune.git_dirty": "true"})
    assert "uncommitted changes" in section(render_card(dirty), "Reproduce")
    md = render_card(replace(full, version=None))
    assert md.startswith("# Model card: retune-sentiment (not registered)\n")
    text = section(md, "Reproduce")
    assert "retune reproduce" not in text.split("```")[1::2][0]
    assert "was not registered" in text
    odd = replace(full, model_name="my model")  # quoted for the shell
    assert "retune reproduce 'my model/3' --project-dir ." in render_card(odd)


def test_missing_reports_say_not_recorded():
    md = render_card(CardInputs("m", "1", {}, {}, "run1"))
    assert [line[3:] for line in md.splitlines() if line.startswith("## ")] == list(SECTIONS)
    for title in ("Test metrics", "Per-group metrics", "Forgetting", "Bias"):
        assert "not recorded" in section(md, title), title
    assert "**Labels:** not recorded." in md
    assert "**Base model:** not recorded" in md
    assert "**Strategy:** not recorded" in md
    assert "**Validation:** not recorded" in md
    assert "retune reproduce m/1 --project-dir ." in md
    assert "git checkout <commit>" in md
    assert "<h2>Reproduce</h2>" in markdown_page(md, "m")  # and it converts


def test_partial_and_malformed_reports_do_not_crash(full):
    only = {"test_metrics": full.reports["test_metrics"], "forgetting": {"base": {"tasks": [3]}}}
    md = render_card(CardInputs("m", "1", only, {"retune.validation": "passed"}, "r"))
    assert "| fresh | 0.8333 |" in md  # labels fall back to the per-class rows
    assert "text classification into 2 labels: `fresh`, `rotten`" in md
    assert "**Validation:** passed (report not recorded)" in md
    assert "Mean drop n/a" in md


def test_none_and_nan_print_as_na(full):
    test = full.reports["test_metrics"] | {"accuracy": None, "macro_f1": math.nan}
    md = render_card(replace(full, reports=full.reports | {"test_metrics": test}))
    assert "accuracy **n/a**, macro-F1 **n/a**" in md
    assert "nan" not in md.lower().replace("nana", "")


def with_labels(inputs: CardInputs, labels: list[str], **changes: Any) -> CardInputs:
    """The same run with other label names (in the config and the test metrics)."""
    config = inputs.reports["config"]
    return replace(
        inputs,
        reports=inputs.reports
        | {
            "test_metrics": jsonable(classification_metrics(Y_TRUE, Y_PRED, labels).to_dict()),
            "config": config | {"data": config["data"] | {"labels": labels}},
        },
        **changes,
    )


def test_every_table_row_has_as_many_cells_as_its_header(full):
    md = render_card(with_labels(full, ["good|bad", "so-so\nmeh"]))
    assert "labels: `good|bad`, `so-so meh`." in md
    assert "| good\\|bad | 0.8333 |" in md and "| so-so meh | 0.7500 |" in md
    tables = re.findall(r"(?:^\|.*\n)+", md, re.M)
    assert len(tables) == 7  # data groups, per-class, per-group, forgetting, gate, crows, compare
    for table in tables:
        rows = table.splitlines()
        assert {len(cells(r)) for r in rows} == {len(cells(rows[0]))}, rows[0]


def test_write_card_writes_the_markdown_and_an_escaped_html_page(full, tmp_path):
    evil = with_labels(full, ["a|b", "<b>x</b> & `y`"], model_name="<script>alert(1)</script>")
    md_path, html_path = write_card(tmp_path / "card", evil)
    assert (md_path.name, html_path.name) == ("model_card.md", "model_card.html")
    assert md_path.read_text(encoding="utf-8") == render_card(evil)
    page = html_path.read_text(encoding="utf-8")
    assert "<script>" not in page and "<b>" not in page
    assert "<title>&lt;script&gt;alert(1)&lt;/script&gt; model card</title>" in page
    assert "<h1>Model card: &lt;script&gt;alert(1)&lt;/script&gt; version 3</h1>" in page
    assert page.count("<table>") == 7
    # markdown-it writes one cell per line, alignment as an inline style.
    assert '<td>a|b</td>\n<td style="text-align:right">0.8333</td>' in page
    assert "<td>&lt;b&gt;x&lt;/b&gt; &amp; `y`</td>" in page
    assert "<li><strong>Task:</strong> text classification into 2 labels: <code>a|b</code>" in page
    assert "<code>&lt;b&gt;x&lt;/b&gt; &amp; `y`</code>" in page
    assert (
        '<pre><code class="language-bash">retune reproduce '
        "'&lt;script&gt;alert(1)&lt;/script&gt;/3' --project-dir .\n</code></pre>"
    ) in page
    assert "<h2>Limitations</h2>" in page and "<ul>\n<li>" in page
    assert "border-collapse: collapse" in page  # the reports' own style sheet


def test_markdown_page_is_commonmark_with_tables_and_no_raw_html():
    page = markdown_page(
        "a **b** ``c`d`` \\*e\\* **f\n\n<b>raw</b> <!-- c -->\n\n"
        "| h | n |\n| --- | ---: |\n| x | 1 |",
        "t",
    )
    assert "<p>a <strong>b</strong> <code>c`d</code> *e* **f</p>" in page
    assert "<p>&lt;b&gt;raw&lt;/b&gt; &lt;!-- c --&gt;</p>" in page
    assert '<th>h</th>\n<th style="text-align:right">n</th>' in page


def test_gate_statuses_come_from_the_gate_tags(full):
    outcomes = [
        GateOutcome("validation", GateStatus.PASSED, "passed"),
        GateOutcome("forgetting", GateStatus.WARNED, "warned: mean drop 0.129 > 0.02"),
        GateOutcome("bias", GateStatus.REFUSED, "refused: equalized odds 1.000 > 0.10"),
    ]
    gate_tags = {k: v for o in outcomes for k, v in o.to_tags().items()}
    md = render_card(replace(full, tags=full.tags | gate_tags))
    assert "- **Gate statuses:** validation passed, forgetting warned, bias refused\n" in md
    assert "Gate statuses" not in render_card(full)  # none recorded: no line
    # A section whose report is missing still says what its gate recorded.
    bare = render_card(CardInputs("m", "1", {}, {tag.gate_status("bias"): "refused"}, "r"))
    assert "Bias: not recorded. The bias gate's recorded status: refused." in bare
    assert "Forgetting: not recorded.\n" in bare


def test_another_kind_of_task_is_not_described_as_text_classification(full):
    """An image classifier with only test metrics: no text, language or lexicon claims."""
    tags = {tag.IDENTITY_TASK: "image-classification", tag.BASE_MODEL: "efficientnet-lite0"}
    only = {"test_metrics": full.reports["test_metrics"]}
    md = render_card(CardInputs("scans", "2", only, tags, "r"))
    assert "**Task:** image classification into 2 labels: `fresh`, `rotten`." in md
    assert "meant for" not in md  # no dataset recorded
    for claim in ("text", "English", "languages", "lexicons", "CrowS-Pairs", "retention suite"):
        assert claim not in md.replace("context", ""), claim
    for title in ("Per-group metrics", "Forgetting", "Bias"):
        assert f"{title}: not recorded." in section(md, title), title
    limits = section(md, "Limitations")
    assert "one held-out split of the same source" in limits
    assert "The weakest label is 'rotten' (F1 0.7500)." in limits
    generative = render_card(
        CardInputs("chat", "1", {}, {tag.IDENTITY_TASK: "text-generation"}, "r")
    )
    assert "- **Task:** text generation.\n" in generative
    assert "Labels:" not in generative


def test_lp_ft_epochs_and_a_multilingual_base_model(full):
    config = full.reports["config"]
    lpft = config | {"train": config["train"] | {"strategy": "lp-ft", "lpft_probe_epochs": 5}}
    tags = full.tags | {"retune.base_model": "paraphrase-multilingual-MiniLM-L12-v2"}
    md = render_card(replace(full, reports=full.reports | {"config": lpft}, tags=tags))
    assert "`lp-ft`: a linear probe (encoder frozen) for 5 epochs, then full fine-tuning." in md
    assert "2 epochs run of 5 probe + 3 full configured" in md
    assert "English" not in md


def test_an_image_classifiers_card_names_its_backbone_pixels_and_scores():
    """The image kind's card: backbone words, the image size, specificity and ROC-AUC per
    class from its scored report, and a plain sentence when there are no groups."""
    import numpy as np

    from pipeline.evaluate import scored_metrics

    labels = ["cat", "dog"]
    y_true = np.array([0, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])
    config = RetuneConfig.model_validate(
        {"task": "image-classification", "data": {"labels": labels}, "image": {"size": 96}}
    )
    no_groups = fairness.check_model_bias(
        y_true, probs.argmax(1), pd.DataFrame(index=range(5)), config.bias, labels
    )
    body = reports() | {
        "config": jsonable(config.model_dump()),
        "test_metrics": jsonable(scored_metrics(y_true, probs, labels).to_dict()),
        "bias": jsonable(fairness.evaluate_model_bias(no_groups, config.bias).to_dict()),
    }
    card = render_card(CardInputs("retune-pets", "1", body, dict(TAGS), RUN_ID))
    model = section(card, "Model")
    assert "the stem and the first 10 blocks of the backbone are frozen" in model
    assert "images at 96 px" in model and "tokens" not in model
    metrics = section(card, "Test metrics")
    # cat: TP 1, FN 1, FP 1 (row 5), TN 2 -> specificity 2/3; its AUC from the cat scores:
    # cats 0.9, 0.4 against dogs 0.2, 0.3, 0.6 -> 5 of 6 pairs ranked right
    cat = next(r for r in metrics.splitlines() if r.startswith("| cat |"))
    assert cells(cat)[3] == "0.6667" and cells(cat)[4] == "0.8333"
    assert "No groups to compare" in section(card, "Per-group metrics")
