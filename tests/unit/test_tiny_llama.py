"""The tiny-llama dev model: an offline, deterministic, standard Llama checkpoint."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from haif.devmodels import BUILD_MARKER, build_tiny_llama

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared with test_torch_runtime: a second build_tiny_llama call here is a no-op.
    return build_tiny_llama(tmp_path_factory.getbasetemp() / "tiny-llama")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_writes_a_complete_marked_checkpoint(model_dir: Path) -> None:
    marker = json.loads((model_dir / BUILD_MARKER).read_text())
    assert marker["seed"] == 0
    for name in ("config.json", "generation_config.json", "model.safetensors",
                 "tokenizer.json", "tokenizer_config.json"):
        assert name in marker["files"]
        assert (model_dir / name).is_file()
    assert not list(model_dir.parent.glob(".tiny-llama.build-*"))  # temp dir cleaned up


def test_build_is_idempotent(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_llama(model_dir) == model_dir
    assert weights.stat().st_mtime_ns == before


def test_build_is_deterministic_and_seeded(model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_llama(tmp_path / "again")
    other = build_tiny_llama(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _digest(again / name) == _digest(model_dir / name)
    assert _digest(other / "tokenizer.json") == _digest(model_dir / "tokenizer.json")
    assert _digest(other / "model.safetensors") != _digest(model_dir / "model.safetensors")
    # A different seed over an existing build replaces it.
    build_tiny_llama(tmp_path / "again", seed=1)
    assert _digest(again / "model.safetensors") == _digest(other / "model.safetensors")


def test_build_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_llama(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_config_is_a_standard_llama(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] == 64
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert 2000 <= config["vocab_size"] <= 4000
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert config["eos_token_id"] in generation["eos_token_id"]


def test_loads_with_transformers(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert len(tokenizer) == model.config.vocab_size
    ids = tokenizer("The river ran past the old mill.", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "  leading spaces, tabs\tand\nnew lines  ",
        "Unicode: café, naïve, Straße, 日本語, emoji 🙂👍🏽.",
        "Numbers 3.14159 and symbols <>{}[]|\\^~`@#$%",
    ],
)
def test_tokenizer_round_trips(model_dir: Path, text: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_compresses_corpus_like_text(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "The teacher carried a basket of plums to the market this morning."
    assert len(tokenizer(text, add_special_tokens=False).input_ids) <= 16


def test_chat_template_renders_turns(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello?"},
    ]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHello?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    bare = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert prompt.startswith(bare) and not bare.endswith("assistant\n")
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids[:2] == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")]
