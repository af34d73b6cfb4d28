"""Serving a fine-tuned causal LM: conversations in, greedy answers out.

:class:`ChatModel` is the predictor the logged MLflow model serves (see
:mod:`pipeline.modelstore`): its input frame has a ``messages`` column, each a conversation
as JSON (a list of ``{"role", "content"}`` turns ending with the user's), and its output an
``answer`` column. The saved folder holds safetensors weights, the tokenizer and its chat
template, so what is served answers through the same template the model was tuned with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.serving import ServingInputError

MESSAGES_COLUMN = "messages"
ANSWER_COLUMN = "answer"
DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_MAX_LENGTH = 512


def parse_conversations(model_input: Any) -> tuple[list[list[dict[str, str]]], Any]:
    """The conversations of an input frame (``messages``: JSON text or lists of turns), a
    Series or a list, and the index to keep.

    Raises:
        ServingInputError: no ``messages`` column, or a row that is not a list of turns.
    """
    from pipeline.conversations import ROLES

    if isinstance(model_input, pd.DataFrame):
        if MESSAGES_COLUMN not in model_input.columns:
            found = ", ".join(map(str, model_input.columns)) or "no columns"
            raise ServingInputError(f"input has no '{MESSAGES_COLUMN}' column; found: {found}")
        values, index = model_input[MESSAGES_COLUMN].tolist(), model_input.index
    elif isinstance(model_input, pd.Series | list | tuple):
        values, index = list(model_input), getattr(model_input, "index", None)
    else:
        raise ServingInputError(
            f"expected a frame with a '{MESSAGES_COLUMN}' column; got {type(model_input).__name__}"
        )
    conversations = []
    for i, value in enumerate(values):
        turns = json.loads(value) if isinstance(value, str) else value
        ok = (
            isinstance(turns, list)
            and turns
            and all(
                isinstance(t, dict) and t.get("role") in ROLES and isinstance(t.get("content"), str)
                for t in turns
            )
        )
        if not ok:
            raise ServingInputError(
                f"row {i}: '{MESSAGES_COLUMN}' must be a list of {{role, content}} turns"
            )
        conversations.append(list(turns))
    return conversations, index


class ChatModel:
    """A saved causal LM answering conversations greedily (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_new_tokens: int,
        max_length: int,
        instruction: str = "",
        system_prompt: str | None = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.max_length = max_new_tokens, max_length
        self.instruction, self.system_prompt = instruction, system_prompt

    def wrap(self, text: str) -> list[dict[str, str]]:
        """A plain text as the conversation the model was tuned on: the system prompt and,
        for a translator, the instruction before the text."""
        content = f"{self.instruction}\n{text}" if self.instruction else text
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": content}]

    @classmethod
    def load(cls, folder: Path, config: dict[str, Any]) -> ChatModel:
        """The model saved in ``folder``, on the GPU if there is one.

        Args:
            config: the logged model config: ``max_new_tokens`` and ``max_length``.
        """
        import torch
        from transformers.utils import logging as hf_logging

        from pipeline.causal_lm import load_causal_lm

        hf_logging.disable_progress_bar()
        model, tokenizer = load_causal_lm(str(folder))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return cls(
            model.to(device),
            tokenizer,
            int(config.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
            int(config.get("max_length", DEFAULT_MAX_LENGTH)),
            str(config.get("instruction") or ""),
            config.get("system_prompt") or None,
        )

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One greedy answer per conversation, in input order."""
        from pipeline.lm_eval import generate

        conversations, index = parse_conversations(model_input)
        new_tokens = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        answers = generate(
            self.model, self.tokenizer, conversations, new_tokens, max_length=self.max_length
        )
        out = pd.DataFrame({ANSWER_COLUMN: answers})
        if index is not None:
            out.index = index
        return out


def check_causal_model_dir(model_dir: Path) -> None:
    """Raise ServingInputError unless ``model_dir`` holds a servable merged causal LM."""
    if (model_dir / "adapter_config.json").is_file():
        raise ServingInputError(f"{model_dir} holds a PEFT adapter, not a merged model")
    for name in ("model.safetensors", "config.json"):
        if not (model_dir / name).is_file():
            raise ServingInputError(f"{model_dir} holds no {name}")
    pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in {".bin", ".pt", ".pkl"})
    if pickled:
        raise ServingInputError(f"{model_dir} holds pickled files ({', '.join(pickled)})")


def log_chat_model(
    run_id: str,
    model_dir: Path,
    example: pd.DataFrame,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_length: int = DEFAULT_MAX_LENGTH,
    instruction: str = "",
    system_prompt: str | None = None,
) -> str:
    """Log a saved causal LM folder as a pyfunc serving :class:`ChatModel`; its URI.

    Args:
        example: a frame with a ``messages`` column (JSON), the input example.
        instruction, system_prompt: how a plain text becomes the conversation the model
            was tuned on (:meth:`ChatModel.wrap`: ``retune generate``, ``retune predict``).
    """
    from pipeline import modelstore

    check_causal_model_dir(Path(model_dir))
    signature = modelstore.Signature(
        inputs=(modelstore.Column(MESSAGES_COLUMN, "string"),),
        outputs=(modelstore.Column(ANSWER_COLUMN, "string"),),
        params=(modelstore.Param("max_new_tokens", "long", max_new_tokens),),
    )
    return modelstore.log_model(
        run_id,
        Path(model_dir),
        example=example.head(2).reset_index(drop=True),
        signature=signature,
        predictor_class=ChatModel,
        model_config={
            "max_new_tokens": max_new_tokens,
            "max_length": max_length,
            "instruction": instruction,
            "system_prompt": system_prompt or "",
        },
        requirements=modelstore.pins("torch", "transformers"),
    )


def answer_file(
    model_uri: str,
    path: Path,
    out: Path,
    text_column: str = "text",
    batch_size: int = 8,
    progress: bool = True,
) -> int:
    """Answer every row of a CSV or JSONL file; write its rows plus ``answer``.

    A row is a conversation (a ``messages`` column: a list of turns, or its JSON) or a plain
    text (``text_column``), wrapped as the model was tuned (:meth:`ChatModel.wrap`).

    Raises:
        ServingInputError: bad input, an output suffix other than .csv/.jsonl, ``out``
            equal to ``path``, or an ``answer`` column already in the file.
    """
    from tqdm.auto import tqdm

    from pipeline import modelstore
    from pipeline.cpu import set_cpu_threads
    from pipeline.serving import READERS, read_table, write_table

    path, out = Path(path), Path(out)
    if out.suffix.lower() not in READERS:
        raise ServingInputError(f"output {out}: expected a {' or '.join(READERS)} file")
    if out.resolve() == path.resolve():
        raise ServingInputError(f"output {out} is the input file; write somewhere else")
    column = MESSAGES_COLUMN if _has_column(path, MESSAGES_COLUMN) else text_column
    frame = (
        read_table(path, column).reset_index(drop=True)
        if column == text_column
        else (_read_messages(path))
    )
    if ANSWER_COLUMN in frame.columns:
        raise ServingInputError(f"{path} already has an '{ANSWER_COLUMN}' column; rename it")
    set_cpu_threads()
    model = modelstore.load_model(model_uri)
    chat: ChatModel = model.predictor
    if column == MESSAGES_COLUMN:
        conversations, _ = parse_conversations(frame)
    else:
        conversations = [chat.wrap(t) for t in frame[text_column]]
    answers: list[str] = []
    with tqdm(total=len(conversations), desc="answer", unit="row", disable=not progress) as bar:
        for start in range(0, len(conversations), batch_size):
            part = conversations[start : start + batch_size]
            answers += chat.predict(pd.DataFrame({MESSAGES_COLUMN: [json.dumps(c) for c in part]}))[
                ANSWER_COLUMN
            ].tolist()
            bar.update(len(part))
    write_table(frame.assign(**{ANSWER_COLUMN: answers}), out)
    return len(frame)


def _has_column(path: Path, column: str) -> bool:
    if path.suffix.lower() == ".jsonl" and path.is_file():
        first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line), "")
        try:
            return column in json.loads(first)
        except (json.JSONDecodeError, TypeError):
            return False
    return False


def _read_messages(path: Path) -> pd.DataFrame:
    frame = pd.read_json(path, lines=True, dtype=False, convert_dates=False, encoding="utf-8")
    frame[MESSAGES_COLUMN] = [
        m if isinstance(m, str) else json.dumps(m, ensure_ascii=False)
        for m in frame[MESSAGES_COLUMN]
    ]
    return frame
