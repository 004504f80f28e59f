"""HAIF configuration: one pydantic tree, loaded from YAML, overridden by ``HAIF_*``.

Overrides use ``__`` as the path separator and YAML syntax for values::

    HAIF_SERVER__PORT=8001
    HAIF_LIMITS__MAX_TOKENS=256
    HAIF_AUTH__DEV_API_KEY=my-development-key-0001

Values parse as YAML scalars: quote a string that YAML would read as a number
(``HAIF_AUTH__DEV_API_KEY='"1234567890123456"'``). Relative paths in the config
resolve against the directory the process starts in (``base_dir``).

Every model forbids unknown keys, so a typo is an error rather than a silently
ignored setting. Every timeout, queue and size has a named, bounded default.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from haif.exceptions import ConfigError
from haif.protocol import MAX_CHOICES, MAX_TOP_LOGPROBS

ENV_PREFIX = "HAIF_"
ENV_CONFIG_PATH = "HAIF_CONFIG"
DEFAULT_CONFIG_PATH = "configs/local.yaml"
PACKAGE_SCHEME = "python-package:"

logger = logging.getLogger(__name__)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Server keys of the four-hop design, accepted with a warning and ignored.
_RETIRED_SERVER_KEYS = {
    "bridge_replicas": "the HTTP Bridge is the Gateway's ingress now: set server.gateway_replicas",
    "handle_transport": "no request crosses a Serve handle between HAIF's deployments any more",
}


class ServerConfig(_Model):
    host: str = Field("127.0.0.1", description="Address the HTTP ingress listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP ingress.")
    app_name: str = Field("haif", description="Name of the Ray Serve application.")
    gateway_replicas: int = Field(
        1, ge=1, le=64, description="Replicas of the Gateway (each one serves HTTP and routes to workers)."
    )
    orchestrator_replicas: int = Field(
        1, ge=1, le=16, description="Replicas of the Orchestrator (one leads the fleet, the others stand by)."
    )
    max_ongoing_requests: int = Field(
        256, ge=1, le=100_000, description="Concurrent requests one Gateway replica accepts."
    )
    request_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="End-to-end deadline of one request (default)."
    )
    min_request_timeout_s: float = Field(
        0.05, gt=0, le=3600, description="Smallest deadline a client may ask for (X-Request-Timeout)."
    )
    max_request_timeout_s: float = Field(
        600.0, gt=0, le=86_400, description="Largest deadline a client may ask for (X-Request-Timeout)."
    )
    state_dir: str = Field(".haif", description="Directory for local state (dev key, caches).")
    access_log: bool = Field(
        False, description="Ray Serve per-call access logs in every replica (costly on the hot path)."
    )
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="Where Ray Serve runs HTTP proxies: every node, or the head node only."
    )
    ingress: Literal["proxy", "haproxy"] = Field(
        "proxy",
        description="How HTTP reaches the Gateway: Serve's HTTP proxy actor, or HAProxy on host:port "
        "in front of the Gateway replicas' own HTTP servers (Ray Serve's direct ingress; the Ray "
        "cluster must run with RAY_SERVE_ENABLE_HA_PROXY=1, which `haif serve` sets for a cluster "
        "it starts).",
    )
    control_resource: str | None = Field(
        None,
        description="Ray custom resource of the nodes that run the Gateway and Orchestrator "
        "replicas (unset: any node).",
    )

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for key, why in _RETIRED_SERVER_KEYS.items():
            if key in data:
                data.pop(key)
                logger.warning("server.%s is deprecated and ignored: %s", key, why)
        return data


class LimitsConfig(_Model):
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=1024**3, description="Largest accepted HTTP body (413 above)."
    )
    max_prompt_tokens: int = Field(
        4096, ge=1, le=1_048_576, description="Largest prompt, in the model's tokens (422 above)."
    )
    max_tokens: int = Field(
        2048, ge=1, le=1_048_576, description="Largest `max_tokens` a request may ask for."
    )
    default_max_tokens: int = Field(
        128, ge=1, le=1_048_576, description="`max_tokens` when a request gives none."
    )
    max_embedding_inputs: int = Field(
        256, ge=1, le=100_000, description="Most inputs in one embeddings request."
    )
    max_prompts_per_request: int = Field(
        16, ge=1, le=1024, description="Most prompts in one /v1/completions request."
    )
    max_stop_sequences: int = Field(4, ge=0, le=64, description="Most `stop` strings.")
    max_choices: int = Field(
        8, ge=1, le=MAX_CHOICES, description="Most choices per prompt (`n`); each is a generation of its own."
    )
    max_logprobs: int = Field(
        MAX_TOP_LOGPROBS, ge=0, le=MAX_TOP_LOGPROBS,
        description="Most alternatives per token (chat `top_logprobs`, completions `logprobs`).",
    )
    object_ref_threshold_bytes: int = Field(
        64 * 1024,
        ge=0,
        le=1024**3,
        description="Payloads at least this large cross Ray hops as object references.",
    )

    @model_validator(mode="after")
    def _default_within_max(self) -> LimitsConfig:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("limits.default_max_tokens must not exceed limits.max_tokens")
        return self


class AuthConfig(_Model):
    backend: Literal["database", "static"] = Field(
        "database",
        description="database: tenants and API tokens in the metadata store; "
        "static: only dev_api_key, no quotas, jobs or usage (benchmark baseline).",
    )
    dev_api_key: str | None = Field(
        None,
        min_length=16,
        max_length=256,
        description="Development API key of the `default` tenant; generated into state_dir when unset.",
    )
    dev_tenant: str = Field("default", description="Tenant the development key belongs to.")
    token_cache_ttl_s: float = Field(
        5.0, ge=0, le=3600,
        description="How long a token lookup is cached: a revoked token stops working within this time.",
    )
    token_cache_max_entries: int = Field(
        10_000, ge=1, le=10_000_000, description="Token lookups (good and bad) kept per Gateway replica."
    )


class RayConfig(_Model):
    address: str | None = Field(
        None, description="Ray cluster to join; a local one is started when unset and RAY_ADDRESS is unset."
    )
    namespace: str = Field("haif", description="Ray namespace of HAIF's actors.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started cluster.")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a locally started cluster.")
    include_dashboard: bool = Field(False, description="Start the Ray dashboard with a local cluster.")


# A stream's pieces after the first leave a worker at most this often (Ray Serve LLM
# batches streamed outputs every 50 ms the same way): each piece is a message on every hop.
STREAM_BATCH_MS = 50.0
# On a CPU worker the engine computes on the cores the hops use too: past this many pieces
# a second (each costs a few ms of CPU over the hops), a worker's streams share this
# budget instead of starving the engine (bench/engine.py: 2x the tokens/s at 32 streams).
CPU_STREAM_PIECES_PER_S = 100.0
ARTIFACT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
NAME_VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}:[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"
ARTIFACT_REF_PATTERN = r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,127}:[A-Za-z0-9][A-Za-z0-9._+-]{0,127}|sha256:[0-9a-f]{64})$"


def resolve_source(spec: str, base: Path | None = None) -> Path:
    """A directory on this node: a path (relative to ``base``) or ``python-package:PKG/SUBDIR``.

    Raises:
        ConfigError: the package is not installed.
    """
    if spec.startswith(PACKAGE_SCHEME):
        package, _, sub = spec[len(PACKAGE_SCHEME):].partition("/")
        try:
            root = Path(str(resources.files(package)))
        except ModuleNotFoundError as exc:
            raise ConfigError(f"package {package!r} of {spec!r} is not installed") from exc
        return root / sub if sub else root
    path = Path(spec).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    return path.resolve()


RuntimeName = Literal["echo", "torch", "embeddings", "vllm"]
RUNTIMES: tuple[str, ...] = get_args(RuntimeName)


class EchoConfig(_Model):
    """Options of the echo runtime (development and tests)."""

    token_delay_ms: float = Field(0.0, ge=0, le=10_000, description="Delay per streamed token.")


class TorchConfig(_Model):
    """Options of the runtimes HAIF runs on torch itself (`torch`, `embeddings`)."""

    max_batch_size: int = Field(16, ge=1, le=1024, description="Requests batched into one step.")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="Wait for a batch to fill.")
    threads: int | None = Field(
        None, ge=1, le=256, description="torch intra-op threads (unset: torch's own choice)."
    )


class VllmConfig(_Model):
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
_SECTION_RUNTIMES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "engine": ("vllm",),
    "vllm": ("vllm",),
    "torch": ("torch", "embeddings"),
    "echo": ("echo",),
})
# Deprecated flat keys of ModelConfig -> (section, key in it) they moved to.
_FLAT_KEYS: Mapping[str, tuple[str, str]] = MappingProxyType({
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


# Runtimes that apply LoRA adapters (the torch runtime's batched LoRA, vLLM's LoRARequest).
ADAPTER_RUNTIMES = ("torch", "vllm")
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class AdapterConfig(_Model):
    """A LoRA adapter served on a model: requested as `BASE:NAME` or by `NAME` alone."""

    name: str = Field(..., pattern=ADAPTER_NAME_PATTERN, description="Its served name.")
    artifact: str = Field(
        ..., pattern=ARTIFACT_REF_PATTERN,
        description="Its signed artifact (`name:version` or `sha256:<manifest digest>`), published "
        "with `haif models publish --base` for this model's artifact.",
    )


def _flat_key_target(old: str, runtime: object) -> tuple[str, str]:
    if old == "max_batch_size" and runtime == "vllm":
        return "engine", "max_num_seqs"  # what HAIF passed it to vLLM as
    return _FLAT_KEYS[old]


def _move_flat_keys(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (one model's mapping) with its deprecated flat keys moved into their sections.

    Each moved key logs a warning that names its new place; a key the model's runtime
    never read is dropped with a warning.

    Raises:
        ValueError: a key is given both flat and in its section, or the section is no mapping.
    """
    name, runtime = data.get("name", "?"), data.get("runtime")
    out = dict(data)
    for old in [k for k in _FLAT_KEYS if k in data]:
        value = out.pop(old)
        section, key = _flat_key_target(old, runtime)
        if runtime in RUNTIMES and runtime not in _SECTION_RUNTIMES[section]:
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


