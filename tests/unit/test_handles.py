"""server.handle_transport picks how the Bridge and the Gateway call the next deployment."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from haif.config import HaifConfig
from haif.handles import transported


class _Handle:
    """Stands in for a DeploymentHandle: records the options it was given."""

    def __init__(self, **options: Any) -> None:
        self.options_given = options

    def options(self, **options: Any) -> _Handle:
        return _Handle(**{**self.options_given, **options})


def _config(transport: str | None) -> HaifConfig:
    server = {} if transport is None else {"handle_transport": transport}
    return HaifConfig.model_validate({"server": server})


def test_grpc_is_the_default_and_sends_by_value() -> None:
    assert _config(None).server.handle_transport == "grpc"
    assert transported(_Handle(), _config(None)).options_given == {"_by_reference": False}


def test_ray_keeps_the_handle_as_it_is() -> None:
    handle = _Handle()
    assert transported(handle, _config("ray")) is handle


def test_an_unknown_transport_is_refused() -> None:
    with pytest.raises(ValidationError, match="handle_transport"):
        _config("http")
