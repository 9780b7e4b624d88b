"""The configuration layer: defaults, file/env/override precedence, strict validation with
errors that name key and source, host:port parsing, TOML round trip, and doc/KEYS sync."""

from __future__ import annotations

import json
import pathlib
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from macula.config import (
    CANDIDATE_TYPES,
    KEYS,
    STRATEGIES,
    TURN_TRANSPORTS,
    Config,
    ConfigError,
    GatewaySection,
    Ice,
    MetricsSection,
    NatTraversal,
    NodeSection,
    TurnServer,
    _flatten,
    _toml_value,
    default_config_dir,
    dump_toml,
    env_var_name,
    format_host_port,
    load_config,
    parse_host_port,
)
from macula.identity import NodeId

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "macula.toml"
    path.write_text(text, encoding="utf-8")
    return path


def file_error(tmp_path: pathlib.Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert message.startswith(f"config error in {path}: "), message
    return message


# --- defaults and precedence --------------------------------------------------------------


def test_defaults_are_the_roadmap_values_with_no_public_servers() -> None:
    config = load_config(env={})
    assert config == Config()
    assert config.connection_strategy == "opportunistic"
    assert config.stun_servers == () and config.turn_servers == ()
    assert config.nat_traversal == NatTraversal(True, 5000, True, True)
    assert config.ice == Ice(5000, 10000, ("local", "stun", "turn", "relay"), True)
    assert config.node == NodeSection("127.0.0.1:9443", "0.0.0.0:0", "", 5000, 1048576)
    assert config.gateway == GatewaySection("0.0.0.0:9443", "", 30000, 0)  # 0: from memory
    assert config.metrics == MetricsSection("")


def test_file_sets_keys_and_leaves_the_rest_default(tmp_path: pathlib.Path) -> None:
    path = write(
        tmp_path,
        """
        connection_strategy = "always_relay"
        stun_servers = ["stun.example.net:3478", "[2001:db8::1]:3478"]
        turn_servers = [{server = "turn.example.net:3478", username = "u", credential = "p"}]
        [nat_traversal]
        hole_punch_timeout = 2500
        [ice]
        candidate_types = ["relay", "local"]
        [node]
        gateway = "gw.example.net:9443"
        [metrics]
        listen = "127.0.0.1:9100"
        """,
    )
    config = load_config(path, env={})
    assert config.connection_strategy == "always_relay"
    assert config.stun_servers == ("stun.example.net:3478", "[2001:db8::1]:3478")
    assert config.turn_servers == (TurnServer("turn.example.net:3478", "u", "p", "udp"),)
    assert config.nat_traversal == NatTraversal(hole_punch_timeout=2500)
    assert config.ice.candidate_types == ("relay", "local")
    assert config.node == NodeSection(gateway="gw.example.net:9443")
    assert config.metrics.listen == "127.0.0.1:9100"
    assert config.gateway == GatewaySection()


def test_environment_overrides_file(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, 'connection_strategy = "always_relay"\n[ice]\nenable_trickling = true\n')
    env = {
        "MACULA_CONNECTION_STRATEGY": "direct_only",
        "MACULA_NAT_TRAVERSAL_HOLE_PUNCH_TIMEOUT": "750",
        "MACULA_ICE_ENABLE_TRICKLING": "off",
        "MACULA_NODE_GATEWAY": "[::1]:9443",
        "MACULA_STUN_SERVERS": "a.example:3478, b.example:19302",
        "MACULA_ICE_CANDIDATE_TYPES": "stun,local",
        "MACULA_NODE_KEY_FILE": "/var/lib/macula/node.key",
    }
    config = load_config(path, env=env)
    assert config.connection_strategy == "direct_only"
    assert config.nat_traversal.hole_punch_timeout == 750
    assert config.ice.enable_trickling is False
    assert config.node.gateway == "[::1]:9443"
    assert config.stun_servers == ("a.example:3478", "b.example:19302")
    assert config.ice.candidate_types == ("stun", "local")
    assert config.node.key_file == "/var/lib/macula/node.key"


def test_precedence_is_defaults_then_file_then_env_then_overrides(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[gateway]\nnode_timeout = 1000\nmax_nodes = 7\n")
    env = {"MACULA_GATEWAY_NODE_TIMEOUT": "2000", "MACULA_GATEWAY_MAX_NODES": "8"}
    config = load_config(path, env=env, overrides={"gateway.node_timeout": 3000})
    assert config.gateway.node_timeout == 3000  # override beats env beats file
    assert config.gateway.max_nodes == 8  # env beats file
    assert load_config(path, env={}).gateway.node_timeout == 1000  # file beats default


@pytest.mark.parametrize(
    ("text", "expected"),
    [(w, True) for w in ("true", "1", "yes", "on", "TRUE", " On ")]
    + [(w, False) for w in ("false", "0", "no", "off", "False")],
)
def test_environment_boolean_spellings(text: str, expected: bool) -> None:
    env = {"MACULA_NAT_TRAVERSAL_ENABLED": text, "MACULA_ICE_ENABLE_TRICKLING": text}
    config = load_config(env=env)
    assert config.nat_traversal.enabled is expected
    assert config.ice.enable_trickling is expected


def test_environment_turn_servers_syntax() -> None:
    env = {"MACULA_TURN_SERVERS": "alice:s3:cr@t@turn.example:3478/tcp, bob:pw@[2001:db8::2]:3478"}
    assert load_config(env=env).turn_servers == (
        TurnServer("turn.example:3478", "alice", "s3:cr@t", "tcp"),  # ':' and '@' in secrets
        TurnServer("[2001:db8::2]:3478", "bob", "pw", "udp"),
    )
    with pytest.raises(ConfigError, match=r"MACULA_TURN_SERVERS: turn_servers\[0\]: expected "
                                          r"user:credential@host:port\[/tcp or /tls\], got \"turn.example:3478\""):
        load_config(env={"MACULA_TURN_SERVERS": "turn.example:3478"})


def test_only_known_macula_variables_are_read() -> None:
    env = {
        "MACULA_LAB_PREFIX": "lab",
        "MACULA_CONFIG_DIR": "/nowhere",
        "MACULA_NODE_GATEWAY_LIST": "not even an address",  # near miss of a key: still not ours
        "MACULA_ICE_ENABLE_TRICKLING": "no",
    }
    assert load_config(env=env) == Config(ice=Ice(enable_trickling=False))


def test_overrides_skip_none_and_parse_strings_like_the_environment() -> None:
    config = load_config(
        env={"MACULA_CONNECTION_STRATEGY": "direct_only"},
        overrides={
            "connection_strategy": None,  # flag not given: env value stands
            "nat_traversal.enabled": False,
            "node.max_message_size": "4096",
            "stun_servers": ["s.example:3478"],
            "turn_servers": [TurnServer("t.example:3478", "u", "p", "tcp")],
        },
    )
    assert config.connection_strategy == "direct_only"
    assert config.nat_traversal.enabled is False
    assert config.node.max_message_size == 4096
    assert config.stun_servers == ("s.example:3478",)
    assert config.turn_servers == (TurnServer("t.example:3478", "u", "p", "tcp"),)


# --- errors -------------------------------------------------------------------------------


def test_non_integer_millis_names_file_and_key(tmp_path: pathlib.Path) -> None:
    message = file_error(tmp_path, '[nat_traversal]\nhole_punch_timeout = "fast"\n')
    assert message.endswith(
        'nat_traversal.hole_punch_timeout: expected a positive integer (milliseconds), '
        'got "fast"'
    )


def test_unknown_key_suggests_the_closest(tmp_path: pathlib.Path) -> None:
    message = file_error(tmp_path, "[nat_traversal]\nenbled = false\n")
    assert message.endswith(
        'unknown key "nat_traversal.enbled" (did you mean "nat_traversal.enabled"?)'
    )
    message = file_error(tmp_path, "[nat_travesal]\nenabled = false\n")
    assert message.endswith('unknown key "nat_travesal" (did you mean "nat_traversal"?)')
    message = file_error(tmp_path, "zzz = 1\n")
    assert message.endswith('unknown key "zzz"')  # nothing close: no suggestion


def test_unknown_override_and_bad_override_value() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"conection_strategy": "always_relay"})
    assert str(info.value) == (
        'config error in overrides: unknown key "conection_strategy" '
        '(did you mean "connection_strategy"?)'
    )
    with pytest.raises(ConfigError, match=r"in overrides: ice\.check_timeout: expected a "
                                          r"positive integer \(milliseconds\), got -5"):
        load_config(env={}, overrides={"ice.check_timeout": -5})