class AutoscalingConfig(_Model):
    """A model's elastic fleet, per region and tier: named after Ray Serve's
    ``autoscaling_config`` (its ``min_replicas``/``max_replicas`` are workers here)."""

    min_workers: int = Field(1, ge=0, le=256, description="Fewest workers (0: scale to zero when idle).")
    max_workers: int = Field(1, ge=1, le=256, description="Most workers.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, le=100_000,
        description="Ongoing requests (running on a worker or queued for one) per ready worker the "
        "autoscaler aims for.",
    )
    upscale_delay_s: float = Field(
        30.0, ge=0, le=3600, description="The load must stay above the target this long before workers are added."
    )
    downscale_delay_s: float = Field(
        600.0, ge=0, le=86_400,
        description="The load must stay below the target this long before surplus workers are drained.",
    )
    metrics_interval_s: float = Field(
        1.0, gt=0, le=600, description="How often the autoscaler looks at the load and decides."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_workers > self.max_workers:
            raise ValueError(f"autoscaling.min_workers ({self.min_workers}) exceeds max_workers ({self.max_workers})")
        return self


class ModelConfig(_Model):
    name: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$",
                      description="Model id clients send in `model`.")
    runtime: RuntimeName = Field(..., description="Runtime that executes the model.")
    path: str | None = Field(
        None,
        description="Model directory, or `python-package:PKG/SUBDIR` for weights shipped in a package.",
    )
    artifact: str | None = Field(
        None,
        pattern=ARTIFACT_REF_PATTERN,
        description="Signed artifact served: `name:version` or `sha256:<manifest digest>` (instead of `path`).",
    )
    version: str = Field("1", description="Version of the model served.")
    build: Literal["tiny-llama"] | None = Field(
        None, description="Build this development model into `path` on start when it is missing."
    )
    enabled: bool = Field(True, description="Serve this model.")
    workers: int = Field(
        1, ge=1, le=256,
        description="Worker actors of this model per region and tier (without `autoscaling`).",
    )
    autoscaling: AutoscalingConfig | None = Field(
        None, description="An elastic fleet instead of `workers` (see AutoscalingConfig)."
    )
    drain_timeout_s: float = Field(
        60.0, ge=0, le=3600,
        description="A drained worker (rollout, scale-down, `haif workers drain`) gets no new request and "
        "this long to finish the ones it has before it stops.",
    )
    device: Literal["cpu", "gpu", "auto"] = Field(
        "auto", description="cpu, gpu (one GPU per worker), or auto (gpu when the cluster has one)."
    )
    allow_cpu_fallback: bool = Field(
        False, description="With device=gpu on a cluster without GPUs, run on CPU instead of failing."
    )
    num_cpus: float = Field(1.0, gt=0, le=256, description="CPUs reserved per worker actor.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Weights dtype.")
    max_model_len: int = Field(2048, ge=16, le=1_048_576, description="Prompt + completion tokens.")
    max_concurrency: int = Field(
        512, ge=1, le=100_000, description="Requests one worker actor accepts at once."
    )
    stream_batch_ms: float = Field(
        STREAM_BATCH_MS, ge=0, le=1000,
        description=(
            "Streams: after the first token (sent at once), a piece leaves the worker at most "
            "every this many ms, carrying every token made since the last one; the last piece "
            "never waits. 0 sends each token as it comes (each costs a message on every hop)."
        ),
    )
    stream_pieces_per_s: float | None = Field(
        None, ge=0, le=100_000,
        description=(
            "Streams: at most this many pieces a second from one worker, all its streams "
            "together (each stream's pieces are spaced wider as streams are added, up to 1 s "
            "apart); bounds the CPU the hops spend per worker. Unset: "
            f"{CPU_STREAM_PIECES_PER_S:g} on CPU workers (the engine and the hops share the "
            "node's cores), no bound on GPU workers. 0: no bound."
        ),
    )
    task: Literal["generate", "embed"] | None = Field(
        None, description="vllm: serve the model for generation or as a pooling/embedding model."
    )
    load_timeout_s: float = Field(600.0, gt=0, le=7200, description="Model load deadline.")
    max_queued: int = Field(
        256, ge=0, le=100_000,
        description="Requests that may wait for a free worker slot; beyond, 429 with Retry-After at once.",
    )
    regions: list[str] | None = Field(
        None, description="Regions that run `workers` workers each (default: the first region)."
    )
    dedicated_tenants: list[str] = Field(
        default_factory=list,
        description="Tenants with a pool of their own (`workers` per region) that no one else uses.",
    )
    p2p_workers: list[Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]] = Field(
        default_factory=list, max_length=256,
        description=(
            "Remote P2P workers (Noise public keys, 64 hex) that serve this model over Hyperswarm "
            "RPC (`haif p2p worker`): probed and routed like local workers, in the model's first "
            "region; needs p2p.enabled."
        ),
    )
    # Per-runtime options, one section each; a section another runtime reads is an error.
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "vllm: vLLM engine arguments (AsyncEngineArgs; `vllm serve` flags with underscores), "
            "passed through as given and checked by vLLM when the model loads. Unless set here, "
            + ", ".join(f"{k} {v}" for k, v in VLLM_ENGINE_DEFAULTS.items())
            + f", and gpu_memory_utilization {VLLM_GPU_MEMORY_UTILIZATION} on a GPU. "
            + ", ".join(VLLM_ENGINE_OWNED) + " come from HAIF's own fields."
        ),
    )
    vllm: VllmConfig = Field(
        default_factory=VllmConfig, description="vllm: HAIF's options around the engine (CPU)."
    )
    torch: TorchConfig = Field(
        default_factory=TorchConfig, description="torch, embeddings: dynamic batching and threads."
    )
    echo: EchoConfig = Field(default_factory=EchoConfig, description="echo: streaming delay.")
    # LoRA adapters (torch, vllm): loaded by a worker on first use, verified like the model.
    adapters: list[AdapterConfig] = Field(
        default_factory=list, max_length=1024,
        description="LoRA adapters served on this model (`BASE:NAME`, or `NAME` alone).",
    )
    dynamic_adapters: bool = Field(
        False,
        description="Also serve, on demand, any trusted adapter artifact of this model's artifact: "
        "`model: BASE:<adapter name:version or sha256:digest>`.",
    )
    max_adapters_per_worker: int = Field(
        4, ge=1, le=1024,
        description="Adapters a worker keeps loaded; the least recently used one not in use goes "
        "first. vllm: also its engine's max_loras and max_cpu_loras unless `engine` sets them.",
    )
    adapter_spill_margin: int = Field(
        4, ge=0, le=100_000,
        description="Routing: a request for an adapter goes to a worker that has it loaded, unless "
        "those carry this many requests more than the least loaded other worker; then that one "
        "gets it (and loads it), so that a hot adapter is not pinned to one worker.",
    )

    @property
    def initial_workers(self) -> int:
        """Workers per region and tier at start: ``workers``, or ``autoscaling.min_workers``."""
        return self.autoscaling.min_workers if self.autoscaling is not None else self.workers

    @property
    def max_workers(self) -> int:
        return self.autoscaling.max_workers if self.autoscaling is not None else self.workers

    def at_version(self, version: str) -> ModelConfig:
        """This model as version ``version`` serves it: ``name:version`` of its artifact (the
        echo runtime, without one: the version is a label, it has no weights).

        Raises:
            UnprocessableRequest: the model cannot have versions side by side (served from a
                ``path``, or from an artifact named by its digest).
        """
        if version == self.version:
            return self
        if self.runtime == "echo" and self.artifact is None:
            return self.model_copy(update={"version": version})
        if self.artifact is None or self.artifact.startswith("sha256:"):
            from haif.exceptions import UnprocessableRequest

            source = "a path" if self.artifact is None else "an artifact digest"
            raise UnprocessableRequest(
                f"model {self.name!r} is served from {source}: a rollout needs a published artifact "
                "`name:version` (or the echo runtime)"
            )
        name = self.artifact.rsplit(":", 1)[0]
        return self.model_copy(update={"version": version, "artifact": f"{name}:{version}"})

    @model_validator(mode="before")
    @classmethod
    def _deprecated_flat_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and _FLAT_KEYS.keys() & data.keys():
            return _move_flat_keys(data)
        return data

    @model_validator(mode="after")
    def _workers_or_autoscaling(self) -> ModelConfig:
        if self.autoscaling is not None and "workers" in self.model_fields_set:
            raise ValueError(
                f"models[{self.name}]: give workers (a fixed fleet) or autoscaling (min_workers.."
                "max_workers), not both"
            )
        return self

    @model_validator(mode="after")
    def _sections_of_runtime(self) -> ModelConfig:
        for section, runtimes in _SECTION_RUNTIMES.items():
            if section in self.model_fields_set and self.runtime not in runtimes:
                hint = " (vLLM's batch size: engine: {max_num_seqs: N})" if section == "torch" else ""
                raise ValueError(
                    f"models[{self.name}].{section} applies to runtime {' or '.join(runtimes)}, "
                    f"not {self.runtime}{hint}"
                )
        for key, owner in VLLM_ENGINE_OWNED.items():
            if key in self.engine:
                raise ValueError(f"models[{self.name}].engine.{key}: set by HAIF, it {owner}")
        # HAIF reads this one itself (placement), before vLLM sees it.
        size = self.engine.get("tensor_parallel_size", 1)
        if type(size) is not int or not 1 <= size <= MAX_TENSOR_PARALLEL_SIZE:
            raise ValueError(
                f"models[{self.name}].engine.tensor_parallel_size must be an integer from 1 to "
                f"{MAX_TENSOR_PARALLEL_SIZE}, not {size!r}"
            )
        return self

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.path and self.artifact:
            raise ValueError(f"model {self.name!r}: give `artifact` or `path`, not both")
        if self.runtime != "echo" and not (self.path or self.artifact):
            raise ValueError(
                f"model {self.name!r}: runtime {self.runtime!r} needs `artifact` (or `path` in development)"
            )
        if self.build is not None and not self.path:
            raise ValueError(f"model {self.name!r}: `build` needs `path`")
        return self

    @model_validator(mode="after")
    def _adapters_fit(self) -> ModelConfig:
        if not (self.adapters or self.dynamic_adapters):
            return self
        if self.runtime not in ADAPTER_RUNTIMES or self.kind != "generate":
            raise ValueError(
                f"model {self.name!r}: LoRA adapters need a generating model on runtime "
                f"{' or '.join(ADAPTER_RUNTIMES)}, not {self.runtime}"
            )
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model {self.name!r}: duplicate adapter names: {', '.join(dupes)}")
        return self

    @property
    def serves_adapters(self) -> bool:
        return bool(self.adapters) or self.dynamic_adapters

    def adapter(self, name: str) -> AdapterConfig | None:
        return next((a for a in self.adapters if a.name == name), None)

    @property
    def tensor_parallel_size(self) -> int:
        """GPUs one vLLM worker spans (``engine.tensor_parallel_size``, default 1)."""
        return int(self.engine.get("tensor_parallel_size", 1))

    @property
    def kind(self) -> Literal["generate", "embed"]:
        if self.runtime == "embeddings" or (self.runtime == "vllm" and self.task == "embed"):
            return "embed"
        return "generate"

    def resolved_path(self, base: Path | None = None) -> Path:
        """The model directory on this node.

        Raises:
            ConfigError: the path names nothing.
        """
        if self.path is None:
            raise ConfigError(f"model {self.name!r} has no path")
        try:
            return resolve_source(self.path, base)
        except ConfigError as exc:
            raise ConfigError(f"model {self.name!r}: {exc.message}") from exc


