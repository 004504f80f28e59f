"""Per-runtime option sections of a model (echo, torch, vllm) and vLLM's engine defaults.

Also the deprecated flat keys of a model's entry, moved into their sections on load.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import yaml
from pydantic import BaseModel, Field

from haif.config._base import RUNTIMES, ConfigModel

logger = logging.getLogger(__name__)

# A stream's pieces after the first leave a worker at most this often (Ray Serve LLM
# batches streamed outputs every 50 ms the same way): each piece is a message on every hop.
STREAM_BATCH_MS = 50.0
# On a CPU worker the engine computes on the cores the hops use too: past this many pieces
# a second (each costs a few ms of CPU over the hops), a worker's streams share this
# budget instead of starving the engine (bench/engine.py: 2x the tokens/s at 32 streams).
CPU_STREAM_PIECES_PER_S = 100.0


class EchoConfig(ConfigModel):
    """Options of the echo runtime (development and tests)."""

    token_delay_ms: float = Field(0.0, ge=0, le=10_000, description="Delay per streamed token.")


class TorchConfig(ConfigModel):
    """Options of the runtimes HAIF runs on torch itself (`torch`, `embeddings`)."""

    max_batch_size: int = Field(16, ge=1, le=1024, description="Requests batched into one step.")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="Wait for a batch to fill.")
    threads: int | None = Field(
        None, ge=1, le=256, description="torch intra-op threads (unset: torch's own choice)."
    )


class VllmConfig(ConfigModel):
    """HAIF's options around vLLM's engine that are not engine arguments (those are `engine`)."""

    kv_cache_space_gib: int = Field(
        1, ge=1, le=4096, description="On CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    cpu_engine_nice: int = Field(
        19, ge=0, le=19,
        description=(
            "On CPU: niceness of the engine's processes (scheduler, model worker). They "
            "busy-poll between steps; on cores they share with the serving path they delay "
            "its every wake-up, and the engine then runs nearly empty batches. At the lowest "
            "priority the serving path preempts them at once (10 is not enough); they still "
            "get every cycle nothing else wants. 0: same priority."
        ),
    )


# vLLM engine arguments HAIF gives unless `engine` does: a batch as wide as the other
# runtimes' default, and a fixed engine seed (requests still pick their own).
VLLM_ENGINE_DEFAULTS: Mapping[str, Any] = MappingProxyType({"max_num_seqs": 16, "seed": 0})
# On a GPU; vLLM's own default has moved between releases.
VLLM_GPU_MEMORY_UTILIZATION = 0.9
# vLLM engine arguments HAIF derives from its own fields, never from `engine`.
VLLM_ENGINE_OWNED: Mapping[str, str] = MappingProxyType({
    "model": "comes from the model's `path` or `artifact`",
    "tokenizer": "comes from the model's `path` or `artifact`",
    "dtype": "is the model's `dtype`",
    "max_model_len": "is the model's `max_model_len`",
    "runner": "follows the model's `task`",
    "distributed_executor_backend": (
        "is ray with tensor_parallel_size > 1 (the engine runs on the placement group the "
        "Orchestrator reserves)"
    ),
})
MAX_TENSOR_PARALLEL_SIZE = 64
# The option sections of ModelConfig, and the runtimes that read each.
SECTION_RUNTIMES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "engine": ("vllm",),
    "vllm": ("vllm",),
    "torch": ("torch", "embeddings"),
    "echo": ("echo",),
})
# Deprecated flat keys of ModelConfig -> (section, key in it) they moved to.
FLAT_KEYS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "token_delay_ms": ("echo", "token_delay_ms"),
    "max_batch_size": ("torch", "max_batch_size"),  # vllm: engine.max_num_seqs
    "max_wait_ms": ("torch", "max_wait_ms"),
    "torch_threads": ("torch", "threads"),
    "tensor_parallel_size": ("engine", "tensor_parallel_size"),
    "gpu_memory_utilization": ("engine", "gpu_memory_utilization"),
    "enforce_eager": ("engine", "enforce_eager"),
    "stream_interval": ("engine", "stream_interval"),
    "kv_cache_space_gib": ("vllm", "kv_cache_space_gib"),
    "cpu_engine_nice": ("vllm", "cpu_engine_nice"),
})


def _flat_key_target(old: str, runtime: object) -> tuple[str, str]:
    if old == "max_batch_size" and runtime == "vllm":
        return "engine", "max_num_seqs"  # what HAIF passed it to vLLM as
    return FLAT_KEYS[old]


def move_flat_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (one model's mapping) with its deprecated flat keys moved into their sections.

    Each moved key logs a warning that names its new place; a key the model's runtime
    never read is dropped with a warning.

    Raises:
        ValueError: a key is given both flat and in its section, or the section is no mapping.
    """
    name, runtime = data.get("name", "?"), data.get("runtime")
    out = dict(data)
    for old in [k for k in FLAT_KEYS if k in data]:
        value = out.pop(old)
        section, key = _flat_key_target(old, runtime)
        if runtime in RUNTIMES and runtime not in SECTION_RUNTIMES[section]:
            logger.warning(
                "models[%s].%s is deprecated and has no effect on runtime %s; remove it",
                name, old, runtime,
            )
            continue
        given = out.get(section)
        given = {} if given is None else given
        if isinstance(given, BaseModel):
            given = given.model_dump(exclude_unset=True)
        if not isinstance(given, Mapping):  # pydantic reports a ValueError, not a TypeError
            raise ValueError(f"models[{name}].{section} must be a mapping")  # noqa: TRY004
        if key in given:
            raise ValueError(
                f"models[{name}]: give {section}.{key} or the deprecated {old}, not both"
            )
        out[section] = {**given, key: value}
        new = yaml.safe_dump({key: value}, default_flow_style=True, width=1_000).strip()
        logger.warning("models[%s].%s is deprecated; use %s: %s", name, old, section, new)
    return out
