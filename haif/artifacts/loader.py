"""Pull: manifest → trust check → every blob into the node cache, verified → a model directory.

``pull`` is what ``haif models pull`` and every worker run. A warm node cache answers
without touching a replica: the manifest comes from the cache (its signature is checked
again on every pull, against today's trusted keys) and every blob is a hit.
``ArtifactLoader`` is the worker's side: it turns any failure into ``ArtifactRejected``
after counting it and recording an event. ``acquire_adapter`` does the same for a LoRA
adapter a request asks for, and checks, before any blob is fetched, that the signed
manifest is an adapter's and names the manifest of the base the worker serves; a refusal is
the request's error (``AdapterRejected``, ``AdapterNotFound``: 4xx), never the model's.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from haif.artifacts.cache import NodeCache, new_owner
from haif.artifacts.keys import TrustPolicy
from haif.artifacts.manifest import ArtifactRef, SignedManifest
from haif.artifacts.store import ArtifactStore
from haif.artifacts.trust import trusted_keys
from haif.exceptions import (
    AdapterNotFound,
    AdapterRejected,
    ArtifactError,
    ArtifactNotFound,
    ArtifactRejected,
    ManifestInvalid,
)
from haif.telemetry import tracing

if TYPE_CHECKING:
    from haif.artifacts.manifest import Manifest
    from haif.artifacts._io import Progress
    from haif.config import ArtifactsConfig

logger = logging.getLogger("haif.artifacts")

FAILURE_METRIC = "haif_artifact_verify_failures_total"
_EVENTS_KEPT = 32


@dataclass
class PulledArtifact:
    """A verified model directory in the node cache, pinned until ``release()``."""

    ref: str
    manifest: Manifest
    manifest_digest: str
    path: Path
    owner: str
    cache: NodeCache
    blobs_hit: int = 0
    blobs_fetched: int = 0
    bytes_fetched: int = 0
    sources: dict[str, int] = field(default_factory=dict)  # replica -> blobs fetched from it
    manifest_from_cache: bool = False

    def release(self) -> None:
        self.cache.unpin(self.owner)

    def summary(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "name": self.manifest.ref,
            "manifest_digest": f"sha256:{self.manifest_digest}",
            "signer": self.manifest.signer,
            "path": str(self.path),
            "files": len(self.manifest.files),
            "bytes": self.manifest.total_bytes,
            "blobs_hit": self.blobs_hit,
            "blobs_fetched": self.blobs_fetched,
            "bytes_fetched": self.bytes_fetched,
            "sources": dict(self.sources),
            "manifest_from_cache": self.manifest_from_cache,
        }


def _cached_manifest(
    cache: NodeCache, ref: ArtifactRef, trust: TrustPolicy
) -> tuple[SignedManifest | None, ArtifactError | None]:
    digest = ref.digest or cache.get_ref(ref.name or "", ref.version or "")
    data = cache.manifest_bytes(digest) if digest else None
    if data is None:
        return None, None
    try:
        signed = SignedManifest.from_bytes(data, where="node cache")
        signed.check_ref(ref, where="node cache")
        signed.verify(trust, where="node cache")
    except ArtifactError as exc:
        # Keys may have changed since it was cached: the replicas decide.
        logger.warning("cached manifest of %s refused (%s); reading the replicas", ref, exc.message)
        return None, exc
    if signed.digest != digest:
        return None, None
    return signed, None


def _remote_manifest(
    store: ArtifactStore, ref: ArtifactRef, trust: TrustPolicy, cached_error: ArtifactError | None
) -> SignedManifest:
    try:
        return store.read_manifest(ref, trust)
    except ArtifactNotFound as exc:
        if cached_error is None:
            raise
        # The replicas are out of reach; why the node's own copy was refused says more.
        raise type(cached_error)(f"artifact {ref}: {cached_error.message}; {exc.message}") from None


def pull(
    store: ArtifactStore,
    cache: NodeCache,
    ref: ArtifactRef,
    trust: TrustPolicy,
    *,
    progress: Progress | None = None,
    accept: Callable[[Manifest], None] | None = None,
) -> PulledArtifact:
    """Bring ``ref`` into ``cache``, verified, and return its pinned model directory.

    ``accept`` sees the trusted manifest before any blob is fetched, and may refuse it by
    raising an ``ArtifactError``.

    Raises:
        UntrustedSigner / ManifestInvalid: no replica has a manifest signed by a trusted key.
        ArtifactNotFound / ArtifactCorrupt: a blob has no good copy in any replica (the
            message names the artifact and the file). Nothing of a failed pull is used.
        CacheFull: the artifact does not fit under the cache cap.
    """
    with tracing.span("artifact.verify_manifest") as span:
        signed, cached_error = _cached_manifest(cache, ref, trust)
        from_cache = signed is not None
        if signed is None:
            signed = _remote_manifest(store, ref, trust, cached_error)
            cache.put_manifest(signed)
        tracing.set_attributes({"haif.artifact.signer": signed.manifest.signer,
                                "haif.artifact.manifest_from_cache": from_cache}, span)
    manifest = signed.manifest
    if accept is not None:
        accept(manifest)
    cache.set_ref(manifest.name, manifest.version, signed.digest)
    owner = new_owner()
    blobs = manifest.blobs()
    paths = {f.digest: f.path for f in manifest.files}
    cache.pin(blobs, owner)
    pulled = PulledArtifact(
        ref=str(ref),
        manifest=manifest,
        manifest_digest=signed.digest,
        path=cache.root,
        owner=owner,
        cache=cache,
        manifest_from_cache=from_cache,
    )
    try:
        advance = progress.task(f"pull {ref}", manifest.total_bytes) if progress else None

        def fetch(item: tuple[str, int]) -> None:
            digest, size = item
            try:
                got = cache.ensure_blob(digest, size, store.blob_sources(digest), on_bytes=advance)
            except ArtifactError as exc:
                raise type(exc)(f"artifact {ref}: {paths[digest]}: {exc.message}") from None
            if got.hit:
                pulled.blobs_hit += 1
                if advance is not None:
                    advance(size)
            else:
                pulled.blobs_fetched += 1
                pulled.bytes_fetched += size
                pulled.sources[got.source or "?"] = pulled.sources.get(got.source or "?", 0) + 1

        counted = {"haif.artifact.blobs": len(blobs)}
        with tracing.span("artifact.verify_blobs", attributes=counted) as span:
            hits = cache.verified_hits(blobs)
            pulled.blobs_hit = len(hits)
            if advance is not None:
                advance(sum(blobs[d] for d in hits))
            missing = sorted((d, s) for d, s in blobs.items() if d not in hits)
            if missing:
                with ThreadPoolExecutor(
                    max_workers=store.max_parallel, thread_name_prefix="haif-pull"
                ) as pool:
                    list(pool.map(fetch, missing))
            tracing.set_attributes({"haif.artifact.blobs_fetched": pulled.blobs_fetched,
                                    "haif.artifact.bytes_fetched": pulled.bytes_fetched}, span)
        pulled.path = cache.view(manifest, signed.digest)
    except BaseException:
        cache.unpin(owner)
        raise
    return pulled


class ArtifactEvents:
    """Counts refused artifacts (a Ray metric summed across processes), logs each as JSON."""

    def __init__(self, *, ray_metrics: bool) -> None:
        self._ray_metrics = ray_metrics
        self._counter: Any = None
        self.recent: deque[dict[str, Any]] = deque(maxlen=_EVENTS_KEPT)

    def refused(
        self, model: str, artifact: str, error: ArtifactError, *, adapter: bool = False
    ) -> dict[str, Any]:
        event = {
            "event": "adapter_refused" if adapter else "artifact_refused",
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "model": model,
            "artifact": artifact,
            "reason": error.code,
            "error": error.message,
        }
        self.recent.append(event)
        # A model refused is the operator's problem; an adapter refused, the request's (4xx).
        level = logging.WARNING if adapter else logging.ERROR
        logger.log(level, "%s", json.dumps(event, sort_keys=True))
        counter = self._metric()
        if counter is not None:
            counter.inc(1.0, tags={"model": model, "artifact": artifact, "reason": error.code})
        return event

    def _metric(self) -> Any:
        if not self._ray_metrics:
            return None
        import ray  # lazy: the CLI records events without Ray

        if not ray.is_initialized():
            return None
        if self._counter is None:
            from ray.util.metrics import Counter

            self._counter = Counter(
                FAILURE_METRIC,
                description="Artifacts a worker refused to load (bad signature, untrusted signer, "
                "corrupt or missing blob, ...).",
                tag_keys=("model", "artifact", "reason"),
            )
        return self._counter


class ArtifactLoader:
    """A worker's way to its model's bytes: pull, verify, and refuse loudly."""

    def __init__(
        self, config: ArtifactsConfig, base: Path, model: str, *, ray_metrics: bool = True
    ) -> None:
        self._config = config
        self._base = base
        self._model = model
        self._parts: tuple[ArtifactStore, NodeCache, TrustPolicy] | None = None
        self.events = ArtifactEvents(ray_metrics=ray_metrics)

    def _open(self) -> tuple[ArtifactStore, NodeCache, TrustPolicy]:
        if self._parts is None:
            self._parts = (
                ArtifactStore.from_config(self._config, self._base),
                NodeCache.from_config(self._config, self._base),
                trusted_keys(self._config, self._base),
            )
        return self._parts

    def acquire(self, artifact: str) -> PulledArtifact:
        """The verified, pinned model directory of ``artifact`` (``name:version``/``sha256:...``).

        Raises:
            ArtifactRejected: the artifact failed a check; the message names it and why.
        """
        try:
            ref = ArtifactRef.parse(artifact)
        except ValueError as exc:
            error: ArtifactError = ArtifactError(str(exc))
        else:
            try:
                store, cache, trust = self._open()
                return pull(store, cache, ref, trust)
            except ArtifactError as exc:
                error = exc
        self.events.refused(self._model, artifact, error)
        raise ArtifactRejected(f"refused artifact {artifact} [{error.code}]: {error.message}")

    def acquire_adapter(self, artifact: str, base_manifest: str | None) -> PulledArtifact:
        """The verified, pinned directory of the LoRA adapter ``artifact`` for the base model
        whose manifest digest is ``base_manifest`` (None: a model not served from the store).

        Raises:
            AdapterNotFound: no replica holds a manifest of ``artifact``.
            AdapterRejected: it failed a check (untrusted or unknown signer, an edited
                manifest, a corrupt blob, not an adapter, another base); nothing is pinned.
        """

        def accept(manifest: Manifest) -> None:
            if manifest.adapter is None:
                raise NotAnAdapter(f"{manifest.ref} is a model, not a LoRA adapter")
            if base_manifest is None:
                raise BaseMismatch(
                    f"model {self._model!r} is not served from a signed artifact; an adapter's "
                    "base cannot be checked"
                )
            if manifest.adapter.base_manifest != base_manifest:
                raise BaseMismatch(
                    f"{manifest.ref} was trained on {manifest.adapter.base} (manifest "
                    f"sha256:{manifest.adapter.base_manifest[:16]}), not on the base model "
                    f"{self._model!r} serves (sha256:{base_manifest[:16]})"
                )

        try:
            ref = ArtifactRef.parse(artifact)
        except ValueError as exc:
            error: ArtifactError = ArtifactError(str(exc))
        else:
            try:
                store, cache, trust = self._open()
                return pull(store, cache, ref, trust, accept=accept)
            except ArtifactError as exc:
                error = exc
        self.events.refused(self._model, artifact, error, adapter=True)
        if isinstance(error, ArtifactNotFound):
            raise AdapterNotFound(f"adapter {artifact} of model {self._model!r}: {error.message}")
        raise AdapterRejected(f"refused adapter {artifact} [{error.code}]: {error.message}")


class NotAnAdapter(ManifestInvalid):
    """A request named a model's artifact as an adapter."""

    code = "not_an_adapter"


class BaseMismatch(ManifestInvalid):
    """The adapter was trained on another base model than the one it was asked to run on."""

    code = "base_mismatch"