class DatabaseConfig(_Model):
    url: str = Field(
        "sqlite:///.haif/haif.db",
        min_length=1,
        description="SQLAlchemy URL of the metadata store (postgresql+psycopg://... or sqlite:///PATH).",
    )
    pool_size: int = Field(10, ge=1, le=1000, description="Connections per process.")
    max_overflow: int = Field(10, ge=0, le=1000, description="Connections above pool_size under bursts.")
    pool_timeout_s: float = Field(10.0, gt=0, le=300, description="Wait for a free pooled connection.")
    connect_timeout_s: float = Field(5.0, gt=0, le=120, description="Connect deadline.")
    statement_timeout_ms: int = Field(
        10_000, ge=0, le=3_600_000, description="PostgreSQL statement_timeout per connection (0: none)."
    )
    auto_migrate: bool = Field(
        True, description="Upgrade the schema to the latest revision on start (haif serve, CLI commands)."
    )

    def resolved_url(self, base: Path | None = None) -> str:
        """The URL with a relative SQLite path resolved against ``base``."""
        prefix, sep, path = self.url.partition(":///")
        if not sep or not prefix.startswith("sqlite") or not path or path.startswith("/") or path == ":memory:":
            return self.url
        return f"{prefix}:///{(base or Path.cwd()) / path}"


