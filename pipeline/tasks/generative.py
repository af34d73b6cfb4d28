"""Generative fine-tuning of a causal LM, the second kind behind the seam: ``chat``
(conversations, JSONL) and ``translation`` (source/target pairs rendered as chat turns).

What is its own (everything else is shared, see :mod:`pipeline.tasks.base`):
- data: conversations read and checked (:mod:`pipeline.conversations`) into the split
  table ``messages``/``prompt``/``response``/``group`` (+ ``source``/``target``), split by
  group so no prompt (no msgid) sits in two splits; GX checks of that table.
- the model: a causal LM (:mod:`pipeline.causal_lm`, SmolLM2 from its GGUF offline) tuned
  with the loss on the answers only (:mod:`pipeline.causal_training`).
- task metrics: loss, perplexity and next-token accuracy on the test answers; for
  translation chrF and BLEU of greedy translations; base and tuned answers side by side.
- forgetting: likelihood of general text and of the base's own answers
  (:mod:`pipeline.lm_retention`); bias: CrowS-Pairs by likelihood (:mod:`pipeline.lm_bias`).
- serving: an MLflow model answering ``messages`` (:mod:`pipeline.chat_serving`).

What depends only on the base and fixed inputs (its test answers, retention scores and
CrowS-Pairs preferences) is cached under the project's cache, keyed by the base weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline import (
    bias,
    cache,
    chat_serving,
    data,
    datasets,
    forgetting,
    identity,
    lineage,
    lm_bias,
    lm_retention,
    promotion,
    retention,
    sft,
)
from pipeline import conversations as conv
from pipeline.config import RetuneConfig
from pipeline.tasks.base import (
    Baseline,
    Champion,
    Evaluation,
    Frames,
    Retention,
    Trained,
    load_champion,
    sweep_blends,
)

INPUT = (("messages", "string"),)


@dataclass(frozen=True)
class GenerationReport:
    """A causal LM on the test conversations: answer loss (nats per token), perplexity,
    next-token accuracy; chrF and BLEU (0-100) of greedy answers for translation."""

    conversations: int
    answer_tokens: int
    answer_loss: float
    perplexity: float
    token_accuracy: float
    chrf: float | None = None
    bleu: float | None = None
    examples: list[dict[str, str]] = field(default_factory=list)  # prompt, reference, answer

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# --- data ------------------------------------------------------------------------------


def read_conversations(
    config: RetuneConfig, project_dir: Path, task: str
) -> tuple[list[list[conv.Turn]], list[str], list[conv.Pair] | None, str]:
    """The source's conversations, their groups, the pairs (translation) and what the
    manifest records as the source."""
    cfg, gen = config.data, config.generation
    example = cfg.source == data.EXAMPLE_SOURCE
    pairs = None
    if task == "chat":
        path = None if example else data.source_path(cfg.source, project_dir)
        turns = conv.load_chat_example() if path is None else conv.read_chat(path, cfg.encoding)
        described = f"example: {conv.CHAT_EXAMPLE_PACKAGE} chatterbot_corpus/data/english"
    else:
        if example:
            pairs = conv.load_translation_example(gen.example_language)
        else:
            path = data.source_path(cfg.source, project_dir)
            pairs = conv.read_pairs(path, gen.source_column, gen.target_column, cfg.encoding)
        turns = [conv.pair_conversation(p, gen.instruction) for p in pairs]
        described = (
            f"example: {conv.TRANSLATION_EXAMPLE_PACKAGE} "
            f"django/**/locale/{gen.example_language}/LC_MESSAGES/django.po"
        )
    if gen.system_prompt:
        system = {"role": "system", "content": gen.system_prompt}
        turns = [t if t[0]["role"] == "system" else [system, *t] for t in turns]
    groups = (
        [p.source for p in pairs] if pairs is not None else [conv.prompt_text(t) for t in turns]
    )
    source = described if example else data.describe_source(cfg, project_dir)
    return turns, groups, pairs, source


def prepare_conversations(config: RetuneConfig, project_dir: Path, task: str) -> data.PreparedData:
    """The split tables of the source (see the module docstring) and the rows dropped."""
    cfg = config.data
    if cfg.source.startswith(data.DATASET_PREFIX):
        frames = data.read_splits(project_dir / cfg.data_dir / data.dataset_name(cfg))
        return data.PreparedData(frames, {}, sum(len(f) for f in frames.values()))
    turns, groups, pairs, source = read_conversations(config, project_dir, task)
    table = conv.conversation_table(turns, groups, pairs)
    frame = data.split_by_group(table, cfg.validation_fraction, cfg.test_fraction)
    # The same prompt after lower-casing and folding whitespace stays out of later splits.
    frame, repeated = data.drop_cross_split_duplicates(frame.assign(text=frame["prompt"]))
    columns = [c for c in table.columns]
    frames = {
        split: frame.loc[frame["split"] == split, columns].reset_index(drop=True)
        for split in data.SPLITS
    }
    dropped = {data.DROP_CROSS_SPLIT: repeated} if repeated else {}
    return data.PreparedData(frames, dropped, len(table), source=source)


def base_path(config: RetuneConfig, project_dir: Path) -> str:
    """What ``from_pretrained`` loads for the base (a GGUF base converted once)."""
    from pipeline.causal_lm import resolve_causal_base

    return resolve_causal_base(config.train.base_model, project_dir / config.forgetting.cache_dir)


def token_counts(config: RetuneConfig, frames: Frames, project_dir: Path) -> Any:
    """Tokens of each conversation as the base's chat template renders it."""
    from transformers import AutoTokenizer

    from pipeline.validation import TokenCounts

    tokenizer = AutoTokenizer.from_pretrained(base_path(config, project_dir))
    counts = {
        split: [
            sft.tokenize_conversation(tokenizer, turns, 1 << 20).full_length
            for turns in conv.messages_of(frame)
        ]
        for split, frame in frames.items()
    }
    return TokenCounts(counts, config.train.max_length)


