"""A served model: ``ModelConfig``, its LoRA adapters and its autoscaling."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from haif.config._base import ARTIFACT_REF_PATTERN, ConfigModel, RuntimeName, resolve_source
from haif.config.runtimes import (
    CPU_STREAM_PIECES_PER_S,
    FLAT_KEYS,
    MAX_TENSOR_PARALLEL_SIZE,
    SECTION_RUNTIMES,
    STREAM_BATCH_MS,
    VLLM_ENGINE_DEFAULTS,
    VLLM_ENGINE_OWNED,
    VLLM_GPU_MEMORY_UTILIZATION,
    EchoConfig,
    TorchConfig,
    VllmConfig,
    move_flat_keys,
)
from haif.exceptions import ConfigError, UnprocessableRequest

# Runtimes that apply LoRA adapters (the torch runtime's batched LoRA, vLLM's LoRARequest).
ADAPTER_RUNTIMES = ("torch", "vllm")
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class AdapterConfig(ConfigModel):
    """A LoRA adapter served on a model: requested as `BASE:NAME` or by `NAME` alone."""

    name: str = Field(..., pattern=ADAPTER_NAME_PATTERN, description="Its served name.")
    artifact: str = Field(
        ..., pattern=ARTIFACT_REF_PATTERN,
        description="Its signed artifact (`name:version` or `sha256:<manifest digest>`), published "
        "with `haif models publish --base` for this model's artifact.",
    )


class AutoscalingConfig(ConfigModel):
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


class ModelConfig(ConfigModel):
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
        if isinstance(data, Mapping) and FLAT_KEYS.keys() & data.keys():
            return move_flat_keys(data)
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
        for section, runtimes in SECTION_RUNTIMES.items():
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