class RedisConfig(_Model):
    url: str | None = Field(None, description="Redis URL (DLQ, rate limits); none in the embedded default.")
    socket_timeout_s: float = Field(2.0, gt=0, le=60, description="Socket deadline.")
    key_prefix: str = Field(
        "haif", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$",
        description="Prefix of every key HAIF writes.",
    )


class QuotasConfig(_Model):
    rate_limit_backend: Literal["auto", "redis", "database"] = Field(
        "auto", description="Where requests-per-minute are counted; auto: Redis when redis.url is set."
    )
    prompt_bytes_per_token: float = Field(
        4.0, gt=0, le=64,
        description="Prompt estimate for token reservations (bytes per token); settlement corrects it.",
    )
    redis_unavailable: Literal["database", "reject"] = Field(
        "database",
        description="Redis down: count requests per minute in the metadata store instead (database) "
        "or refuse requests with 503 (reject).",
    )
    redis_retry_after_s: float = Field(
        5.0, ge=0, le=600,
        description="After Redis failed, how long the fallback is used before Redis is tried again.",
    )
    lease_fraction: float = Field(
        0.02, ge=0, le=0.25,
        description="PostgreSQL: the share of each of a tenant's limits one Gateway replica may lease "
        "at once, to admit requests with no database round trip (0: every request is counted on its own).",
    )
    lease_max_requests: int = Field(
        256, ge=2, le=1_000_000, description="Most requests one lease hands out."
    )
    lease_idle_s: float = Field(
        0.5, gt=0, le=60, description="A lease unused this long gives back what it did not hand out."
    )
    lease_max_s: float = Field(5.0, gt=0, le=59, description="Longest life of a lease.")


