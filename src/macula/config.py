"""Configuration: one TOML file, MACULA_* environment variables and CLI overrides.

Keys mirror the roadmap's Erlang sys.config so operators can translate old configs line by
line. Precedence, lowest first: built-in defaults < file < MACULA_* environment < overrides
(the CLI's flags). Every value is validated strictly, and every error names the key and the
place the bad value came from, because a config mistake found at startup is cheap and one
found mid-session is not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import ipaddress
import json
import os
import pathlib
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

from .errors import InvalidValue, MaculaError
from .identity import NodeId
from .net.endpoint import format_address, is_numeric_host
from .wire.relay import MAX_PAYLOAD

__all__ = [
    "CANDIDATE_TYPES",
    "KEYS",
    "STRATEGIES",
    "Strategy",
    "TURN_TRANSPORTS",
    "Config",
    "ConfigError",
    "GatewaySection",
    "Ice",
    "KeyDoc",
    "MetricsSection",
    "NatTraversal",
    "NodeSection",
    "TurnServer",
    "default_config_dir",
    "dump_toml",
    "env_var_name",
    "format_host_port",
    "load_config",
    "parse_host_port",
    "resolve_address",
]

# How a node uses paths; the node API takes the same names.
Strategy = Literal["always_relay", "opportunistic", "direct_only"]
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)
CANDIDATE_TYPES = ("local", "stun", "turn", "relay")
TURN_TRANSPORTS = ("udp", "tcp", "tls")

PHASE_LIVE = "Phase 1: relay"
PHASE_PUNCH = "Phase 2: hole punching"
PHASE_ICE = "Phase 3: STUN/TURN/ICE"


class ConfigError(MaculaError):
    """A config value that cannot be used. `source` is the file or environment variable it
    came from, `key` the dotted key (None when the whole file is unusable)."""

    def __init__(self, source: str, detail: str, key: str | None = None) -> None:
        super().__init__(f"config error in {source}: {detail}")
        self.source = source
        self.detail = detail
        self.key = key
        # Every problem found in one pass (a file with three bad keys names all three).
        self.problems: list[ConfigError] = [self]

    @classmethod
    def combined(cls, source: str, problems: list[ConfigError]) -> ConfigError:
        if len(problems) == 1:
            return problems[0]
        error = cls(source, f"{len(problems)} problems: "
                            + "; ".join(p.detail for p in problems), problems[0].key)
        error.problems = problems
        return error


# --- the configuration itself -------------------------------------------------------------
# Plain frozen records: build them with load_config(), which validates; constructing one
# directly (tests, embedding code) skips validation on purpose.


@dataclass(frozen=True)
class TurnServer:
    server: str
    username: str
    credential: str
    transport: str = "udp"


@dataclass(frozen=True)
class NatTraversal:
    enabled: bool = True
    hole_punch_timeout: int = 5000
    prefer_direct: bool = True
    fallback_to_relay: bool = True
    port_mapping: bool = False
    hard_nat: bool = True
    hard_nat_rate: int = 200
    hard_nat_sockets: int = 256
    hard_nat_probes: int = 2000


@dataclass(frozen=True)
class Ice:
    gather_timeout: int = 5000
    check_timeout: int = 10000
    candidate_types: tuple[str, ...] = CANDIDATE_TYPES
    enable_trickling: bool = True


@dataclass(frozen=True)
class NodeSection:
    gateway: str = "127.0.0.1:9443"
    listen: str = "0.0.0.0:0"
    key_file: str = ""
    keepalive_interval: int = 5000
    max_message_size: int = 1048576
    accept_from: tuple[str, ...] = ()
    membership: str = ""
    ca: str = ""
    acl: str = ""
    revoked: str = ""
    gateway_tls: str = ""
    https_proxy: str = ""
    gateways: tuple[str, ...] = ()

    def key_path(self) -> pathlib.Path:
        """The node key file: `key_file`, or <config dir>/node.key when it is empty."""
        return _key_path(self.key_file, "node.key")


@dataclass(frozen=True)
class ClusterSection:
    redis: str = ""
    advertise: str = ""
    drain_timeout: int = 10000


@dataclass(frozen=True)
class GatewaySection:
    listen: str = "0.0.0.0:9443"
    key_file: str = ""
    node_timeout: int = 30000
    max_nodes: int = 0
    # Abuse limits, enforced by macula.gateway.limits (docs/SECURITY.md explains each).
    relay_rate_bytes: int = 4194304
    relay_burst_bytes: int = 8388608
    max_relay_peers: int = 128
    relay_session_max_duration: int = 0
    relay_session_max_bytes: int = 0
    control_rate: int = 50
    punch_rate: int = 10
    max_handshakes: int = 1024
    retry_above: int = 64
    answer_rate: int = 100
    registration_rate: int = 50
    admission: str = "open"
    allowlist: str = ""
    alternate_port: int = 0
    second_ip: str = ""
    turn_secret: str = ""
    turn_servers: tuple[str, ...] = ()
    turn_credential_ttl: int = 86400000
    ca: str = ""
    acl: str = ""
    revoked: str = ""
    tls_listen: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    cluster: ClusterSection = field(default_factory=ClusterSection)

    def key_path(self) -> pathlib.Path:
        """The gateway key file: `key_file`, or <config dir>/gateway.key when it is empty."""
        return _key_path(self.key_file, "gateway.key")


@dataclass(frozen=True)
class MetricsSection:
    listen: str = ""


@dataclass(frozen=True)
class LogSection:
    level: str = "warning"
    format: str = "text"


@dataclass(frozen=True)
class Config:
    connection_strategy: str = "opportunistic"
    # No public servers by default: contacting third parties must be an operator's choice.
    stun_servers: tuple[str, ...] = ()
    turn_servers: tuple[TurnServer, ...] = ()
    nat_traversal: NatTraversal = field(default_factory=NatTraversal)
    ice: Ice = field(default_factory=Ice)
    node: NodeSection = field(default_factory=NodeSection)
    gateway: GatewaySection = field(default_factory=GatewaySection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts and lists, ready for json.dumps."""
        plain: dict[str, Any] = _plain(dataclasses.asdict(self))
        return plain


