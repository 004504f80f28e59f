"""Build ``tiny-llama``: a small random-weight Llama checkpoint with its own tokenizer.

Everything comes from this package: the tokenizer is a byte-level BPE trained on
``corpus.txt`` and the weights are drawn from a seeded generator, so a build needs no
network and the same seed gives the same files. The directory is a standard
Hugging Face checkpoint (``LlamaForCausalLM``, safetensors, float32, head_dim 64), so
transformers and vLLM load it like any other model.

A build is written into a temporary directory beside ``out_dir`` and renamed into
place; the marker file ``.haif-build.json`` is written last, and its presence (with a
matching seed and format version) is what makes a directory count as built.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
BUILD_MARKER = ".haif-build.json"
CORPUS_PATH = Path(__file__).resolve().with_name("corpus.txt")

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Trained first, so they take ids 0..4 in this order.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START, IM_END)
TARGET_VOCAB_SIZE = 3072

# ChatML turns after a BOS. Runtimes that also add a BOS when tokenizing must drop the
# duplicate (``TorchRuntime`` does); vLLM tokenizes chat prompts without special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MODEL_SHAPE: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
}
INIT_STD = 0.02
# A wider output projection gives peaked next-token distributions, so greedy choices
# are not decided by float noise and temperature visibly matters.
LM_HEAD_STD = 0.08


def build_tiny_llama(out_dir: str | Path, *, seed: int = 0, force: bool = False) -> Path:
    """Write the tiny-llama checkpoint into ``out_dir`` (a no-op when already built).

    Args:
        out_dir: Directory of the checkpoint; created with its parents.
        seed: Seed of the weights; the tokenizer does not depend on it.
        force: Rebuild even when ``out_dir`` already holds a complete build.

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        FileExistsError: ``out_dir`` is a non-empty directory that this function did not
            build (no marker file); pass ``force=True`` to replace it.
    """
    out = Path(out_dir).expanduser().resolve()
    if not force and is_built(out, seed=seed):
        return out
    if out.exists() and not force and not (out / BUILD_MARKER).exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and holds no tiny-llama build; pass force=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        _build_into(tmp, seed)
        _install(tmp, out, seed=seed, force=force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built tiny-llama (seed %d) in %s", seed, out)
    return out


def is_built(path: str | Path, *, seed: int = 0) -> bool:
    """Whether ``path`` holds a complete build of this format with this seed."""
    marker = Path(path) / BUILD_MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if data.get("format_version") != FORMAT_VERSION or data.get("seed") != seed:
        return False
    return all((Path(path) / name).is_file() for name in data.get("files", []))


# --- build steps ----------------------------------------------------------------------------


def _build_into(tmp: Path, seed: int) -> None:
    tokenizer = _save_tokenizer(tmp)
    _save_model(tmp, tokenizer, seed)
    files = sorted(p.name for p in tmp.iterdir() if p.is_file())
    for name in files:
        (tmp / name).chmod(0o644)
    tmp.chmod(0o755)  # mkdtemp makes it private
    marker = {
        "kind": "tiny-llama",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "vocab_size": len(tokenizer),
        "files": files,
    }
    (tmp / BUILD_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _train_bpe(lines: list[str]) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    # Like Llama: plain encoding starts with BOS.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tok


def _save_tokenizer(tmp: Path) -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    lines = [line for line in CORPUS_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(lines),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(str(tmp))
    # transformers 5 names its class `TokenizersBackend`, which 4.x (and the vLLM builds
    # on it) cannot resolve; both resolve `PreTrainedTokenizerFast`. 4.x also only reads
    # the template from tokenizer_config.json, 5.x from chat_template.jinja too.
    config_path = tmp / "tokenizer_config.json"
    data = json.loads(config_path.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    data["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return tokenizer


def _save_model(tmp: Path, tokenizer: PreTrainedTokenizerBase, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    eos_ids = [tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.convert_tokens_to_ids(IM_END)]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=INIT_STD,
        dtype="float32",
        architectures=["LlamaForCausalLM"],
        **MODEL_SHAPE,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Drawn here rather than by transformers' init so the weights depend only on the seed.
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                std = LM_HEAD_STD if name.startswith("lm_head") else INIT_STD
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(str(tmp))
    # Loaders built on transformers 4.x read `torch_dtype`; 5.x reads `dtype`.
    config_path = tmp / "config.json"
    data = json.loads(config_path.read_text())
    data["dtype"] = data["torch_dtype"] = "float32"
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _install(tmp: Path, out: Path, *, seed: int, force: bool) -> None:
    """Move the finished build from ``tmp`` to ``out``, replacing what is there."""
    try:
        os.rename(tmp, out)  # replaces nothing but an empty directory
        return
    except OSError:
        if not out.exists():
            raise
    if not force and is_built(out, seed=seed):
        return  # a concurrent build finished first
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