class JobsConfig(_Model):
    idempotency_ttl_s: float = Field(
        86_400.0, ge=60, le=30 * 86_400, description="How long an Idempotency-Key is remembered."
    )
    max_idempotency_key_chars: int = Field(
        255, ge=8, le=255, description="Longest accepted Idempotency-Key header."
    )
    idempotency_poll_ms: float = Field(
        50.0, ge=1, le=10_000, description="Poll interval of a duplicate waiting for the first execution."
    )
    max_stored_response_bytes: int = Field(
        16 * 1024**2, ge=1024, le=1024**3,
        description="Largest response kept for Idempotency-Key replays (larger: 413 on such requests).",
    )
    mark_running_after_s: float = Field(
        1.0, ge=0.05, le=600,
        description="Jobs still executing after this long are marked running (in batches, off the hot path).",
    )
    stale_after_s: float = Field(
        60.0, ge=1, le=86_400,
        description="Unsettled jobs older than request_timeout_s plus this are failed and their quota released.",
    )
    sweep_interval_s: float = Field(5.0, ge=0.1, le=3600, description="Background job upkeep period.")
    settle_queue_max: int = Field(
        100_000, ge=1, le=10_000_000,
        description="Settlements (and DLQ entries) a Gateway replica keeps to retry while the store is down.",
    )
    settle_retry_initial_s: float = Field(
        0.1, gt=0, le=60, description="First retry delay of a settlement the store refused (doubles, with jitter)."
    )
    settle_retry_max_s: float = Field(5.0, gt=0, le=600, description="Largest settlement retry delay.")


class DlqConfig(_Model):
    backend: Literal["auto", "redis", "database"] = Field(
        "auto",
        description="Where dead letters go: Redis Streams (falling back to the metadata store while "
        "Redis is down) or the metadata store's table; auto: redis when redis.url is set.",
    )
    stream: str = Field(
        "dlq", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$",
        description="Name of the Redis stream, under redis.key_prefix.",
    )
    max_entries: int = Field(
        100_000, ge=1, le=100_000_000,
        description="Redis stream MAXLEN: the oldest entries beyond it are dropped.",
    )
    max_body_bytes: int = Field(
        1024**2, ge=1024, le=256 * 1024**2,
        description="Largest request body kept with an entry (larger: truncated, and not replayable).",
    )
    body_fetch_timeout_s: float = Field(
        10.0, gt=0, le=600,
        description="Deadline to fetch a body passed by reference (object store) for its entry.",
    )


class UsageConfig(_Model):
    webhook_url: str | None = Field(
        None, pattern=r"^https?://", description="Billing webhook that receives usage batches (POST, JSON)."
    )
    batch_size: int = Field(500, ge=1, le=100_000, description="Usage records per webhook batch.")
    interval_s: float = Field(5.0, ge=0.05, le=3600, description="How often new usage is batched and sent.")
    timeout_s: float = Field(10.0, gt=0, le=300, description="Deadline of one webhook POST.")
    backoff_initial_s: float = Field(0.5, gt=0, le=600, description="First retry delay (doubles, with jitter).")
    backoff_max_s: float = Field(60.0, gt=0, le=3600, description="Largest retry delay.")
    lease_s: float = Field(
        120.0, gt=0, le=86_400, description="A batch claimed by an exporter that died is re-sent after this."
    )


class ReplicaConfig(_Model):
    url: str = Field(
        ..., min_length=1, description="fsspec URL of the replica: a directory, `s3://bucket/prefix`, ..."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options of this replica, over artifacts.storage_options."
    )


class DevArtifactConfig(_Model):
    artifact: str = Field(..., pattern=NAME_VERSION_PATTERN, description="`name:version` it is published as.")
    source: str = Field(
        ..., min_length=1, description="Directory, or `python-package:PKG/SUBDIR`, published from."
    )
    build: Literal["tiny-llama"] | None = Field(
        None, description="Build this development model into `source` when it is missing."
    )
    runtime: RuntimeName | None = Field(
        None, description="Runtime hint recorded in the manifest."
    )


class ArtifactsConfig(_Model):
    """The artifact store: signed manifests and sha256 blobs on replicas, a cache per node."""

    replicas: list[str | ReplicaConfig] = Field(
        default_factory=lambda: [".haif/artifacts/replica-1", ".haif/artifacts/replica-2",
                                 ".haif/artifacts/replica-3"],
        min_length=1,
        max_length=32,
        description="fsspec URLs of the replicas (relative paths: local directories), read in this order.",
    )
    write_quorum: int | None = Field(
        None, ge=1, le=32, description="Replicas a publish must reach to succeed (default: a majority)."
    )
    storage_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="fsspec options per protocol, e.g. `{s3: {endpoint_url: ..., key: ..., secret: ...}}`.",
    )
    cache_dir: str = Field(".haif/cache", description="Per-node content-addressed cache, shared by its workers.")
    cache_max_bytes: int = Field(
        20 * 1024**3, ge=1024**2, le=1024**5, description="Cache size cap; unpinned entries are evicted LRU."
    )
    trusted_keys: list[str] = Field(
        default_factory=list,
        description="Public keys trusted to sign any artifact: `ed25519:<base64>` or a public key file.",
    )
    model_trusted_keys: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per artifact name: the only keys trusted for it (instead of trusted_keys).",
    )
    dev_signing_key: str | None = Field(
        None,
        description="Development signing key, generated when missing; trusted, signs dev_publish. "
        "Leave unset in production.",
    )
    dev_publish: list[DevArtifactConfig] = Field(
        default_factory=list,
        description="Bundled models published on start (idempotent), signed by dev_signing_key.",
    )
    chunk_bytes: int = Field(
        8 * 1024**2, ge=64 * 1024, le=256 * 1024**2, description="Unit of streamed reads, hashes and writes."
    )
    max_parallel_transfers: int = Field(
        4, ge=1, le=64, description="Blobs transferred at once by one pull, publish or repair."
    )
    loaded_models_max: int = Field(
        2, ge=1, le=64, description="Loaded models a worker keeps in memory (LRU); a warm one skips loading."
    )
    lock_timeout_s: float = Field(
        900.0, gt=0, le=86_400, description="Longest wait for another process's download of the same blob."
    )
    fsync: bool = Field(True, description="fsync cached blobs before they become visible (crash-safe cache).")
    rehash_cache_hits: bool = Field(
        False,
        description="Re-hash cached blobs on every load (default: only when their recorded inode, size "
        "or times changed).",
    )

    @model_validator(mode="after")
    def _quorum_fits(self) -> ArtifactsConfig:
        if self.write_quorum is not None and self.write_quorum > len(self.replicas):
            raise ValueError("artifacts.write_quorum exceeds the number of replicas")
        if self.dev_publish and not self.dev_signing_key:
            raise ValueError("artifacts.dev_publish needs artifacts.dev_signing_key")
        return self

    def quorum(self) -> int:
        return self.write_quorum if self.write_quorum is not None else len(self.replicas) // 2 + 1

    def replica_configs(self) -> list[ReplicaConfig]:
        """Every replica as a ReplicaConfig, global storage options merged under its own."""
        out = []
        for replica in self.replicas:
            spec = replica if isinstance(replica, ReplicaConfig) else ReplicaConfig(url=replica)
            protocol = spec.url.split("://", 1)[0] if "://" in spec.url else "file"
            options = {**self.storage_options.get(protocol, {}), **spec.storage_options}
            out.append(spec.model_copy(update={"storage_options": options}))
        return out


