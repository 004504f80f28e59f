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

FORMAT_VERSION = 2  # 2: the chat template renders tools
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
# Tools (OpenAI function tools) are rendered the hermes way, as Qwen's templates do: a
# system turn lists them in <tools>, an assistant's calls are <tool_call> blocks, a tool's
# answer is a `tool` turn in <tool_response>; the model answers a call the same way.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|im_start|>system\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and tools and loop.first %}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>tool\\n<tool_response>\\n' + (message['content'] or '') + "
    "'\\n</tool_response><|im_end|>\\n' }}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}"
    "{% set fn = call['function'] %}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{{ fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson) }}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
    "{% endif %}"
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


# --- LoRA adapters of tiny-llama ------------------------------------------------------------

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK = 8
LORA_ALPHA = 16
# A's rows at unit gain on the input (std 1/sqrt(in)); B large enough that the adapted
# layers move the peaked logits and greedy output changes (PEFT's own init makes B zero).
LORA_B_STD = 0.05


def _lora_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) of each target projection of a Llama layer."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    return {
        "self_attn.q_proj": (hidden, q), "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv), "self_attn.o_proj": (q, hidden),
        "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }


def build_tiny_lora(
    out_dir: str | Path,
    base_dir: str | Path,
    *,
    seed: int = 0,
    rank: int = LORA_RANK,
    alpha: int = LORA_ALPHA,
    targets: tuple[str, ...] = LORA_TARGETS,
) -> Path:
    """Write a PEFT LoRA adapter of the checkpoint in ``base_dir`` into ``out_dir``.

    The matrices are drawn from a seeded generator (the same seed gives the same files)
    with non-zero B, so that the adapter changes what the model generates, like a trained
    one does. The directory is what PEFT's ``save_pretrained`` writes (``adapter_config.json``,
    ``adapter_model.safetensors``): PEFT, vLLM and HAIF's torch runtime load it.

    Returns:
        ``out_dir`` as an absolute path.
    """
    import torch
    from safetensors.torch import save_file

    base = Path(base_dir).expanduser().resolve()
    config = json.loads((base / "config.json").read_text())
    shapes = {m: s for m, s in _lora_shapes(config).items() if m.rsplit(".", 1)[-1] in targets}
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            a = torch.randn((rank, fan_in), generator=generator) / fan_in**0.5
            b = torch.randn((fan_out, rank), generator=generator) * LORA_B_STD
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.name,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in sorted(tensors.items())}
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return out
