"""HAIF's exceptions: one tree, each class mapped to one HTTP status and OpenAI error.

::

    HaifError
    ├── ConfigError             500  config_error (the operator's config: fatal, never a 4xx)
    ├── RequestError                     the client's fault, never retried
    │   ├── InvalidRequest          400  invalid_request_error
    │   │   └── UnsupportedParameter 400 unsupported_parameter (named, with the model)
    │   ├── AuthenticationFailed    401  authentication_error / invalid_api_key
    │   ├── PermissionDenied        403  permission_error
    │   ├── NotFound                404  not_found_error
    │   │   ├── ModelNotFound       404  model_not_found
    │   │   └── AdapterNotFound     404  adapter_not_found (no such adapter artifact)
    │   ├── Conflict                409  conflict_error
    │   ├── PayloadTooLarge         413  request_too_large
    │   ├── UnprocessableRequest    422  invalid_request_error
    │   │   ├── PromptTooLong       422  context_length_exceeded
    │   │   ├── UnsupportedOperation 422 unsupported_operation
    │   │   └── AdapterRejected     422  adapter_rejected (untrusted, unsigned, wrong base...)
    │   └── RateLimited             429  rate_limit_error (Retry-After)
    │       └── QuotaExceeded       429  insufficient_quota (tokens per day spent)
    └── ServiceError                     the platform's side
        ├── RetryableError               safe to retry (nothing ran, or it is idempotent)
        │   ├── ModelNotReady       503  model_not_ready
        │   ├── WorkerUnavailable   503  worker_unavailable
        │   ├── WorkerDraining      503  worker_draining (takes no new request: sent elsewhere)
        │   └── Overloaded          429  overloaded (Retry-After)
        ├── DeadlineExceeded        504  timeout
        ├── GpuUnavailable          503  gpu_unavailable (placement failed, fatal for the model)
        ├── ModelLoadFailed         503  model_load_failed (fatal for the model)
        │   └── ArtifactRejected    503  artifact_rejected (a worker refused the model's bytes)
        ├── StoreUnavailable        503  store_unavailable (metadata store or Redis unreachable)
        ├── IdentityProviderUnavailable 503 identity_provider_unavailable (an OIDC issuer's keys unreachable too long)
        ├── MetricsUnavailable      503  metrics_unavailable (GET /metrics: aggregator off or silent)
        ├── ArtifactError           503  artifact_error (the artifact store)
        │   ├── ArtifactNotFound    503  artifact_not_found (no replica holds the manifest or a blob)
        │   ├── ArtifactCorrupt     503  artifact_corrupt (bytes differ from their digest in every replica)
        │   ├── ManifestInvalid     503  manifest_invalid (malformed or edited: its signature fails)
        │   ├── UntrustedSigner     503  untrusted_signer (signed by a key not trusted for it)
        │   ├── ArtifactConflict    409  artifact_conflict (name:version already holds other bytes)
        │   ├── QuorumNotReached    503  quorum_not_reached (a publish reached too few replicas)
        │   └── CacheFull           503  cache_full (the node cache cannot hold it under its cap)
        └── InternalError           500  internal_error (a bug; message never holds a trace)

Exceptions cross Ray hops by pickling, so every class takes only ``message`` (and for
the rate-limit family ``retry_after_s``) as constructor arguments.
"""

from __future__ import annotations

import logging
import math
from typing import Any