class RegionConfig(_Model):
    name: str = Field(..., min_length=1, max_length=64, description="Region name.")
    resource: str | None = Field(None, description="Ray custom resource that marks this region's nodes.")


class ResilienceConfig(_Model):
    health_check_period_s: float = Field(
        1.0, ge=0.05, le=300, description="How often the Orchestrator probes each worker."
    )
    health_check_timeout_s: float = Field(
        5.0, gt=0, le=300, description="A probe that takes longer counts as failed."
    )
    unhealthy_after_failures: int = Field(
        5, ge=1, le=1000, description="Failed probes in a row after which a worker is replaced."
    )
    breaker_failure_threshold: int = Field(
        3, ge=1, le=1000, description="Failures in a row that open a worker's circuit breaker."
    )
    breaker_open_s: float = Field(
        5.0, gt=0, le=3600, description="How long an open breaker refuses work before a trial call."
    )
    breaker_half_open_calls: int = Field(
        1, ge=1, le=1000, description="Trial calls a half-open breaker lets through."
    )
    max_attempts: int = Field(
        3, ge=1, le=20, description="Tries per request (the first plus retries), within its deadline."
    )
    retry_backoff_initial_ms: float = Field(
        20.0, ge=0, le=60_000, description="Backoff cap before the first retry (full jitter)."
    )
    retry_backoff_max_ms: float = Field(
        1000.0, ge=0, le=600_000, description="Largest backoff cap between retries."
    )
    replace_dead_workers: bool = Field(True, description="Start a new worker in place of a dead one.")
    replacement_backoff_max_s: float = Field(
        30.0, ge=0, le=3600,
        description="Largest wait before replacing a worker that keeps dying (doubles per death).",
    )
    overloaded_retry_after_s: float = Field(
        1.0, gt=0, le=3600, description="Retry-After sent with 429 when a model's queue is full."
    )
    routing_table_refresh_s: float = Field(
        1.0, ge=0.05, le=300,
        description=(
            "Longest wait of a Gateway's long-poll for the routing table: a change (a worker "
            "ready, dead, added) comes at once; the workers' load figures at least this often."
        ),
    )


class RolloutsConfig(_Model):
    poll_s: float = Field(
        1.0, gt=0, le=600,
        description="How often the Orchestrator reads the rollouts and drain requests of the metadata store.",
    )
    max_error_rate: float | None = Field(
        None, gt=0, le=1,
        description="A canary whose platform-error rate over `window_s` exceeds this (with at least "
        "`min_requests` requests) is rolled back on its own. Unset: never automatically.",
    )
    min_requests: int = Field(20, ge=1, le=1_000_000, description="Requests a canary needs in the window before it is judged.")
    window_s: float = Field(60.0, gt=0, le=86_400, description="The sliding window of the canary's error rate.")


class ShardingConfig(_Model):
    home_regions: dict[str, str] = Field(
        default_factory=dict,
        description="Tenant name → home region; its requests go there first (default: the first region).",
    )


class TelemetryConfig(_Model):
    service_name: str = Field("haif", description="OpenTelemetry service name prefix.")
    otlp_endpoint: str | None = Field(None, description="OTLP endpoint; no export when unset.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    metrics_enabled: bool = Field(
        True, description="Record platform metrics and serve them at GET /metrics (503 when off)."
    )
    metrics_push_interval_s: float = Field(
        1.0, ge=0.05, le=60,
        description="How often each process pushes its cumulative metrics to the aggregator actor.",
    )
    metrics_stale_after_s: float = Field(
        10.0, ge=0.5, le=3600,
        description="Gauges of a process silent this long are dropped (its counters are kept).",
    )
    metrics_retire_after_s: float = Field(
        3600.0, ge=10, le=7 * 86_400,
        description="A process silent this long is folded into the totals and forgotten.",
    )
    metrics_max_processes: int = Field(
        4096, ge=16, le=1_000_000,
        description="Processes the aggregator tracks; beyond it the longest-silent are folded in.",
    )
    metrics_scrape_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Deadline of GET /metrics for the aggregator's answer (503 after)."
    )

    otlp_protocol: Literal["http/protobuf", "grpc"] | None = Field(
        None,
        description="OTLP transport; unset: OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf.",
    )
    sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Share of new traces recorded; a client's traceparent sampled flag is followed.",
    )
    export_interval_ms: int | None = Field(
        None, ge=10, le=60_000,
        description="Delay between span exports; unset: OTEL_BSP_SCHEDULE_DELAY, else 5000.",
    )
    max_queued_spans: int | None = Field(
        None, ge=64, le=1_000_000,
        description="Spans a process buffers for export (then drops); unset: OTEL_BSP_MAX_QUEUE_SIZE, else 2048.",
    )
    json_logs: bool = Field(
        True, description="One JSON object per log line, with request id, trace id, span id, tenant."
    )

    @model_validator(mode="after")
    def _metrics_timing(self) -> TelemetryConfig:
        if self.metrics_stale_after_s < 2 * self.metrics_push_interval_s:
            raise ValueError(
                "telemetry.metrics_stale_after_s must be at least twice metrics_push_interval_s"
            )
        if self.metrics_retire_after_s <= self.metrics_stale_after_s:
            raise ValueError("telemetry.metrics_retire_after_s must exceed metrics_stale_after_s")
        return self