def train_distributed(
    config: RetuneConfig,
    train: pd.DataFrame,
    validation: pd.DataFrame,
    run_id: str | None,
    model_dir: Path,
    base: str,
) -> Any:
    """The causal LM trained under torchrun (DDP, or FSDP with ``train.fsdp``) by
    :mod:`pipeline.worker`; rank 0 saves it to ``model_dir``. Returns its FineTuneResult."""
    from pipeline import worker

    def write(work: Path, out: Path, checkpoints: Path) -> Path:
        train.to_csv(work / "train.csv", index=False)
        validation.to_csv(work / "validation.csv", index=False)
        return worker.write_spec(
            work / "spec.json",
            config.train,
            [],
            work / "train.csv",
            work / "validation.csv",
            out,
            checkpoints,
            config.forgetting,
            kind=worker.CAUSAL,
            base=base,
        )

    return worker.train_with_torchrun(config.train, run_id, model_dir, write)


# --- the model ---------------------------------------------------------------------------


def load_base(config: RetuneConfig, project_dir: Path) -> tuple[Any, Any]:
    from pipeline.causal_lm import load_causal_lm
    from pipeline.finetune import pick_device

    model, tokenizer = load_causal_lm(base_path(config, project_dir), config.train.seed)
    return model.to(pick_device()), tokenizer


def base_sha(config: RetuneConfig) -> str:
    return lineage.weights_sha256(config.train.base_model)


def prompts_of(frame: pd.DataFrame) -> list[list[conv.Turn]]:
    """Each conversation without its final answer: what the model is asked."""
    return [turns[:-1] for turns in conv.messages_of(frame)]


def measure(
    config: RetuneConfig, model: Any, tokenizer: Any, test: pd.DataFrame, task: str
) -> tuple[GenerationReport, list[str]]:
    """The task metrics of ``model`` on ``test`` and its greedy answers (every test prompt
    for translation, the report's examples for chat)."""
    from pipeline import lm_eval
    from pipeline.causal_training import _AnswerLoss, answer_loss
    from pipeline.finetune import pick_device, use_bf16

    items = sft.tokenize_all(tokenizer, conv.messages_of(test), config.train.max_length)
    bf16 = use_bf16(config.train.bf16, pick_device())
    scores = answer_loss(_AnswerLoss(model), items, tokenizer.pad_token_id, bf16)
    shown = config.generation.report_examples
    asked = prompts_of(test) if task == "translation" else prompts_of(test.head(shown))
    answers = lm_eval.generate(
        model,
        tokenizer,
        asked,
        config.generation.max_new_tokens,
        max_length=config.train.max_length,
    )
    quality = (
        lm_eval.translation_scores(answers, test["response"].tolist())
        if task == "translation"
        else {}
    )
    references = test["response"].head(shown).tolist()
    examples = [
        {"prompt": "\n".join(t["content"] for t in p), "reference": r, "answer": a}
        for p, r, a in zip(asked[:shown], references, answers[:shown], strict=False)
    ]
    report = GenerationReport(
        conversations=len(items),
        answer_tokens=sum(x.answer_tokens for x in items),
        answer_loss=scores["val_loss"],
        perplexity=scores["val_perplexity"],
        token_accuracy=scores["val_accuracy"],
        chrf=quality.get("chrf"),
        bleu=quality.get("bleu"),
        examples=examples,
    )
    return report, answers


