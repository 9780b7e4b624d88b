"""Every documented config key reaches the code that uses it, through one options object.

The walk below changes each key in docs/CONFIG.md's table (config.KEYS) from its default
and checks that the options a node or gateway is built from change with it, or, for the
few keys the command line itself consumes (key files, the metrics listener), that the
CLI's consumer sees the change. The ICE keys that once did nothing have behaviour tests
of their own in test_node_core.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from macula import GatewayOptions, NodeOptions
from macula.config import KEYS, ConfigError, load_config
from macula.errors import InvalidValue

# A valid non-default value for every key, in the file's units.
CHANGED: dict[str, Any] = {
    "connection_strategy": "direct_only",
    "stun_servers": ["192.0.2.1:3478"],
    "turn_servers": [{"server": "192.0.2.2:3478", "username": "u", "credential": "c"}],
    "nat_traversal.enabled": False,
    "nat_traversal.hole_punch_timeout": 2500,
    "nat_traversal.prefer_direct": False,
    "nat_traversal.fallback_to_relay": False,
    "nat_traversal.port_mapping": True,
    "nat_traversal.hard_nat": False,
    "nat_traversal.hard_nat_rate": 50,
    "nat_traversal.hard_nat_sockets": 16,
    "nat_traversal.hard_nat_probes": 100,
    "ice.gather_timeout": 1500,
    "ice.check_timeout": 3000,
    "ice.candidate_types": ["local", "stun"],
    "ice.enable_trickling": False,
    "node.gateway": "192.0.2.10:9443",
    "node.listen": "127.0.0.1:4000",
    "node.key_file": "/tmp/macula-test-node.key",
    "node.accept_from": ["aidl6zwufrcobq6ezo63uuykje"],
    "node.membership": "/etc/macula/node.membership",
    "node.ca": "/etc/macula/ca.pub",
    "node.acl": "/etc/macula/acl",
    "node.revoked": "/etc/macula/revoked",
    "node.gateway_tls": "192.0.2.10:443",
    "node.https_proxy": "http://user:pw@192.0.2.40:3128",
    "node.keepalive_interval": 2000,
    "node.max_message_size": 4096,
    "node.gateways": ["192.0.2.10:9443", "192.0.2.11:9443"],
    "gateway.listen": "127.0.0.1:9999",
    "gateway.key_file": "/tmp/macula-test-gateway.key",
    "gateway.node_timeout": 10000,
    "gateway.max_nodes": 10,
    "gateway.relay_rate_bytes": 1000,
    "gateway.relay_burst_bytes": 2_000_000,
    "gateway.max_relay_peers": 3,
    "gateway.relay_session_max_duration": 60000,
    "gateway.relay_session_max_bytes": 10,
    "gateway.control_rate": 5,
    "gateway.punch_rate": 1,
    "gateway.max_handshakes": 8,
    "gateway.retry_above": 0,
    "gateway.answer_rate": 5,
    "gateway.registration_rate": 2,
    "gateway.admission": "allowlist",
    "gateway.allowlist": "/etc/macula/allowlist",
    "gateway.alternate_port": 9555,
    "gateway.second_ip": "192.0.2.20",
    "gateway.turn_secret": "shared",
    "gateway.turn_servers": ["192.0.2.3:3478"],
    "gateway.turn_credential_ttl": 3600000,
    "gateway.ca": "/etc/macula/ca.pub",
    "gateway.acl": "/etc/macula/acl",
    "gateway.revoked": "/etc/macula/revoked",
    "gateway.tls_listen": "127.0.0.1:8443",
    "gateway.tls_cert": "/etc/macula/gateway.crt",
    "gateway.tls_key": "/etc/macula/gateway.pem",
    "gateway.cluster.redis": "redis://192.0.2.50:6379/0",
    "gateway.cluster.advertise": "192.0.2.10:9443",
    "gateway.cluster.drain_timeout": 5000,
    "metrics.listen": "127.0.0.1:9100",
    "log.level": "info",
    "log.format": "json",
}


def consumers(config: Any) -> dict[str, object]:
    """What the running parts are given: the two options objects, and what the CLI itself
    reads from the config (key paths, the metrics address)."""
    return {"node": NodeOptions.from_config(config),
            "gateway": GatewayOptions.from_config(config),
            "node_key": config.node.key_path(), "gateway_key": config.gateway.key_path(),
            "metrics": config.metrics.listen, "log": config.log}


def test_every_documented_key_is_in_the_walk() -> None:
    assert sorted(CHANGED) == sorted(k.key for k in KEYS)


# Keys that only make sense together are changed together.
TOGETHER = {"gateway.admission": {"gateway.allowlist": "/etc/macula/allowlist"},
            "gateway.tls_cert": {"gateway.tls_key": "/etc/macula/gateway.pem"},
            "gateway.tls_key": {"gateway.tls_cert": "/etc/macula/gateway.crt"}}


@pytest.mark.parametrize("key", sorted(CHANGED))
def test_each_key_changes_what_its_consumer_is_given(key: str) -> None:
    default = consumers(load_config(env={}))
    changed = consumers(load_config(env={}, overrides={key: CHANGED[key],
                                                       **TOGETHER.get(key, {})}))
    differ = [name for name in default if default[name] != changed[name]]
    assert differ, f"{key} reaches nothing: a documented key that does nothing"


def test_milliseconds_become_seconds_in_one_place() -> None:
    config = load_config(env={}, overrides={"nat_traversal.hole_punch_timeout": 2500,
                                            "ice.gather_timeout": 1500,
                                            "ice.check_timeout": 3000,
                                            "node.keepalive_interval": 2000,
                                            "gateway.node_timeout": 10000,
                                            "gateway.relay_session_max_duration": 60000})
    node, gateway = NodeOptions.from_config(config), GatewayOptions.from_config(config)
    assert node.hole_punch_timeout == 2.5 and node.keepalive_interval == 2.0
    assert node.ice.gather_timeout == 1.5 and node.ice.check_timeout == 3.0
    assert gateway.node_timeout == 10.0 and gateway.limits.relay_session_max_duration == 60.0


def test_defaults_agree_between_file_and_api() -> None:
    """NodeOptions() and an empty config file mean the same node."""
    from_file = NodeOptions.from_config(load_config(env={}))
    assert from_file == NodeOptions()
    assert GatewayOptions.from_config(load_config(env={})) == GatewayOptions()


def test_attempt_timeout_is_the_tighter_of_the_two() -> None:
    options = NodeOptions()
    assert options.attempt_check_timeout == 5.0  # hole_punch_timeout, check_timeout 10 s
    tighter = dataclasses.replace(options, ice=dataclasses.replace(options.ice, check_timeout=1.0))
    assert tighter.attempt_check_timeout == 1.0


def test_api_shorthands_and_bad_values() -> None:
    options = NodeOptions().with_changes(hard_nat=False, candidate_types=["local"],
                                         stun_servers=[("192.0.2.1", 3478)])
    assert not options.hard_nat.enabled and options.ice.candidate_types == ("local",)
    assert options.stun_servers == (("192.0.2.1", 3478),)
    with pytest.raises(InvalidValue, match="connection_strategy"):
        NodeOptions(strategy="sometimes")  # type: ignore[arg-type]
    with pytest.raises(InvalidValue, match="candidate_types"):
        NodeOptions().with_changes(candidate_types=["carrier-pigeon"])
    with pytest.raises(InvalidValue):
        GatewayOptions(max_nodes=-1)
    assert GatewayOptions().max_nodes == 0  # derived from the machine's memory at start


async def test_unresolvable_host_names_the_key() -> None:
    options = NodeOptions(gateway=("no-such-host.invalid", 9443))
    with pytest.raises(ConfigError, match="node.gateway"):
        await options.resolved()


def test_gateway_id_in_the_config_pins_it() -> None:
    from macula import Identity

    gid = Identity.generate().node_id
    config = load_config(env={}, overrides={"node.gateway": f"{gid.text}@192.0.2.10:9443"})
    options = NodeOptions.from_config(config)
    assert options.gateway == ("192.0.2.10", 9443) and options.gateway_id == gid
    assert NodeOptions().with_changes(gateway=f"{gid.text}@[2001:db8::1]:9443").gateway_id == gid
    with pytest.raises(ConfigError, match=r"node\.gateway: the gateway id before '@'"):
        load_config(env={}, overrides={"node.gateway": "not-an-id@192.0.2.10:9443"})


def test_known_gateways_file_errors_name_file_and_line(tmp_path) -> None:
    from macula import Identity
    from macula.node import known_gateways

    path = tmp_path / "known_gateways"
    gid = Identity.generate().node_id
    known_gateways.remember(path, ("192.0.2.10", 9443), gid)
    assert known_gateways.load(path) == {("192.0.2.10", 9443): gid}
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    path.write_text(path.read_text() + "192.0.2.11:9443 nonsense\n")
    with pytest.raises(ConfigError, match=r"known_gateways:3: expected 'host:port NODE_ID'"):
        known_gateways.load(path)


def test_allowlist_admission_without_a_file_names_both_keys() -> None:
    with pytest.raises(ConfigError, match=r'gateway\.admission = "allowlist" needs gateway\.allowlist'):
        load_config(env={}, overrides={"gateway.admission": "allowlist"})


def test_the_default_node_limit_fits_the_machine() -> None:
    """max_nodes = 0 admits what fits in half the memory at the measured cost per node."""
    from macula.gateway.core import GatewayCore
    from macula.gateway.options import BYTES_PER_NODE, derived_max_nodes
    from macula.identity import Identity

    assert derived_max_nodes(24 << 30) == (24 << 30) // 2 // BYTES_PER_NODE
    assert derived_max_nodes(1 << 20) == 1000  # a floor for tiny machines
    assert derived_max_nodes(1 << 50) == 1_000_000  # and a ceiling
    assert GatewayCore(Identity.generate(), GatewayOptions()).max_nodes == derived_max_nodes()
    assert GatewayCore(Identity.generate(), GatewayOptions(max_nodes=7)).max_nodes == 7
