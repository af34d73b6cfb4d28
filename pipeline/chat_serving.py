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

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int, max_length: int):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.max_length = max_new_tokens, max_length

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
) -> str:
    """Log a saved causal LM folder as a pyfunc serving :class:`ChatModel`; its URI.

    Args:
        example: a frame with a ``messages`` column (JSON), the input example.
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
        model_config={"max_new_tokens": max_new_tokens, "max_length": max_length},
        requirements=modelstore.pins("torch", "transformers"),
    )