def test_missing_file_is_named(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"config error in {path}: file not found"
    assert info.value.source == str(path) and info.value.key is None


def test_toml_syntax_error_names_file_and_line(tmp_path: pathlib.Path) -> None:
    message = file_error(tmp_path, '[node]\ngateway = "a:1"\nlisten = \n')
    assert "invalid TOML" in message and "line 3" in message


def test_environment_enum_error_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={"MACULA_CONNECTION_STRATEGY": "sometimes"})
    assert str(info.value) == (
        "config error in environment variable MACULA_CONNECTION_STRATEGY: connection_strategy: "
        'must be one of always_relay, opportunistic, direct_only, got "sometimes"'
    )
    assert info.value.key == "connection_strategy"


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("MACULA_ICE_GATHER_TIMEOUT", "5s", 'expected a non-negative integer (milliseconds), got "5s"'),
        ("MACULA_GATEWAY_MAX_NODES", "-1", "expected an integer from 0 to 100000000, got \"-1\""),
        ("MACULA_NAT_TRAVERSAL_PREFER_DIRECT", "maybe", 'expected a boolean (true/false/1/0/yes/no/on/off), got "maybe"'),
        ("MACULA_STUN_SERVERS", "a.example:3478,,b.example:1", 'stun_servers[1]: bad address "": missing host'),
    ],
)
def test_environment_value_errors(name: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(env={name: value})
    assert str(info.value).startswith(f"config error in environment variable {name}: ")
    assert str(info.value).endswith(expected)


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[ice]\ncheck_timeout = true", "ice.check_timeout: expected a positive integer (milliseconds), got true"),
        ("[ice]\ncheck_timeout = 2.5", "ice.check_timeout: expected a positive integer (milliseconds), got 2.5"),
        # 0 never worked (the checks would time out before they start): refused up front.
        ("[ice]\ncheck_timeout = 0", "ice.check_timeout: expected a positive integer (milliseconds), got 0"),
        ("[nat_traversal]\nhole_punch_timeout = 0", "nat_traversal.hole_punch_timeout: expected a positive integer (milliseconds), got 0"),
        ("[node]\nkeepalive_interval = 0", "node.keepalive_interval: expected a positive integer (milliseconds), got 0"),
        ("[node]\nmax_message_size = 0", "node.max_message_size: expected a positive integer, got 0"),
        ("[nat_traversal]\nenabled = 1", "nat_traversal.enabled: expected a boolean (true or false), got 1"),
        ('[ice]\nenable_trickling = "yes"', 'ice.enable_trickling: expected a boolean (true or false), got "yes"'),
        ('stun_servers = "stun.example:3478"', 'stun_servers: expected a list of "host:port" strings, got "stun.example:3478"'),
        ("stun_servers = [3478]", 'stun_servers[0]: expected a "host:port" string, got 3478'),
        ('connection_strategy = ["always_relay"]', 'connection_strategy: must be one of always_relay, opportunistic, direct_only, got ["always_relay"]'),
        ("[node]\nkey_file = 5", "node.key_file: expected a string, got 5"),
        ("nat_traversal = true", "nat_traversal: expected a table [nat_traversal], got true"),
        ("[node.extra]\na = 1", 'unknown key "node.extra"'),
    ],
)
def test_strict_types_in_file(tmp_path: pathlib.Path, toml: str, expected: str) -> None:
    assert file_error(tmp_path, toml + "\n").endswith(expected)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("gw.example:70000", "port must be 0-65535, got 70000"),
        ("gw.example", "missing port (expected host:port)"),
        (":9443", "missing host"),
        ("::1:9443", "an IPv6 address needs brackets, e.g. [::1]:9443"),
        ("[::1]9443", "expected ':port' after ']'"),
        ("[gw.example]:1", '"gw.example" is not an IPv6 address'),
        ("10.0.0.256:1", '"10.0.0.256" is not a valid IPv4 address'),
        ("gw example:1", '"gw example" is not a valid host name'),
        ("gw.example:-1", 'port must be a number 0-65535, got "-1"'),
    ],
)
def test_bad_host_port_in_file_names_key(tmp_path: pathlib.Path, address: str, reason: str) -> None:
    message = file_error(tmp_path, f'[node]\ngateway = "{address}"\n')
    assert message.endswith(f'node.gateway: bad address "{address}": {reason}')


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[ice]\ncandidate_types = ["local", "mdns"]', 'ice.candidate_types[1]: must be one of local, stun, turn, relay, got "mdns"'),
        ('[ice]\ncandidate_types = ["local", "relay", "local"]', 'ice.candidate_types: "local" is listed twice'),
        ("[ice]\ncandidate_types = []", "ice.candidate_types: must list at least one of local, stun, turn, relay"),
    ],
)
def test_candidate_types_validation(tmp_path: pathlib.Path, toml: str, expected: str) -> None:
    assert file_error(tmp_path, toml + "\n").endswith(expected)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('{server = "t:3478", username = "u", credential = "p", transport = "sctp"}', 'turn_servers[0].transport: must be one of udp, tcp, tls, got "sctp"'),
        ('{username = "u", credential = "p"}', "turn_servers[0].server: required but missing"),
        ('{server = "t:3478", username = "u"}', "turn_servers[0].credential: required but missing"),
        ('{server = "t:3478", username = "", credential = "p"}', "turn_servers[0].username: must not be empty"),
        ('{server = "t", username = "u", credential = "p"}', 'turn_servers[0].server: bad address "t": missing port'),
        ('{server = "t:1", usrname = "u", credential = "p"}', 'unknown key "turn_servers[0].usrname" (did you mean "turn_servers[0].username"?)'),
        ('"t:3478"', 'turn_servers[0]: expected a table {server, username, credential, transport}, got "t:3478"'),
    ],
)
def test_turn_server_table_validation(tmp_path: pathlib.Path, table: str, expected: str) -> None:
    assert expected in file_error(tmp_path, f"turn_servers = [{table}]\n")