def score_retention(
    config: RetuneConfig, model: Any, tokenizer: Any, suite: retention.Suite
) -> Retention:
    cfg = config.forgetting
    outputs = lm_retention.score_lm(model, tokenizer, suite.tasks, cfg.max_length)
    texts = forgetting.cka_texts(
        [t for t in suite.tasks if t.name != lm_retention.ANSWERS], cfg.cka_texts
    )
    layers = lm_retention.lm_layers(model, tokenizer, texts, cfg.max_length)
    return Retention(outputs, layers, cached=False)


def cached_retention(
    config: RetuneConfig, sha: str, suite: retention.Suite, project_dir: Path, compute: Any
) -> Retention:
    """Retention scores of the model with weights ``sha``, read from or saved to the cache."""
    if sha.startswith("unresolved:"):
        return compute()
    key = cache.texts_md5([t for task in suite.tasks for t in task.texts])
    path = forgetting.cache_file(project_dir / config.forgetting.cache_dir, sha, f"lm-{key}")
    found = forgetting.load_cached(path, suite.tasks)
    if found is not None:
        return Retention(found[0], found[1], cached=True)
    scored = compute()
    forgetting.save_cached(path, scored.outputs, scored.layers)
    return scored


def cached_report(
    config: RetuneConfig, sha: str, test: pd.DataFrame, project_dir: Path, compute: Any
) -> GenerationReport:
    """The base's report on ``test``, read from or saved to the cache: it depends only on
    the base weights, the test conversations and the generation settings."""
    if sha.startswith("unresolved:"):
        return compute()
    gen = config.generation
    key = {
        "what": "generation-report",
        "weights_sha256": sha,
        "texts_md5": cache.texts_md5(test["messages"].tolist()),
        "max_length": str(config.train.max_length),
        "max_new_tokens": str(gen.max_new_tokens),
        "report_examples": str(gen.report_examples),
    }
    folder = project_dir / config.forgetting.cache_dir / "lm"
    return GenerationReport(**cache.cached_json(folder, key, lambda: asdict(compute())))


def cached_preferences(
    config: RetuneConfig, sha: str, project_dir: Path, model: Any, tokenizer: Any
) -> np.ndarray:
    """CrowS-Pairs preferences of the model with weights ``sha`` (cached when it has one)."""
    if sha.startswith("unresolved:"):
        return crows_preferences(config, model, tokenizer)
    return cache.cached_array(
        project_dir / config.forgetting.cache_dir / "lm",
        {"what": "crows-preferences", "weights_sha256": sha},
        lambda: crows_preferences(config, model, tokenizer),
    )


def crows_preferences(config: RetuneConfig, model: Any, tokenizer: Any) -> np.ndarray:
    from pipeline import lm_eval

    return lm_eval.crows_preferences(model, tokenizer, identity.load_crows_pairs(), 128)


def measure_cached(
    config: RetuneConfig,
    sha: str,
    model: Any,
    tokenizer: Any,
    test: pd.DataFrame,
    suite: retention.Suite,
    project_dir: Path,
    task: str,
) -> tuple[GenerationReport, Retention, np.ndarray]:
    """A model that does not change (the base, the champion) on the test split, the
    retention suite and CrowS-Pairs, each cached by its weights ``sha``."""
    report = cached_report(
        config, sha, test, project_dir, lambda: measure(config, model, tokenizer, test, task)[0]
    )
    retained = cached_retention(
        config, sha, suite, project_dir, lambda: score_retention(config, model, tokenizer, suite)
    )
    return report, retained, cached_preferences(config, sha, project_dir, model, tokenizer)


