"""Causal base models: what is not one is refused; the packaged GGUF converts once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline import causal_lm


def test_a_folder_that_is_not_a_causal_lm_is_refused(tiny_base_model: Path, tmp_path: Path):
    with pytest.raises(causal_lm.NotACausalLM, match=r"is a bert model .*not a causal language"):
        causal_lm.resolve_causal_base(str(tiny_base_model), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(causal_lm.NotACausalLM, match=r"empty: not a model folder"):
        causal_lm.resolve_causal_base(str(tmp_path / "empty"), tmp_path)
    with pytest.raises(causal_lm.NotACausalLM, match=r"no such GGUF file"):
        causal_lm.resolve_causal_base(str(tmp_path / "missing.gguf"), tmp_path)


def test_a_causal_lm_folder_loads_with_its_padding_set(tiny_causal_lm: Path, tmp_path: Path):
    assert causal_lm.resolve_causal_base(str(tiny_causal_lm), tmp_path) == str(tiny_causal_lm)
    assert causal_lm.resolve_causal_base("org/some-hub-model", tmp_path) == "org/some-hub-model"
    model, tokenizer = causal_lm.load_causal_lm(str(tiny_causal_lm))
    assert not model.training and tokenizer.padding_side == "right"
    assert tokenizer.pad_token_id is not None
    assert next(model.parameters()).dtype == torch.float32


def test_a_model_without_a_chat_template_is_refused(tiny_causal_lm: Path, tmp_path: Path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_causal_lm, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = bare / "tokenizer_config.json"
    import json

    settings = json.loads(config.read_text())
    settings.pop("chat_template", None)
    config.write_text(json.dumps(settings))
    with pytest.raises(causal_lm.NotACausalLM, match=r"has no chat template"):
        causal_lm.load_causal_lm(str(bare))


@pytest.mark.e2e
def test_the_packaged_smollm2_converts_once_and_answers_like_the_gguf(tmp_path: Path):
    from transformers import AutoModelForCausalLM

    folder = Path(causal_lm.resolve_causal_base(causal_lm.PACKAGED_SMOLLM2, tmp_path))
    gguf = causal_lm.package_file(causal_lm.SMOLLM2_FILE, causal_lm.SMOLLM2_REQUIREMENT)
    assert folder == tmp_path / "gguf" / causal_lm.file_sha256(gguf)
    written = (folder / "model.safetensors").stat().st_mtime_ns
    again = causal_lm.resolve_causal_base(causal_lm.PACKAGED_SMOLLM2, tmp_path)
    assert Path(again) == folder and (folder / "model.safetensors").stat().st_mtime_ns == written
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [folder.name]  # no scratch left

    model, tokenizer = causal_lm.load_causal_lm(str(folder))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ids = tokenizer("Hello, how are you?", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, direct(**ids).logits)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