# One message on a Hyperswarm secret stream is at most 16 MiB - 1 (an atomic write); the
# bound leaves room for protomux's and protomux-rpc's headers.
P2P_MAX_MESSAGE_BYTES = 15 * 1024**2
_HOST_PORT = r"^[^\s:]+:\d{1,5}$"
_LOOPBACK = ("127.", "localhost:")


class P2PConfig(_Model):
    enabled: bool = Field(False, description="Run the P2P shim (the Node sidecar on hyperdht).")
    bootstrap: list[str] | None = Field(
        None, min_length=1, max_length=64,
        description="DHT bootstrap nodes, `host:port` each; unset: the public DHT.",
    )
    host: str | None = Field(
        None, min_length=1, max_length=255,
        description="Address the DHT node binds; unset: 127.0.0.1 when every bootstrap node is "
        "on the loopback (a local testnet), else 0.0.0.0.",
    )
    seed_file: str | None = Field(
        None, description="File of the 32-byte key seed, created on first start; unset: "
        "`p2p/seed` in server.state_dir (the public key is stable across restarts).",
    )
    request_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Deadline of one P2P request (a peer's haif.timeout_s may shorten it)."
    )
    max_concurrent: int = Field(
        256, ge=1, le=100_000, description="Requests the sidecar serves at once (OVERLOADED beyond), and calls it makes."
    )
    max_message_bytes: int = Field(
        4 * 1024**2, ge=1024, le=P2P_MAX_MESSAGE_BYTES,
        description="Largest request or answer value (INVALID_REQUEST beyond); at most 15 MiB.",
    )
    max_concurrent_unverified: int = Field(
        32, ge=1, le=100_000,
        description="Requests from keys HAIF has not served yet (strangers, a peer's first request) "
        "handed to HAIF at once; more wait for a slot within their deadline, up to max_concurrent "
        "waiting (OVERLOADED beyond): a flood of unknown keys never takes served peers' slots.",
    )
    max_connections: int = Field(
        1024, ge=1, le=100_000,
        description="Peer connections the sidecar keeps open, inbound and outbound each; past it a new "
        "inbound connection closes the oldest idle one (a stranger's first).",
    )
    max_stream_buffer_bytes: int = Field(
        256 * 1024, ge=1024, le=P2P_MAX_MESSAGE_BYTES,
        description="Bytes of a stream's chunks handed to the sidecar that its peer has not taken yet; "
        "beyond it HAIF waits for the peer before it reads the stream on (a larger chunk goes alone).",
    )
    peers: dict[str, Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]] = Field(
        default_factory=dict, max_length=100_000,
        description="Peer public key (64 hex) -> tenant name, besides `haif p2p peers add`.",
    )
    node: str = Field("node", min_length=1, description="The Node.js (20+) executable that runs the sidecar.")
    restart_backoff_initial_s: float = Field(
        0.5, gt=0, le=60, description="Wait before restarting a sidecar that died (doubles per death)."
    )
    restart_backoff_max_s: float = Field(
        30.0, gt=0, le=3600, description="Longest wait before restarting a sidecar that keeps dying."
    )

    @field_validator("peers", mode="before")
    @classmethod
    def _lower_case_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k.strip().lower() if isinstance(k, str) else k: v for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _check(self) -> P2PConfig:
        for node in self.bootstrap or ():
            if not re.match(_HOST_PORT, node) or not 1 <= int(node.rsplit(":", 1)[1]) <= 65535:
                raise ValueError(f"p2p.bootstrap: {node!r} is not host:port")
        bad = [key for key in self.peers if not re.match(r"^[0-9a-f]{64}$", key)]
        if bad:
            raise ValueError(f"p2p.peers: keys are 64 hex characters, not {bad[0][:80]!r}")
        if self.restart_backoff_initial_s > self.restart_backoff_max_s:
            raise ValueError("p2p.restart_backoff_initial_s exceeds p2p.restart_backoff_max_s")
        return self

    def bind_host(self) -> str:
        """The address the DHT node binds (``host``, or the default it stands for)."""
        if self.host is not None:
            return self.host
        if self.bootstrap and all(node.startswith(_LOOPBACK) for node in self.bootstrap):
            return "127.0.0.1"
        return "0.0.0.0"