# --- host:port ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "default_port", "expected"),
    [
        ("127.0.0.1:9443", None, ("127.0.0.1", 9443)),
        ("gw.example.net:0", None, ("gw.example.net", 0)),
        ("[::1]:9443", None, ("::1", 9443)),
        ("[fe80::1%eth0]:1", None, ("fe80::1%eth0", 1)),
        ("stun.example", 3478, ("stun.example", 3478)),
        ("[2001:db8::1]", 3478, ("2001:db8::1", 3478)),
        ("host:65535", None, ("host", 65535)),
    ],
)
def test_parse_host_port_accepts(text: str, default_port: int | None, expected: tuple) -> None:
    assert parse_host_port(text, default_port=default_port) == expected


def test_parse_host_port_rejects_with_value_error() -> None:
    for text in ("", "host:", "host:65536", "host:9443x", "[::1:9443", "a..b:1"):
        with pytest.raises(ValueError, match=re.escape(json.dumps(text))):
            parse_host_port(text)
    with pytest.raises(ValueError, match='expected a "host:port" string, got 9443'):
        parse_host_port(9443)  # type: ignore[arg-type]


_labels = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=20)
hosts = st.one_of(
    st.lists(_labels, min_size=1, max_size=4).map(".".join).filter(
        lambda h: not re.fullmatch(r"[0-9.]+", h)  # all-numeric names must be real IPv4
    ),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
ports = st.integers(0, 65535)


@given(hosts, ports)
def test_parse_host_port_round_trips(host: str, port: int) -> None:
    assert parse_host_port(format_host_port(host, port)) == (host, port)


# --- directories and paths ----------------------------------------------------------------


def test_default_config_dir_precedence(tmp_path: pathlib.Path) -> None:
    home = str(tmp_path / "home")
    assert default_config_dir(env={"HOME": home}) == tmp_path / "home/.config/macula"
    assert default_config_dir(env={"HOME": home, "XDG_CONFIG_HOME": "/xdg"}) == pathlib.Path("/xdg/macula")
    # A relative XDG_CONFIG_HOME is invalid per the XDG spec and ignored.
    assert default_config_dir(env={"HOME": home, "XDG_CONFIG_HOME": "rel"}) == tmp_path / "home/.config/macula"
    env = {"HOME": home, "XDG_CONFIG_HOME": "/xdg", "MACULA_CONFIG_DIR": "/etc/macula"}
    assert default_config_dir(env=env) == pathlib.Path("/etc/macula")


def test_key_paths_default_into_config_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("MACULA_CONFIG_DIR", str(tmp_path))
    config = load_config(env={"MACULA_GATEWAY_KEY_FILE": "/srv/gw.key"})
    assert config.node.key_path() == tmp_path / "node.key"
    assert config.gateway.key_path() == pathlib.Path("/srv/gw.key")


# --- output: to_dict and dump_toml --------------------------------------------------------


def test_to_dict_is_plain_json() -> None:
    config = Config(stun_servers=("s:1",), turn_servers=(TurnServer("t:1", "u", "p", "tcp"),))
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["turn_servers"] == [{"server": "t:1", "username": "u", "credential": "p", "transport": "tcp"}]
    assert data["ice"]["candidate_types"] == ["local", "stun", "turn", "relay"]
    assert data["nat_traversal"]["hole_punch_timeout"] == 5000


texts = st.text(max_size=30)  # any Unicode, including quotes, backslashes and controls
configs = st.builds(
    Config,
    connection_strategy=st.sampled_from(STRATEGIES),
    stun_servers=st.lists(st.builds(format_host_port, hosts, ports), max_size=3).map(tuple),
    turn_servers=st.lists(
        st.builds(TurnServer, st.builds(format_host_port, hosts, ports), texts.filter(bool),
                  texts, st.sampled_from(TURN_TRANSPORTS)),
        max_size=3,
    ).map(tuple),
    nat_traversal=st.builds(NatTraversal, st.booleans(), st.integers(1, 2**40), st.booleans(),
                            st.booleans()),
    ice=st.builds(Ice, st.integers(0, 10**9), st.integers(1, 10**9),
                  st.permutations(CANDIDATE_TYPES).flatmap(
                      lambda p: st.integers(1, len(p)).map(lambda n: tuple(p[:n]))),
                  st.booleans()),
    node=st.builds(NodeSection, st.builds(format_host_port, hosts, ports),
                   st.builds(format_host_port, hosts, ports), texts, st.integers(1, 10**9),
                   st.integers(1, 2**31),
                   st.lists(st.binary(min_size=16, max_size=16).map(lambda raw: NodeId(raw).text),
                            max_size=3).map(tuple)),
    gateway=st.builds(GatewaySection, st.builds(format_host_port, hosts, ports), texts,
                      st.integers(1, 10**9), st.integers(0, 10**8)),
    metrics=st.builds(MetricsSection, st.one_of(st.just(""), st.builds(format_host_port, hosts, ports))),
)


@settings(max_examples=60, deadline=None)
@given(configs)
def test_dump_toml_round_trips(tmp_path_factory: pytest.TempPathFactory, config: Config) -> None:
    path = tmp_path_factory.mktemp("dump") / "macula.toml"
    path.write_text(dump_toml(config), encoding="utf-8")
    assert load_config(path, env={}) == config


# --- KEYS and docs/CONFIG.md stay in step -------------------------------------------------


def render_key_table() -> str:
    """The table docs/CONFIG.md must contain, verbatim."""
    rows = ["| Key | Type | Default | Phase | Meaning |", "|---|---|---|---|---|"]
    for key in KEYS:
        default = _toml_value(key.default)
        rows.append(f"| `{key.key}` | {key.type} | `{default}` | {key.phase} | {key.meaning} |")
    return "\n".join(rows)


def test_keys_cover_every_config_leaf() -> None:
    assert [k.key for k in KEYS] == list(_flatten(Config()))
    assert {k.key: k.default for k in KEYS} == _flatten(Config())
    phases = {"Phase 1: relay", "Phase 2: hole punching", "Phase 3: STUN/TURN/ICE"}
    assert {k.phase for k in KEYS} <= phases
    assert len({env_var_name(k.key) for k in KEYS}) == len(KEYS)


def test_docs_list_every_key_in_the_generated_table() -> None:
    doc = DOCS.read_text(encoding="utf-8")
    missing = [k.key for k in KEYS if f"`{k.key}`" not in doc]
    assert not missing, f"docs/CONFIG.md does not mention {missing}"
    table = render_key_table()
    assert table in doc, "docs/CONFIG.md key table is stale; regenerate it:\n" + table


def test_docs_example_file_loads(tmp_path: pathlib.Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    assert blocks, "docs/CONFIG.md has no ```toml example"
    config = load_config(write(tmp_path, blocks[0]), env={})
    assert config != Config()  # the example should show something other than the defaults


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[gateway]\nrelay_burst_bytes = 1000",
         "gateway.relay_burst_bytes: expected an integer >= 1452 (one full relay frame), got 1000"),
        ("[gateway]\nrelay_rate_bytes = -1",
         "gateway.relay_rate_bytes: expected a non-negative integer (0 = unlimited), got -1"),
        ("[gateway]\ncontrol_rate = 2.5",
         "gateway.control_rate: expected a non-negative integer (0 = unlimited), got 2.5"),
        ("[gateway]\nrelay_session_max_duration = true",
         "gateway.relay_session_max_duration: expected a non-negative integer (milliseconds), got true"),
        ("[gateway]\nmax_handshakes = 0", "gateway.max_handshakes: expected a positive integer, got 0"),
    ],
)
def test_gateway_limit_keys_are_validated(tmp_path: pathlib.Path, toml: str, expected: str) -> None:
    assert file_error(tmp_path, toml).endswith(expected)