class Generative:
    """Conversations or translation pairs -> a fine-tuned causal LM (see the module)."""

    def __init__(self, name: str):
        self.name = name

    def identity(self, config: RetuneConfig) -> promotion.ModelIdentity:
        return promotion.ModelIdentity(self.name, (), INPUT)

    def prepare(self, config: RetuneConfig, project_dir: Path) -> data.PreparedData:
        return prepare_conversations(config, project_dir, self.name)

    def validate(
        self, config: RetuneConfig, frames: Frames, docs_dir: Path | None, project_dir: Path
    ) -> Any:
        from pipeline.validation import validate_conversations

        tokens = token_counts(config, frames, project_dir)
        return validate_conversations(
            frames, config.validation, docs_dir, tokens, config.generation.max_length_ratio
        )

    def check_data_bias(
        self, config: RetuneConfig, frames: Frames, project_dir: Path
    ) -> bias.DataBiasReport:
        """Identity groups' representation over prompts and answers (no labels here)."""
        from pipeline.tasks.text_classification import load_lexicon

        frame = pd.concat([frames[s] for s in data.SPLITS], ignore_index=True)
        texts = (frame["prompt"] + "\n" + frame["response"]).tolist()
        return bias.check_data_bias(
            texts,
            ["conversation"] * len(texts),
            load_lexicon(config, project_dir),
            ["conversation"],
            config.bias.min_group_rows,
            min_group_share=config.bias.min_group_share,
        )

    def retention_suite(
        self, config: RetuneConfig, project_dir: Path, versioned: retention.Suite | None = None
    ) -> retention.Suite:
        """Likelihood tasks from the versioned suite (``versioned``, or the project's) plus
        the base's answers to the general prompts (generated once per base)."""
        from pipeline import lm_eval

        suite = versioned or datasets.ensure_suite(
            project_dir, config.forgetting, config.data.data_dir, push=config.data.dvc_push
        )
        tasks = lm_retention.text_tasks(suite.tasks, config.forgetting.brown_sentences // 10)
        prompts = lm_retention.general_prompts()

        def answer(asked: list[str]) -> list[str]:
            model, tokenizer = load_base(config, project_dir)
            turns = [[{"role": "user", "content": p}] for p in asked]
            return lm_eval.generate(model, tokenizer, turns, config.generation.max_new_tokens)

        answers = lm_retention.base_answers(
            prompts,
            answer,
            project_dir / config.forgetting.cache_dir / "lm",
            base_sha(config),
            config.generation.max_new_tokens,
        )
        answered = lm_retention.answers_task(prompts, answers)
        warnings = list(suite.warnings)
        if answered.texts:
            tasks.append(answered)
        else:
            warnings.append(
                f"{lm_retention.ANSWERS}: the base answered none of the general prompts "
                "(empty answers); the task is left out"
            )
        return retention.Suite(tasks, suite.md5, warnings, suite.folder)

    def measure_base(
        self,
        config: RetuneConfig,
        train: pd.DataFrame,
        test: pd.DataFrame,
        suite: retention.Suite,
        project_dir: Path,
    ) -> Baseline:
        """The untuned base on the test split (its report is the "probe" to beat), its
        retention scores and its CrowS-Pairs preferences (cached by its weights)."""
        model, tokenizer = load_base(config, project_dir)
        report, retained, prefs = measure_cached(
            config, base_sha(config), model, tokenizer, test, suite, project_dir, self.name
        )
        return Baseline(report, retained, lambda _: prefs)

    def measure_champion(
        self,
        config: RetuneConfig,
        test: pd.DataFrame,
        suite: retention.Suite,
        project_dir: Path,
        work_dir: Path,
    ) -> Champion | None:
        found = load_champion(config, work_dir)
        if found is None:
            return None
        version, loaded = found
        model, tokenizer = loaded.predictor.model, loaded.predictor.tokenizer
        # What the champion scores depends only on its weights: cached by their digest.
        digest = loaded.digest or "unresolved:champion"
        report, retained, prefs = measure_cached(
            config, digest, model, tokenizer, test, suite, project_dir, self.name
        )
        return Champion(version, retained, lambda _: prefs, report, {})

    def train(
        self,
        config: RetuneConfig,
        train: pd.DataFrame,
        validation: pd.DataFrame,
        run_id: str | None,
        model_dir: Path,
        project_dir: Path,
    ) -> Trained:
        """Fine-tune the base on the training conversations (loss on the answers); the
        merged model is saved to ``model_dir``."""
        from tqdm.auto import tqdm

        from pipeline import tracking
        from pipeline.causal_lm import load_causal_lm
        from pipeline.causal_training import train_causal
        from pipeline.finetune import pick_device

        base = base_path(config, project_dir)
        if config.train.nnodes * config.train.nproc_per_node > 1:
            result = train_distributed(config, train, validation, run_id, model_dir, base)
            model, tokenizer = load_causal_lm(str(model_dir), config.train.seed)
            return Trained(model.to(pick_device()), tokenizer, result, model_dir)
        model, tokenizer, result = train_causal(
            config.train,
            config.forgetting,
            base,
            conv.messages_of(train),
            conv.messages_of(validation),
            model_dir,
            checkpoint_dir=model_dir.parent / "checkpoints",
            logger=tracking.MlflowLogger(run_id) if run_id else None,
            progress=lambda total: tqdm(total=total, desc="fine-tune", unit="step"),
        )
        model.to(pick_device())
        return Trained(model, tokenizer, result, model_dir)

    def blend_with_base(
        self,
        config: RetuneConfig,
        trained: Trained,
        validation: pd.DataFrame,
        suite: retention.Suite,
        base: Baseline,
        project_dir: Path,
    ) -> Any:
        """WiSE-FT on every weight of the (merged) model: the blend with the best
        validation next-token accuracy on the answers within the forgetting budget. The
        chosen blend replaces the model in place and in its saved folder."""
        from pipeline import mitigation
        from pipeline.causal_training import _AnswerLoss, answer_loss
        from pipeline.finetune import save_model

        cfg, model, tokenizer = config.forgetting, trained.model, trained.processor
        base_model, _ = load_base(config, project_dir)
        base_state = mitigation.encoder_state(base_model, mitigation.whole)
        del base_model
        items = sft.tokenize_all(tokenizer, conv.messages_of(validation), config.train.max_length)

        def validate(blend: Any) -> float:
            scores = answer_loss(_AnswerLoss(blend), items, tokenizer.pad_token_id, bf16=False)
            return scores["val_accuracy"]

        def score(blend: Any) -> dict[str, forgetting.TaskOutputs]:
            return lm_retention.score_lm(blend, tokenizer, suite.tasks, cfg.max_length)

        choice = sweep_blends(
            config, model, base_state, validate, score, base, suite, mitigation.whole
        )
        save_model(model, tokenizer, trained.model_dir)
        return choice

    def evaluate(
        self,
        config: RetuneConfig,
        trained: Trained,
        test: pd.DataFrame,
        suite: retention.Suite,
        project_dir: Path,
    ) -> Evaluation:
        model, tokenizer = trained.model, trained.processor
        report, answers = measure(config, model, tokenizer, test, self.name)
        retained = score_retention(config, model, tokenizer, suite)
        prefs = crows_preferences(config, model, tokenizer)
        return Evaluation(report, retained, {"answers": answers, "crows": prefs})

    def check_model_bias(
        self,
        config: RetuneConfig,
        test: pd.DataFrame,
        trained: Trained,
        evaluation: Evaluation,
        base: Baseline,
        champion: Champion | None,
        project_dir: Path,
    ) -> lm_bias.LMBiasReport:
        """CrowS-Pairs stereotype preference: tuned against base (gated), and champion."""
        from pipeline import lm_eval

        pairs = identity.load_crows_pairs()
        tuned = evaluation.outputs["crows"]
        assert base.predict is not None
        cfg = config.bias
        shifts = lm_eval.preference_shift(
            pairs["bias_type"].tolist(), base.predict(pairs), tuned, cfg.bootstrap, cfg.seed
        )
        vs_champion = None
        if champion is not None:
            vs_champion = float(np.mean(tuned - champion.predict(pairs)))
        return lm_bias.compare_bias(
            shifts, cfg, vs_champion, champion.version if champion else None
        )

    def loaded_metric(
        self, config: RetuneConfig, model: Any, test: pd.DataFrame, project_dir: Path | None = None
    ) -> float:
        predictor = model.predictor
        report, _ = measure(config, predictor.model, predictor.tokenizer, test, self.name)
        return float(getattr(report, config.registry.primary_metric))

    def examples(
        self, config: RetuneConfig, test: pd.DataFrame, project_dir: Path | None = None
    ) -> pd.DataFrame:
        asked = prompts_of(test.head(2))
        return pd.DataFrame({"messages": [json.dumps(p, ensure_ascii=False) for p in asked]})

    def log_model(
        self,
        config: RetuneConfig,
        run_id: str,
        model_dir: Path,
        test: pd.DataFrame,
        project_dir: Path | None = None,
    ) -> str:
        gen = config.generation
        return chat_serving.log_chat_model(
            run_id,
            model_dir,
            self.examples(config, test),
            gen.max_new_tokens,
            config.train.max_length,
            gen.instruction if self.name == "translation" else "",
            gen.system_prompt,
        )