class HaifConfig(_Model):
    server: ServerConfig = Field(default_factory=ServerConfig, description="HTTP and Serve settings.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Request limits.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Authentication.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster.")
    models: list[ModelConfig] = Field(default_factory=list, description="Models served.")
    database: DatabaseConfig = Field(default_factory=DatabaseConfig, description="Metadata store.")
    redis: RedisConfig = Field(default_factory=RedisConfig, description="Redis.")
    quotas: QuotasConfig = Field(default_factory=QuotasConfig, description="Quota enforcement.")
    jobs: JobsConfig = Field(default_factory=JobsConfig, description="Job records and idempotency.")
    usage: UsageConfig = Field(default_factory=UsageConfig, description="Usage export.")
    dlq: DlqConfig = Field(default_factory=DlqConfig, description="Dead-letter queue.")
    artifacts: ArtifactsConfig = Field(default_factory=ArtifactsConfig, description="Artifact store.")
    regions: list[RegionConfig] = Field(
        default_factory=lambda: [RegionConfig(name="local")], min_length=1, description="Regions."
    )
    rollouts: RolloutsConfig = Field(
        default_factory=RolloutsConfig, description="Rollouts: canary versions, traffic weights, automatic rollback."
    )
    resilience: ResilienceConfig = Field(
        default_factory=ResilienceConfig, description="Health probes, breakers, retries."
    )
    sharding: ShardingConfig = Field(
        default_factory=ShardingConfig, description="Tenants' home regions."
    )
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="Telemetry.")
    p2p: P2PConfig = Field(default_factory=P2PConfig, description="P2P shim (Hyperswarm RPC).")
    base_dir: str | None = Field(
        None, description="Directory relative paths resolve against (the config file's repo root)."
    )

    @model_validator(mode="after")
    def _unique_models(self) -> HaifConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model names: {', '.join(dupes)}")
        # An adapter is served as BASE:NAME and as NAME alone: every such name names one thing.
        served = names + [f"{m.name}:{a.name}" for m in self.models for a in m.adapters]
        served += [a.name for m in self.models for a in m.adapters]
        dupes = sorted({n for n in served if served.count(n) > 1})
        if dupes:
            raise ValueError(f"model and adapter names must differ; used twice: {', '.join(dupes)}")
        return self

    @model_validator(mode="after")
    def _p2p_workers_need_the_shim(self) -> HaifConfig:
        remote = [m.name for m in self.models if m.enabled and m.p2p_workers]
        if remote and not self.p2p.enabled:
            raise ValueError(
                f"models {', '.join(remote)} list p2p_workers: they are reached through the P2P shim; "
                "set p2p.enabled: true (HAIF_P2P__ENABLED=true)"
            )
        return self

    @model_validator(mode="after")
    def _redis_for_rate_limits(self) -> HaifConfig:
        if self.quotas.rate_limit_backend == "redis" and not self.redis.url:
            raise ValueError("quotas.rate_limit_backend is redis but redis.url is unset")
        return self

    @model_validator(mode="after")
    def _known_regions(self) -> HaifConfig:
        known = {r.name for r in self.regions}
        if len(known) != len(self.regions):
            raise ValueError("duplicate region names")
        if self.server.min_request_timeout_s > self.server.max_request_timeout_s:
            raise ValueError("server.min_request_timeout_s exceeds server.max_request_timeout_s")
        for model in self.models:
            unknown = sorted(set(model.regions or []) - known)
            if unknown:
                raise ValueError(f"model {model.name!r} names unknown regions: {', '.join(unknown)}")
        for tenant, region in self.sharding.home_regions.items():
            if region not in known:
                raise ValueError(f"sharding.home_regions: tenant {tenant!r} names unknown region {region!r}")
        return self

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def model_regions(self, model: ModelConfig) -> list[RegionConfig]:
        """The regions that run ``model``'s workers, in config order."""
        names = model.regions or [self.regions[0].name]
        return [r for r in self.regions if r.name in names]

    def total_workers(self, model: ModelConfig) -> int:
        """Workers of ``model`` at start (at least one): ``workers`` (or
        ``autoscaling.min_workers``) per region, per tier (shared + dedicated). An autoscaler's
        further workers are placed when there is room, else wait as ``pending``."""
        per_pool = max(1, model.initial_workers)
        return per_pool * len(self.model_regions(model)) * (1 + len(model.dedicated_tenants))

    def home_region(self, tenant: str | None) -> str:
        """Where ``tenant``'s requests go first."""
        if tenant is not None and tenant in self.sharding.home_regions:
            return self.sharding.home_regions[tenant]
        return self.regions[0].name

    def base_path(self) -> Path:
        return Path(self.base_dir) if self.base_dir else Path.cwd()

    def database_url(self) -> str:
        """The metadata store's URL, a relative SQLite path resolved against ``base_dir``."""
        return self.database.resolved_url(self.base_path())

    @model_validator(mode="after")
    def _redis_for_dlq(self) -> HaifConfig:
        if self.dlq.backend == "redis" and not self.redis.url:
            raise ValueError("dlq.backend is redis but redis.url is unset")
        return self

    def dlq_on_redis(self) -> bool:
        """Whether dead letters go to Redis Streams (else to the metadata store's table)."""
        return self.dlq.backend == "redis" or (self.dlq.backend == "auto" and self.redis.url is not None)

    def rate_limits_on_redis(self) -> bool:
        """Whether requests per minute are counted in Redis (else in the metadata store)."""
        backend = self.quotas.rate_limit_backend
        return backend == "redis" or (backend == "auto" and self.redis.url is not None)

    def state_path(self) -> Path:
        path = Path(self.server.state_dir)
        return path if path.is_absolute() else self.base_path() / path

    def p2p_seed_path(self) -> Path:
        """The P2P key seed file: ``p2p.seed_file`` (relative to ``base_dir``), else in state_dir."""
        if self.p2p.seed_file is None:
            return self.state_path() / "p2p" / "seed"
        path = Path(self.p2p.seed_file).expanduser()
        return path if path.is_absolute() else self.base_path() / path


def _parse_env_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_env_overrides(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return ``data`` with every ``HAIF_A__B=value`` applied at path ``a.b``."""
    result: dict[str, Any] = dict(data)
    for key, raw in sorted(environ.items()):
        if not key.startswith(ENV_PREFIX) or key == ENV_CONFIG_PATH:
            continue
        path = [part.lower() for part in key[len(ENV_PREFIX):].split("__") if part]
        if not path or path[0] not in HaifConfig.model_fields:
            continue
        node = result
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = _parse_env_value(raw)
    return result


def load_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> HaifConfig:
    """Load the config file at ``path`` (or ``$HAIF_CONFIG``, or the default) with overrides.

    Raises:
        ConfigError: the file is missing, not YAML, or does not validate.
    """
    environ = os.environ if environ is None else environ
    config_path = Path(path or environ.get(ENV_CONFIG_PATH) or DEFAULT_CONFIG_PATH)
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {config_path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {config_path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {config_path} must be a mapping at the top level")
    data = apply_env_overrides(data, environ)
    data.setdefault("base_dir", str(Path.cwd()))
    try:
        return HaifConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"config {config_path} is invalid:\n{exc}") from exc