_SECTIONS: dict[str, type] = {
    "nat_traversal": NatTraversal,
    "ice": Ice,
    "node": NodeSection,
    "gateway": GatewaySection,
    "metrics": MetricsSection,
    "log": LogSection,
}
# Tables inside a section ([gateway.cluster]): their keys are "section.table.key".
_SUBSECTIONS: dict[str, type] = {"gateway.cluster": ClusterSection}


def default_config_dir(*, env: Mapping[str, str] | None = None) -> pathlib.Path:
    """$MACULA_CONFIG_DIR, else $XDG_CONFIG_HOME/macula, else ~/.config/macula."""
    env = os.environ if env is None else env
    if env.get("MACULA_CONFIG_DIR"):
        return pathlib.Path(env["MACULA_CONFIG_DIR"]).expanduser()
    xdg = env.get("XDG_CONFIG_HOME", "")
    # The XDG spec says a relative XDG_CONFIG_HOME is invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return pathlib.Path(xdg) / "macula"
    home = env.get("HOME")
    return (pathlib.Path(home) if home else pathlib.Path.home()) / ".config" / "macula"


def _key_path(key_file: str, default_name: str) -> pathlib.Path:
    if key_file:
        return pathlib.Path(key_file).expanduser()
    return default_config_dir() / default_name


# --- host:port ----------------------------------------------------------------------------

_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")
_PORT = re.compile(r"[0-9]{1,5}")


def parse_host_port(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:9443") into (host, port); host comes back without
    brackets. Without a port, `default_port` is used if given. Raises ValueError."""
    if not isinstance(text, str):
        raise InvalidValue(f'expected a "host:port" string, got {_show(text)}')

    def bad(reason: str) -> ValueError:
        return ValueError(f"bad address {_show(text)}: {reason}")

    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise bad("missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{_show(host)} is not an IPv6 address") from None
        if rest == "":
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise bad("expected ':port' after ']'")
    else:
        if text.count(":") > 1:
            raise bad("an IPv6 address needs brackets, e.g. [::1]:9443")
        host, sep, after = text.partition(":")
        port_text = after if sep else None
        problem = _host_problem(host)
        if problem:
            raise bad(problem)

    if port_text is None:
        if default_port is None:
            raise bad("missing port (expected host:port)")
        port = default_port
    elif _PORT.fullmatch(port_text):
        port = int(port_text)
    else:
        raise bad(f"port must be a number 0-65535, got {_show(port_text)}")
    if not 0 <= port <= 65535:
        raise bad(f"port must be 0-65535, got {port}")
    return host, port


def format_host_port(host: str, port: int) -> str:
    """The inverse of parse_host_port: brackets an IPv6 host."""
    return format_address((host, port))


def _host_problem(host: str) -> str | None:
    if not host:
        return "missing host"
    # All digits and dots can only be meant as IPv4, so "10.0.0.256" is a typo, not a name.
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{_show(host)} is not a valid IPv4 address"
        return None
    labels = host.removesuffix(".").split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return f"{_show(host)} is not a valid host name"
    return None


# --- validation ---------------------------------------------------------------------------


class _Invalid(MaculaError):
    """A value failed validation; the text already starts with the key."""


def _show(value: object) -> str:
    """A value as an operator would write it in TOML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_show(item) for item in value) + "]"
        return text if len(text) <= 80 else text[:76] + " ...]"
    return repr(value)


def _bad(key: str, expected: str, value: object) -> _Invalid:
    return _Invalid(f"{key}: {expected}, got {_show(value)}")


def _unknown(key: str, known: list[str]) -> str:
    text = f"unknown key {_show(key)}"
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    return f"{text} (did you mean {_show(match[0])}?)" if match else text


def _choice(choices: tuple[str, ...]) -> Callable[[str, object], str]:
    def check(key: str, value: object) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise _bad(key, f"must be one of {', '.join(choices)}", value)

    return check


def _check_bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _bad(key, "expected a boolean (true or false)", value)


def _is_int(value: object) -> bool:
    # bool is an int subclass in Python; `enabled = 1` or `timeout = true` are mistakes.
    return isinstance(value, int) and not isinstance(value, bool)


_MS = "expected a non-negative integer (milliseconds)"
_POSITIVE = "expected a positive integer"
_INTERVAL = "expected a positive integer (milliseconds)"


def _check_ms(key: str, value: object) -> int:
    if _is_int(value) and value >= 0:  # type: ignore[operator]
        return value  # type: ignore[return-value]
    raise _bad(key, _MS, value)


def _check_positive(key: str, value: object) -> int:
    if _is_int(value) and value > 0:  # type: ignore[operator]
        return value  # type: ignore[return-value]
    raise _bad(key, _POSITIVE, value)


