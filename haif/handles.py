"""Calling the Gateway through a Serve handle: the one mapping of its answers and errors.

Every in-cluster caller of the Gateway deployment (``haif.sdk.HandleClient``, the P2P
shim, ``haif dlq replay``) goes through here:

* the Gateway answers a HAIF error as a ``Refused`` value (``haif.envelope``) instead of
  raising it, so that Serve does not log a refused request as an ERROR; ``answer`` raises
  it on the caller's side;
* a handle call that fails raises Serve's or Ray's exception; ``typed`` gives the HAIF
  error for it: Serve's own refusals picked by class (queues full → ``Overloaded``, the
  deployment gone → ``ServiceError``), a Ray task error as the error inside it.
"""

from __future__ import annotations

from typing import TypeVar

from haif.envelope import Refused
from haif.exceptions import HaifError, Overloaded, ServiceError, unwrap

T = TypeVar("T")

BACKPRESSURE_RETRY_AFTER_S = 1.0


def answer(value: T | Refused) -> T:
    """``value``, or the refusal it is raised."""
    if isinstance(value, Refused):
        raise value.error
    return value


def typed(exc: BaseException) -> BaseException:
    """The exception to raise for a failed handle call (a HAIF error when there is one)."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException

    err = unwrap(exc)
    if isinstance(err, HaifError):
        return err
    if isinstance(err, BackPressureError):
        return Overloaded("the service is at capacity; retry later", retry_after_s=BACKPRESSURE_RETRY_AFTER_S)
    if isinstance(err, (DeploymentUnavailableError, RayServeException)):
        return ServiceError(f"the service is not available; retry later ({type(err).__name__})")
    return exc