def test_gateway_limits_zero_means_unlimited_and_env_sets_them() -> None:
    env = {"MACULA_GATEWAY_RELAY_RATE_BYTES": "0", "MACULA_GATEWAY_MAX_RELAY_PEERS": "0",
           "MACULA_GATEWAY_PUNCH_RATE": "3", "MACULA_GATEWAY_RELAY_SESSION_MAX_BYTES": "65536"}
    gateway = load_config(env=env).gateway
    assert (gateway.relay_rate_bytes, gateway.max_relay_peers) == (0, 0)
    assert (gateway.punch_rate, gateway.relay_session_max_bytes) == (3, 65536)


def test_hard_nat_keys_load_and_bad_ranges_name_the_key(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, "[nat_traversal]\nhard_nat = true\nhard_nat_rate = 50\n"
                           "hard_nat_sockets = 64\nhard_nat_probes = 500\n")
    nt = load_config(path, env={}).nat_traversal
    assert (nt.hard_nat, nt.hard_nat_rate, nt.hard_nat_sockets, nt.hard_nat_probes) == (
        True, 50, 64, 500)
    message = file_error(tmp_path, "[nat_traversal]\nhard_nat_sockets = 5000\n")
    assert "nat_traversal.hard_nat_sockets" in message and "1 to 1024" in message
    message = file_error(tmp_path, "[nat_traversal]\nhard_nat_rate = 0\n")
    assert "nat_traversal.hard_nat_rate" in message