_UNLIMITED = "expected a non-negative integer (0 = unlimited)"
_BURST = f"expected an integer >= {MAX_PAYLOAD} (one full relay frame)"


def _check_limit(key: str, value: object) -> int:
    if _is_int(value) and value >= 0:  # type: ignore[operator]
        return value  # type: ignore[return-value]
    raise _bad(key, _UNLIMITED, value)


def _check_burst(key: str, value: object) -> int:
    # A bucket smaller than one frame would refuse every full-size relay packet.
    if _is_int(value) and value >= MAX_PAYLOAD:  # type: ignore[operator]
        return value  # type: ignore[return-value]
    raise _bad(key, _BURST, value)


def _check_interval(key: str, value: object) -> int:
    # A zero keepalive would spin and a zero node timeout would expire everyone at once.
    if _is_int(value) and value > 0:  # type: ignore[operator]
        return value  # type: ignore[return-value]
    raise _bad(key, _INTERVAL, value)


def _check_str(key: str, value: object) -> str:
    if isinstance(value, str):
        return value
    raise _bad(key, "expected a string", value)


def _check_host_port(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise _bad(key, 'expected a "host:port" string', value)
    try:
        host, port = parse_host_port(value)
    except ValueError as exc:
        raise _Invalid(f"{key}: {exc}") from None
    return format_host_port(host, port)


def split_gateway(text: str) -> tuple[str | None, str]:
    """"NODE_ID@host:port" -> (NODE_ID, "host:port"); a plain "host:port" has no id."""
    ident, sep, rest = text.partition("@")
    return (ident, rest) if sep else (None, text)


def _check_gateway(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise _bad(key, 'expected a "host:port" or "NODE_ID@host:port" string', value)
    ident, address = split_gateway(value)
    where = _check_host_port(key, address)
    if ident is None:
        return where
    try:
        node_id = NodeId.parse(ident)
    except ValueError as exc:
        raise _Invalid(f"{key}: the gateway id before '@': {exc}") from None
    return f"{node_id.text}@{where}"


def _check_gateway_list(key: str, value: object) -> tuple[str, ...]:
    items = _list_of(key, value, '"host:port" or "NODE_ID@host:port" strings')
    return tuple(_check_gateway(f"{key}[{i}]", item) for i, item in enumerate(items))


def _check_redis_url(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise _bad(key, 'expected a "redis://host:port/db" string or ""', value)
    if value and not value.startswith(("redis://", "rediss://", "unix://",
                                       "redis+sentinel://")):
        raise _bad(key, "expected redis://host:port/db, rediss://, unix:///path, "
                        "redis+sentinel://host:port/service or \"\" (alone)", value)
    return value


def _check_optional_host_port(key: str, value: object) -> str:
    return "" if value == "" else _check_host_port(key, value)


def _check_proxy(key: str, value: object) -> str:
    if value == "":
        return ""
    if not isinstance(value, str):
        raise _bad(key, 'expected "http://[user:password@]host:port" or ""', value)
    from .net.wslink import ProxySpec  # the one parser the dialer uses too

    try:
        ProxySpec.parse(value)
    except ValueError as exc:
        raise _Invalid(f"{key}: {exc}") from None
    return value


def _list_of(key: str, value: object, what: str) -> list[object]:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise _bad(key, f"expected a list of {what}", value)


def _check_server_list(key: str, value: object) -> tuple[str, ...]:
    items = _list_of(key, value, '"host:port" strings')
    return tuple(_check_host_port(f"{key}[{i}]", item) for i, item in enumerate(items))


def _check_optional_ip(key: str, value: object) -> str:
    if value == "":
        return ""
    if not isinstance(value, str):
        raise _bad(key, 'expected an IP address string or ""', value)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _bad(key, 'expected an IP address or ""', value) from None


def _check_node_ids(key: str, value: object) -> tuple[str, ...]:
    items = _list_of(key, value, "node ids")
    checked = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise _bad(f"{key}[{i}]", "expected a node id string", item)
        try:
            checked.append(NodeId.parse(item).text)
        except ValueError as exc:
            raise _Invalid(f"{key}[{i}]: {exc}") from None
    return tuple(checked)


def _check_candidates(key: str, value: object) -> tuple[str, ...]:
    items = _list_of(key, value, "candidate types")
    if not items:
        raise _Invalid(f"{key}: must list at least one of {', '.join(CANDIDATE_TYPES)}")
    seen: list[str] = []
    for i, item in enumerate(items):
        name = _choice(CANDIDATE_TYPES)(f"{key}[{i}]", item)
        if name in seen:
            raise _Invalid(f"{key}: {_show(name)} is listed twice")
        seen.append(name)
    return tuple(seen)


_TURN_FIELDS = [f.name for f in dataclasses.fields(TurnServer)]


def _check_turn(key: str, item: object) -> TurnServer:
    if isinstance(item, TurnServer):
        item = dataclasses.asdict(item)
    if not isinstance(item, Mapping):
        raise _bad(key, "expected a table {server, username, credential, transport}", item)
    for name in item:
        if name not in _TURN_FIELDS:
            raise _Invalid(_unknown(f"{key}.{name}", [f"{key}.{f}" for f in _TURN_FIELDS]))
    for name in ("server", "username", "credential"):
        if name not in item:
            raise _Invalid(f"{key}.{name}: required but missing")
    username = _check_str(f"{key}.username", item["username"])
    if not username:
        raise _Invalid(f"{key}.username: must not be empty")
    return TurnServer(
        server=_check_host_port(f"{key}.server", item["server"]),
        username=username,
        credential=_check_str(f"{key}.credential", item["credential"]),
        transport=_choice(TURN_TRANSPORTS)(f"{key}.transport", item.get("transport", "udp")),
    )


def _check_turn_list(key: str, value: object) -> tuple[TurnServer, ...]:
    items = _list_of(key, value, "TURN server tables")
    return tuple(_check_turn(f"{key}[{i}]", item) for i, item in enumerate(items))


# --- environment text -> value ------------------------------------------------------------

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _text(key: str, text: str) -> str:
    return text


def _bool_text(key: str, text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise _bad(key, "expected a boolean (true/false/1/0/yes/no/on/off)", text)


def _int_text(expected: str) -> Callable[[str, str], int]:
    def parse(key: str, text: str) -> int:
        # Not int(): it also takes "+5", "5_000" and non-ASCII digits.
        if re.fullmatch(r"[0-9]+", text.strip()):
            return int(text.strip())
        raise _bad(key, expected, text)

    return parse


def _csv_text(key: str, text: str) -> list[str]:
    return [item.strip() for item in text.split(",")] if text.strip() else []


def _turn_text(key: str, text: str) -> list[dict[str, str]]:
    """`user:credential@host:port[/tcp|/tls]`, comma-separated (so no commas in credentials)."""
    entries = []
    for i, entry in enumerate(_csv_text(key, text)):
        creds, at, address = entry.rpartition("@")
        username, colon, credential = creds.partition(":")
        if not at or not colon:
            raise _bad(f"{key}[{i}]", "expected user:credential@host:port[/tcp or /tls]", entry)
        server, slash, transport = address.partition("/")
        entries.append(
            {
                "server": server,
                "username": username,
                "credential": credential,
                "transport": transport if slash else "udp",
            }
        )
    return entries


# --- the key table ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Kind:
    doc: str  # the type, as KEYS and docs/CONFIG.md describe it
    check: Callable[[str, object], object]
    parse: Callable[[str, str], object]  # environment / override text -> value to check


def _in_range(lo: int, hi: int, unit: str = "") -> _Kind:
    expected = f"expected an integer from {lo} to {hi}{unit}"

    def check(key: str, value: object) -> int:
        if _is_int(value) and lo <= value <= hi:  # type: ignore[operator]
            return value  # type: ignore[return-value]
        raise _bad(key, expected, value)

    return _Kind(f"integer {lo}..{hi}{unit}", check, _int_text(expected))


_STRATEGY = _Kind("one of " + ", ".join(STRATEGIES), _choice(STRATEGIES), _text)
_BOOL = _Kind("boolean", _check_bool, _bool_text)
_MILLIS = _Kind("integer >= 0, milliseconds", _check_ms, _int_text(_MS))
_INTERVAL_MS = _Kind("integer > 0, milliseconds", _check_interval, _int_text(_INTERVAL))
_COUNT = _Kind("integer > 0", _check_positive, _int_text(_POSITIVE))
_BYTES = _Kind("integer > 0, bytes", _check_positive, _int_text(_POSITIVE))
_LIMIT = _Kind("integer >= 0, 0 = unlimited", _check_limit, _int_text(_UNLIMITED))
_LIMIT_BYTES = _Kind("integer >= 0, bytes, 0 = unlimited", _check_limit, _int_text(_UNLIMITED))
_LIMIT_BYTE_RATE = _Kind("integer >= 0, bytes per second, 0 = unlimited", _check_limit,
                         _int_text(_UNLIMITED))
_LIMIT_MS = _Kind("integer >= 0, milliseconds, 0 = unlimited", _check_ms, _int_text(_MS))
_LIMIT_RATE = _Kind("integer >= 0, per second, 0 = unlimited", _check_limit,
                    _int_text(_UNLIMITED))
_BURST_BYTES = _Kind(f"integer >= {MAX_PAYLOAD}, bytes", _check_burst, _int_text(_BURST))
_HOST_PORT = _Kind('"host:port"', _check_host_port, _text)
_ADMISSION = _Kind("open, allowlist or ca", _choice(("open", "allowlist", "ca")), _text)
_PATH = _Kind("path, or empty", _check_str, _text)
_GATEWAY = _Kind('"host:port" or "NODE_ID@host:port"', _check_gateway, _text)
_OPT_HOST_PORT = _Kind('"host:port" or "" (off)', _check_optional_host_port, _text)
_PROXY = _Kind('"http://[user:password@]host:port" or ""', _check_proxy, _text)
_PATH = _Kind('path, "" = default', _check_str, _text)
_SERVERS = _Kind('list of "host:port"', _check_server_list, _csv_text)
_GATEWAYS = _Kind('list of "host:port" or "NODE_ID@host:port"', _check_gateway_list,
                  _csv_text)
_REDIS_URL = _Kind('"redis://host:port/db", "redis+sentinel://..." or "" (alone)',
                   _check_redis_url, _text)
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
_OPT_IP = _Kind('IP address, or "" (none)', _check_optional_ip, _text)
_SECRET = _Kind('text, "" = off', _check_str, _text)
_LOG_LEVEL = _Kind("one of " + ", ".join(LOG_LEVELS), _choice(LOG_LEVELS), _text)
_LOG_FORMAT = _Kind("text or json", _choice(LOG_FORMATS), _text)
_NODE_IDS = _Kind("list of node ids, empty = any", _check_node_ids, _csv_text)
_CANDIDATES = _Kind("list of " + ", ".join(CANDIDATE_TYPES), _check_candidates, _csv_text)
_TURNS = _Kind(
    "list of tables {server, username, credential, transport = udp, tcp or tls}",
    _check_turn_list,
    _turn_text,
)

# (dotted key, kind, one-line meaning, phase that gives it behaviour), in file order:
# top-level keys first, then each section's keys together (dump_toml relies on it).
_SPECS: tuple[tuple[str, _Kind, str, str], ...] = (
    ("connection_strategy", _STRATEGY,
     "always_relay: never go direct; opportunistic: relay first, upgrade to direct when "
     "a path works; direct_only: never relay", PHASE_LIVE),
    ("stun_servers", _SERVERS, "STUN servers used to learn this node's public address",
     PHASE_ICE),
    ("turn_servers", _TURNS, "TURN servers offered as relay candidates", PHASE_ICE),
    ("nat_traversal.enabled", _BOOL, "try hole punching to get a direct path at all",
     PHASE_PUNCH),
    ("nat_traversal.hole_punch_timeout", _INTERVAL_MS,
     "give up on one hole-punch attempt after this long", PHASE_PUNCH),
    ("nat_traversal.prefer_direct", _BOOL,
     "move a session to the direct path once one works", PHASE_PUNCH),
    ("nat_traversal.fallback_to_relay", _BOOL,
     "keep or return to the relay when the direct path fails", PHASE_PUNCH),
    ("nat_traversal.port_mapping", _BOOL,
     "ask the router for a mapping (PCP, NAT-PMP, UPnP-IGD) and offer it as a candidate; "
     "off by default because it talks to the default router", PHASE_PUNCH),
    ("nat_traversal.hard_nat", _BOOL,
     "guess ports against hard (symmetric) NATs: port prediction and birthday probing, "
     "only when the NAT pair calls for it (a symmetric NAT against a port-restricted one); "
     "on by default: without it those pairs stay relayed; false turns it off", PHASE_PUNCH),
    ("nat_traversal.hard_nat_rate", _in_range(1, 10_000, ", packets per second"),
     "guesses per second from the port-restricted side after its opening burst (the first "
     "512 at up to four times this); the symmetric side sends its one packet per socket "
     "at up to four times this", PHASE_PUNCH),
    ("nat_traversal.hard_nat_sockets", _in_range(1, 1024),
     "extra sockets the node behind the symmetric NAT opens to guess with", PHASE_PUNCH),
    ("nat_traversal.hard_nat_probes", _in_range(1, 60_000),
     "most guesses the node behind the port-restricted NAT sends per attempt", PHASE_PUNCH),
    ("ice.gather_timeout", _MILLIS, "how long a punch attempt waits for candidates still "
     "being gathered (TURN allocations) before telling the peer it has them all", PHASE_ICE),
    ("ice.check_timeout", _INTERVAL_MS, "give up on an attempt's connectivity checks after "
     "this long, or after hole_punch_timeout if that is shorter", PHASE_ICE),
    ("ice.candidate_types", _CANDIDATES,
     "candidate types to use, most preferred first; no duplicates", PHASE_ICE),
    ("ice.enable_trickling", _BOOL,
     "send candidates found after the punch order as they come; false: all at once when "
     "gathering ends", PHASE_ICE),
    ("node.gateway", _GATEWAY, "the gateway this node joins; with its id (NODE_ID@host:port, "
     "as `macula gateway` prints it) the node refuses any other key there, without one it "
     "trusts the first key it sees and remembers it beside the node key", PHASE_LIVE),
    ("node.listen", _HOST_PORT, "the node's one local UDP socket (port 0 = any; "
     "\"[::]:0\" is dual-stack: IPv6 and IPv4 on one socket)", PHASE_LIVE),
    ("node.key_file", _PATH,
     'node identity key file; "" = node.key in the config directory', PHASE_LIVE),
    ("node.keepalive_interval", _INTERVAL_MS,
     "send a keepalive when the gateway link is idle this long (shorter on a network "
     "whose NAT was measured to forget idle state sooner: half the time it survived)",
     PHASE_LIVE),
    ("node.max_message_size", _BYTES,
     "largest message; larger ones are refused naming this limit", PHASE_LIVE),
    ("node.accept_from", _NODE_IDS, "accept sessions only from these node ids; a session "
     "from any other node is closed at its handshake with the reason \"not accepted\", "
     "before any of its data is acknowledged", PHASE_LIVE),
    ("node.membership", _PATH, "CA network: this node's membership certificate (from `macula "
     "ca sign`), shown in every handshake", PHASE_LIVE),
    ("node.ca", _PATH, "CA network: the CA's public key file; sessions with peers without a "
     "valid membership signed by it are refused", PHASE_LIVE),
    ("node.acl", _PATH, "CA network: the ACL file (same format as gateway.acl) this node "
     "applies to sessions it is offered", PHASE_LIVE),
    ("node.revoked", _PATH, "CA network: revocation list this node applies to its peers",
     PHASE_LIVE),
    ("node.gateway_tls", _OPT_HOST_PORT, "the gateway's TLS (WebSocket) port: a node not "
     "registered over UDP within 300 ms plus the gateway RTT, or whose UDP stops, carries "
     "its gateway traffic there and moves back when UDP answers again; \"\" = UDP only",
     PHASE_LIVE),
    ("node.https_proxy", _PROXY, "HTTP CONNECT proxy for the TLS link (basic auth from the "
     "URL); \"\" = the HTTPS_PROXY environment variable, unless NO_PROXY names the "
     "gateway host", PHASE_LIVE),
    ("node.gateways", _GATEWAYS, "gateways of one cluster to home on, in place of "
     "node.gateway: the node registers at the one answering first (lowest RTT), checks it "
     "every 2 s, and moves to the next within 3 s when it stops answering or drains",
     PHASE_LIVE),
    ("gateway.listen", _HOST_PORT, "the gateway's UDP socket", PHASE_LIVE),
    ("gateway.key_file", _PATH,
     'gateway identity key file; "" = gateway.key in the config directory', PHASE_LIVE),
    ("gateway.node_timeout", _INTERVAL_MS,
     "a node silent this long is expired from the registry", PHASE_LIVE),
    ("gateway.max_nodes", _in_range(0, 100_000_000),
     "refuse new nodes beyond this many (error \"max_nodes\"); 0 = derived from this "
     "machine's memory: half of it at 40 kB per registered node (measured RSS), at most "
     "1,000,000",
     PHASE_LIVE),
    ("gateway.relay_rate_bytes", _LIMIT_BYTE_RATE,
     "relayed payload bytes per second per node (token bucket); excess is dropped and the "
     'node gets error "relay_rate"', PHASE_LIVE),
    ("gateway.relay_burst_bytes", _BURST_BYTES,
     "the relay token bucket's size: bytes a node may relay at once after a quiet spell",
     PHASE_LIVE),
    ("gateway.max_relay_peers", _LIMIT,
     "distinct nodes one node may relay to at once (a peer counts for 30 s after its last "
     'relayed packet); error "max_relay_peers"', PHASE_LIVE),
    ("gateway.relay_session_max_duration", _LIMIT_MS,
     "cap on one relayed session (sender to destination) from its first packet; error "
     '"relay_session_max_duration"', PHASE_LIVE),
    ("gateway.relay_session_max_bytes", _LIMIT_BYTES,
     'cap on the payload one relayed session carries; error "relay_session_max_bytes"',
     PHASE_LIVE),
    ("gateway.control_rate", _LIMIT_RATE,
     "control messages per second per node (burst: 4 s worth); excess is dropped with "
     'error "control_rate"', PHASE_LIVE),
    ("gateway.punch_rate", _LIMIT_RATE,
     "hole-punch requests per second per node (burst: 4 s worth); excess is refused with "
     'error "punch_rate"', PHASE_PUNCH),
    ("gateway.max_handshakes", _COUNT,
     "QUIC connections not yet registered; beyond it the oldest is dropped (bounds memory "
     "under a flood of spoofed Initials)", PHASE_LIVE),
    ("gateway.retry_above", _LIMIT,
     "once this many handshakes are half-open, new ones must first answer a QUIC Retry "
     "(address validation: a spoofed flood costs a small Retry, not a handshake); 0 = always",
     PHASE_LIVE),
    ("gateway.answer_rate", _LIMIT_RATE,
     "answers (STUN, QUIC Retry) to packets from unproven sources, per source IP per second "
     "(burst: 4 s worth): nobody can aim more than this at an address through the gateway",
     PHASE_LIVE),
    ("gateway.registration_rate", _LIMIT_RATE,
     "registrations per source IP per second (its /24 or /64: 4x), burst 4 s worth; a node "
     'over it hears error "registration_rate" and retries', PHASE_LIVE),
    ("gateway.admission", _ADMISSION,
     'who may register: "open" (anyone) or "allowlist" (the node ids in gateway.allowlist)',
     PHASE_LIVE),
    ("gateway.allowlist", _PATH,
     "file of admitted node ids, one per line; re-read on SIGHUP and when it changes",
     PHASE_LIVE),
    ("gateway.alternate_port", _in_range(0, 65535),
     "the STUN responder's second port on the gateway's IP; 0 = the listen port + 1 (RFC "
     "5780 mapping tests and nodes' NAT discovery use it)", PHASE_PUNCH),
    ("gateway.second_ip", _OPT_IP,
     "a second IP of this host: STUN is answered on both ports there too and OTHER-ADDRESS "
     "names it, so RFC 5780 filtering tests can run", PHASE_PUNCH),
    ("gateway.turn_secret", _SECRET,
     "secret shared with coturn's use-auth-secret (static-auth-secret): registered nodes get "
     "time-limited TURN credentials for gateway.turn_servers from the gateway, so node "
     "configs hold no TURN password", PHASE_ICE),
    ("gateway.turn_servers", _SERVERS,
     "TURN servers (UDP) whose credentials the gateway hands out with turn_secret",
     PHASE_ICE),
    ("gateway.turn_credential_ttl", _INTERVAL_MS,
     "lifetime of handed-out TURN credentials; nodes get fresh ones at half of it",
     PHASE_ICE),
    ("gateway.ca", _PATH, 'admission "ca": the network CA\'s public key file (ca.pub from '
     "`macula ca init`); nodes register only with a valid membership signed by it",
     PHASE_LIVE),
    ("gateway.acl", _PATH, "CA network ACL file: lines `allow SOURCE -> DESTINATION` (*, "
     "group:NAME or a node id); without a rule only members sharing a group reach each "
     "other; the gateway coordinates, forwards and relays nothing between others",
     PHASE_LIVE),
    ("gateway.revoked", _PATH, "CA network revocation list (membership serials or node ids); "
     "re-read when it changes, holders are disconnected within a minute", PHASE_LIVE),
    ("gateway.tls_listen", _OPT_HOST_PORT, "TCP address of the TLS (WebSocket on /macula) "
     "path for nodes whose network drops UDP, 443 in production; \"\" = off", PHASE_LIVE),
    ("gateway.tls_cert", _PATH, "PEM certificate (chain) for tls_listen; \"\" = a "
     "self-signed one made at start (nodes pinning the gateway id need no other)",
     PHASE_LIVE),
    ("gateway.tls_key", _PATH, "PEM private key for tls_cert", PHASE_LIVE),
    ("gateway.cluster.redis", _REDIS_URL, "the cluster's directory: gateways sharing this "
     "Redis share their nodes (any node reaches any other through its home gateway, relay "
     "frames one hop gateway to gateway); \"\" = this gateway alone, in memory",
     PHASE_LIVE),
    ("gateway.cluster.advertise", _OPT_HOST_PORT, "where the other members reach this "
     "gateway's UDP socket (mesh links and relay frames); \"\" = gateway.listen, which must "
     "then not be a wildcard address", PHASE_LIVE),
    ("gateway.cluster.drain_timeout", _INTERVAL_MS, "on SIGTERM or `macula gateway drain`, "
     "wait at most this long for the nodes to move to another member before exiting",
     PHASE_LIVE),
    ("metrics.listen", _OPT_HOST_PORT,
     'serve Prometheus /metrics and JSON /status on HOST:PORT; "" = off', PHASE_LIVE),
    ("log.level", _LOG_LEVEL, "the least important log lines shown: debug (includes aioquic's "
     "internals), info (one line per registration, NAT type, session and path change), "
     "warning, error", PHASE_LIVE),
    ("log.format", _LOG_FORMAT, "text lines, or one JSON object per line", PHASE_LIVE),
)


class KeyDoc(NamedTuple):
    """One documented key: docs/CONFIG.md's table is generated from these."""

    key: str
    type: str
    default: object
    meaning: str
    phase: str


def _flatten(config: Config) -> dict[str, object]:
    flat: dict[str, object] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in _SECTIONS:
            for sub in dataclasses.fields(value):
                sub_value = getattr(value, sub.name)
                if f"{f.name}.{sub.name}" in _SUBSECTIONS:
                    for leaf in dataclasses.fields(sub_value):
                        flat[f"{f.name}.{sub.name}.{leaf.name}"] = getattr(sub_value, leaf.name)
                else:
                    flat[f"{f.name}.{sub.name}"] = sub_value
        else:
            flat[f.name] = value
    return flat


_DEFAULTS = _flatten(Config())
KEYS: tuple[KeyDoc, ...] = tuple(
    KeyDoc(key, kind.doc, _DEFAULTS[key], meaning, phase) for key, kind, meaning, phase in _SPECS
)
_KINDS: dict[str, _Kind] = {key: kind for key, kind, _, _ in _SPECS}
_KNOWN_NAMES = list(_KINDS) + list(_SECTIONS) + list(_SUBSECTIONS)


def env_var_name(key: str) -> str:
    """"nat_traversal.hole_punch_timeout" -> "MACULA_NAT_TRAVERSAL_HOLE_PUNCH_TIMEOUT"."""
    return "MACULA_" + key.upper().replace(".", "_")


# Matching whole names against the known keys is what keeps "_" unambiguous.
_ENV_KEYS = {env_var_name(key): key for key in _KINDS}
assert len(_ENV_KEYS) == len(_KINDS), "two config keys map to one environment variable"


# --- loading ------------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    flags: Mapping[str, str] | None = None,
) -> Config:
    """Defaults, then the TOML file at `path` (if given), then MACULA_* variables from `env`
    (default os.environ), then `overrides` ({"dotted.key": value}; None values are skipped
    so a CLI can pass every flag, and strings are parsed like environment text; `flags`
    maps a key to the flag that set it, so an error names the flag)."""
    values = dict(_DEFAULTS)
    if path is not None:
        values.update(_from_file(path))
    values.update(_from_env(os.environ if env is None else env))
    if overrides:
        values.update(_from_overrides(overrides, flags))
    if values["gateway.admission"] == "ca" and not values["gateway.ca"]:
        raise ConfigError(os.fsdecode(path) if path is not None else "configuration",
                          'gateway.admission = "ca" needs gateway.ca (the CA\'s public key '
                          "file, ca.pub from `macula ca init`)", "gateway.ca")
    if bool(values["gateway.tls_cert"]) != bool(values["gateway.tls_key"]):
        key = "gateway.tls_key" if values["gateway.tls_cert"] else "gateway.tls_cert"
        raise ConfigError(os.fsdecode(path) if path is not None else "configuration",
                          "gateway.tls_cert and gateway.tls_key go together: set both, or "
                          "neither for a self-signed certificate", key)
    if values["gateway.admission"] == "allowlist" and not values["gateway.allowlist"]:
        raise ConfigError(os.fsdecode(path) if path is not None else "configuration",
                          'gateway.admission = "allowlist" needs gateway.allowlist (the file '
                          "of admitted node ids)", "gateway.allowlist")
    return _build(values)


def _from_file(path: str | os.PathLike[str]) -> dict[str, object]:
    source = os.fsdecode(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(source, "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message ends with "(at line N, column M)".
        raise ConfigError(source, f"invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, f"not UTF-8 text (byte {exc.start})") from None
    except (ValueError, RecursionError) as exc:
        # Integers past Python's digit limit, or arrays nested past the recursion limit.
        raise ConfigError(source, f"invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(source, f"cannot read: {exc.strerror or exc}") from None

    values: dict[str, object] = {}
    problems: list[ConfigError] = []
    for name, value in data.items():
        try:
            if name in _SECTIONS:
                if not isinstance(value, dict):
                    detail = str(_bad(name, f"expected a table [{name}]", value))
                    raise ConfigError(source, detail, key=name)
                for sub, sub_value in value.items():
                    table = f"{name}.{sub}"
                    if table in _SUBSECTIONS and not isinstance(sub_value, dict):
                        problems.append(ConfigError(source, str(_bad(
                            table, f"expected a table [{table}]", sub_value)), key=table))
                        continue
                    items = (sub_value.items() if table in _SUBSECTIONS
                             else [(None, sub_value)])
                    for leaf, leaf_value in items:
                        try:
                            _accept(values, table if leaf is None else f"{table}.{leaf}",
                                    leaf_value, source)
                        except ConfigError as exc:
                            problems.append(exc)
            else:
                _accept(values, name, value, source)
        except ConfigError as exc:
            problems.append(exc)
    if problems:
        raise ConfigError.combined(source, problems)
    return values


def _accept(values: dict[str, object], key: str, value: object, source: str) -> None:
    kind = _KINDS.get(key)
    if kind is None:
        raise ConfigError(source, _unknown(key, _KNOWN_NAMES), key=key)
    try:
        values[key] = kind.check(key, value)
    except _Invalid as exc:
        raise ConfigError(source, str(exc), key=key) from None


def _from_env(env: Mapping[str, str]) -> dict[str, object]:
    values: dict[str, object] = {}
    problems: list[ConfigError] = []
    for name, key in _ENV_KEYS.items():
        if name in env:
            source = f"environment variable {name}"
            try:
                try:
                    parsed = _KINDS[key].parse(key, env[name])
                except _Invalid as exc:
                    raise ConfigError(source, str(exc), key=key) from None
                _accept(values, key, parsed, source)
            except ConfigError as exc:
                problems.append(exc)
    if len(problems) > 1:
        raise ConfigError.combined("the environment", [
            ConfigError(p.source, f"{p.source.removeprefix('environment variable ')}: "
                                  f"{p.detail}", p.key) for p in problems])
    if problems:
        raise problems[0]
    return values


def _from_overrides(overrides: Mapping[str, object],
                    flags: Mapping[str, str] | None = None) -> dict[str, object]:
    """`flags` names the command-line flag each key came from, for the error message."""
    values: dict[str, object] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        source = f"flag {flags[key]}" if flags and key in flags else "overrides"
        kind = _KINDS.get(key)
        if kind is None:
            raise ConfigError(source, _unknown(key, _KNOWN_NAMES), key=key)
        if isinstance(value, str):
            try:
                value = kind.parse(key, value)
            except _Invalid as exc:
                raise ConfigError(source, str(exc), key=key) from None
        _accept(values, key, value, source)
    return values


def _build(values: Mapping[str, object]) -> Config:
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    tables: dict[str, dict[str, Any]] = {name: {} for name in _SUBSECTIONS}
    for key, value in values.items():
        section, dot, leaf = key.partition(".")
        table, _, table_leaf = key.rpartition(".")
        if table in tables:
            tables[table][table_leaf] = value
        elif dot:
            sections[section][leaf] = value
        else:
            top[key] = value
    for table, cls in _SUBSECTIONS.items():
        section, _, leaf = table.partition(".")
        sections[section][leaf] = cls(**tables[table])
    return Config(**top, **{name: cls(**sections[name]) for name, cls in _SECTIONS.items()})


# --- output -------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:  # TOML forbids raw control characters
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, TurnServer):
        pairs = (f"{f.name} = {_toml_string(getattr(value, f.name))}"
                 for f in dataclasses.fields(value))
        return "{ " + ", ".join(pairs) + " }"
    if isinstance(value, (list, tuple)):
        if any(isinstance(item, TurnServer) for item in value):
            return "[\n" + "".join(f"    {_toml_value(item)},\n" for item in value) + "]"
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise InvalidValue(f"no TOML form for {value!r}")


def dump_toml(config: Config) -> str:
    """A commented TOML file that load_config reads back to an equal Config."""
    flat = _flatten(config)
    lines = ["# macula configuration; every key is described in docs/CONFIG.md."]
    current = ""
    for doc in KEYS:
        section, _, leaf = doc.key.rpartition(".")
        if section != current:
            lines += ["", f"[{section}]"]
            current = section
        lines.append(f"# {doc.meaning}")
        lines.append(f"{leaf} = {_toml_value(flat[doc.key])}")
    return "\n".join(lines) + "\n"


# --- resolution ---------------------------------------------------------------------------
async def resolve_address(address: tuple[str, int], key: str) -> tuple[str, int]:
    """A numeric address for `address` (host names resolved; IPv4 preferred); a name
    that does not resolve is a ConfigError naming `key`."""
    host, port = address
    if is_numeric_host(host):
        return address
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise ConfigError("configuration", f"{key}: cannot resolve {host!r}: {exc}",
                          key) from None
    # Prefer IPv4: the node's socket is IPv4 unless it listens on an IPv6 address.
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0]), int(infos[0][4][1])