class HaifError(Exception):
    """Base of every error HAIF raises on purpose."""

    status_code: int = 500
    error_type: str = "internal_error"
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # The state carries attributes set after construction (e.g. the Orchestrator's
        # ``attempts``) across Ray hops.
        return (type(self), (self.message,), dict(self.__dict__))

    def to_body(self) -> dict[str, Any]:
        """The OpenAI-shaped error body."""
        return {"error": {"message": self.message, "type": self.error_type, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {}

    @property
    def log_level(self) -> int:
        """How a boundary logs it, in one line: INFO for the client's errors (4xx), WARNING
        for the platform's (5xx); never a traceback, which is for bugs."""
        return logging.INFO if self.status_code < 500 else logging.WARNING


class ConfigError(HaifError):
    """The configuration is wrong or incomplete (a key missing, a value unusable, a file the
    config names unreadable): the operator's to fix, never the client's fault. Fatal for what
    needed the setting; raised at start-up (or when a component is built), logged once as an
    ERROR. Should one reach a client it is a 500, never a 4xx."""

    status_code = 500
    error_type = "internal_error"
    code = "config_error"

    @property
    def log_level(self) -> int:
        return logging.ERROR


class RequestError(HaifError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class InvalidRequest(RequestError):
    pass


class UnsupportedParameter(InvalidRequest):
    """A parameter of the OpenAI API that this model (or HAIF) does not implement: refused,
    never silently ignored; the message names the parameter and the model."""

    code = "unsupported_parameter"


class AuthenticationFailed(RequestError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(RequestError):
    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"


class NotFound(RequestError):
    status_code = 404
    error_type = "not_found_error"
    code = "not_found"


class ModelNotFound(NotFound):
    error_type = "invalid_request_error"
    code = "model_not_found"


class AdapterNotFound(NotFound):
    """A request names a LoRA adapter that no replica of the artifact store holds."""

    error_type = "invalid_request_error"
    code = "adapter_not_found"


class Conflict(RequestError):
    status_code = 409
    error_type = "conflict_error"
    code = "conflict"


class PayloadTooLarge(RequestError):
    status_code = 413
    code = "request_too_large"


class UnprocessableRequest(RequestError):
    status_code = 422
    code = "invalid_value"


class PromptTooLong(UnprocessableRequest):
    code = "context_length_exceeded"


class UnsupportedOperation(UnprocessableRequest):
    code = "unsupported_operation"


class AdapterRejected(UnprocessableRequest):
    """A worker refused to load a request's LoRA adapter (nothing was loaded; the base model
    keeps serving). The message names the adapter and the reason: untrusted or unknown
    signer, an edited manifest, a corrupt blob, not an adapter, trained on another base,
    or not loadable by the runtime."""

    code = "adapter_rejected"


class _RetryAfter(HaifError):
    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.retry_after_s), dict(self.__dict__))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class RateLimited(_RetryAfter, RequestError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class QuotaExceeded(RateLimited):
    code = "insufficient_quota"


class ServiceError(HaifError):
    status_code = 503
    error_type = "service_unavailable"
    code = "service_unavailable"


class RetryableError(ServiceError):
    pass


class ModelNotReady(RetryableError):
    code = "model_not_ready"


class WorkerUnavailable(RetryableError):
    code = "worker_unavailable"


class WorkerDraining(RetryableError):
    """The worker is draining (a rollout, a scale-down, ``haif workers drain``): it takes no
    new request. Raised before any work, so the Gateway sends the request elsewhere."""

    code = "worker_draining"


class Overloaded(_RetryAfter, RetryableError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "overloaded"


class DeadlineExceeded(ServiceError):
    status_code = 504
    error_type = "timeout_error"
    code = "timeout"


class GpuUnavailable(ServiceError):
    code = "gpu_unavailable"


class ModelLoadFailed(ServiceError):
    code = "model_load_failed"


class StoreUnavailable(ServiceError):
    code = "store_unavailable"


class IdentityProviderUnavailable(ServiceError):
    """An ``auth.oidc`` issuer's keys could not be fetched and the last ones are too old:
    its tokens are refused (never accepted unverified) until it answers again."""

    code = "identity_provider_unavailable"


class MetricsUnavailable(ServiceError):
    code = "metrics_unavailable"


class InternalError(ServiceError):
    status_code = 500
    error_type = "internal_error"
    code = "internal_error"


class ArtifactRejected(ModelLoadFailed):
    """A worker refused a model: its artifact failed a check (the message names it and why)."""

    code = "artifact_rejected"


class ArtifactError(ServiceError):
    """The artifact store: publish, replicate, verify, cache. Fatal for a model that needs it."""

    code = "artifact_error"


class ArtifactNotFound(ArtifactError):
    code = "artifact_not_found"


class ArtifactCorrupt(ArtifactError):
    code = "artifact_corrupt"


class ManifestInvalid(ArtifactError):
    code = "manifest_invalid"


class UntrustedSigner(ArtifactError):
    code = "untrusted_signer"


class ArtifactConflict(ArtifactError):
    status_code = 409
    error_type = "conflict_error"
    code = "artifact_conflict"


class QuorumNotReached(ArtifactError):
    code = "quorum_not_reached"


class CacheFull(ArtifactError):
    code = "cache_full"


def unwrap(exc: BaseException) -> BaseException:
    """The HAIF error inside a Ray task error, or ``exc`` itself.

    Ray re-raises an actor's exception as a class deriving from both ``RayTaskError``
    and the original; older paths hand over only ``cause``.
    """
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc:
        return unwrap(cause)
    return exc
