"""The `p2p:` section: defaults, HAIF_P2P__* overrides, the bind host, and its guard rails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from haif.config import (
    P2P_MAX_MESSAGE_BYTES,
    HaifConfig,
    P2PConfig,
    apply_env_overrides,
    load_config,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
KEY = "ab" * 32


def test_off_by_default_and_in_the_local_config() -> None:
    assert P2PConfig().enabled is False
    local = load_config(ROOT / "configs" / "local.yaml", environ={})
    assert local.p2p.enabled is False
    assert local.p2p.bootstrap is None and local.p2p.bind_host() == "0.0.0.0"  # the public DHT
    assert local.p2p_seed_path() == local.state_path() / "p2p" / "seed"


def test_the_environment_turns_it_on_against_a_local_testnet() -> None:
    env = {"HAIF_P2P__ENABLED": "true", "HAIF_P2P__BOOTSTRAP": '["127.0.0.1:49737"]'}
    config = load_config(ROOT / "configs" / "local.yaml", environ=env)
    assert config.p2p.enabled is True
    assert config.p2p.bootstrap == ["127.0.0.1:49737"]
    # peers on a local testnet must bind the loopback: no HAIF_P2P__HOST needed
    assert config.p2p.bind_host() == "127.0.0.1"


@pytest.mark.parametrize(
    ("bootstrap", "host", "bound"),
    [
        (None, None, "0.0.0.0"),
        (["127.0.0.1:1", "localhost:2"], None, "127.0.0.1"),
        (["127.0.0.1:1", "203.0.113.7:2"], None, "0.0.0.0"),
        (["127.0.0.1:1"], "10.0.0.5", "10.0.0.5"),
    ],
)
def test_bind_host(bootstrap: list[str] | None, host: str | None, bound: str) -> None:
    assert P2PConfig(bootstrap=bootstrap, host=host).bind_host() == bound


def test_seed_file_resolves_against_base_dir(tmp_path: Path) -> None:
    config = HaifConfig.model_validate({"base_dir": str(tmp_path), "p2p": {"seed_file": "keys/p2p.seed"}})
    assert config.p2p_seed_path() == tmp_path / "keys" / "p2p.seed"
    absolute = HaifConfig.model_validate({"p2p": {"seed_file": "/srv/haif/seed"}})
    assert absolute.p2p_seed_path() == Path("/srv/haif/seed")


def test_peer_keys_are_normalized() -> None:
    assert P2PConfig(peers={KEY.upper(): "acme"}).peers == {KEY: "acme"}


@pytest.mark.parametrize(
    "section",
    [
        {"bootstrap": ["127.0.0.1"]},  # no port
        {"bootstrap": ["127.0.0.1:70000"]},
        {"bootstrap": []},  # omit it for the public DHT
        {"peers": {"ab" * 31: "acme"}},
        {"peers": {KEY: "no spaces"}},
        {"max_message_bytes": P2P_MAX_MESSAGE_BYTES + 1},  # a secret-stream message is < 16 MiB
        {"max_message_bytes": 10},
        {"max_concurrent": 0},
        {"max_concurrent_unverified": 0},
        {"max_stream_buffer_bytes": 0},  # a stream is always bounded
        {"max_stream_buffer_bytes": P2P_MAX_MESSAGE_BYTES + 1},
        {"request_timeout_s": 0},
        {"restart_backoff_initial_s": 60, "restart_backoff_max_s": 1},
        {"enabeld": True},  # a typo is an error
    ],
)
def test_guard_rails(section: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        HaifConfig.model_validate({"p2p": section})


def test_every_field_is_described() -> None:
    assert all(field.description for field in P2PConfig.model_fields.values())


def test_nested_overrides_apply_to_p2p() -> None:
    data = apply_env_overrides({}, {"HAIF_P2P__MAX_CONCURRENT": "8", "HAIF_P2P__PEERS": f"{{{KEY}: acme}}"})
    config = HaifConfig.model_validate(data)
    assert config.p2p.max_concurrent == 8 and config.p2p.peers == {KEY: "acme"}


def test_streams_and_strangers_are_bounded_by_default() -> None:
    p2p = P2PConfig()
    assert p2p.max_stream_buffer_bytes == 256 * 1024
    assert p2p.max_concurrent_unverified == 32 < p2p.max_concurrent
