"""ICE candidates: the record, RFC 8445 priorities and foundations, RFC 8839 SDP lines.

Candidate kinds. RFC 8445 has four types (host, srflx, prflx, relay). We relay two ways:
through a TURN allocation (a standard `typ relay` candidate) and through our gateway, which
forwards by node id rather than by transport address. A gateway-relay candidate is written
as `typ relay` plus the extension attribute `macula-relay gateway`; RFC 8839 says parsers
ignore extensions they do not know, so a standard ICE agent sees an ordinary relay
candidate (that it will fail to reach, which is harmless) and never mis-parses the line.
`Candidate.kind` folds type and relay flavour into one of: host, srflx, prflx, turn,
gateway. `macula-relay turn` is accepted but never written: TURN is what plain
`typ relay` means. A server-reflexive candidate with `macula-port predicted` was not seen
by any server: a port-preserving NAT will map a fresh socket to it (nat/hard_nat.py).

Type preferences come from the config key ice.candidate_types, most preferred first:
local -> host, stun -> srflx (prflx sits just above it, as RFC 8445 5.1.2.2 requires),
turn -> TURN relay, relay -> gateway relay. Tiers are 30 apart from 120 down, so prflx
(srflx + 6) never reaches the tier above and everything stays within 0..126. Kinds left
out of the list still get a preference (after the listed ones, in the default order),
because peers may offer them and pairs must still sort; the agent refuses to *gather* them.

Parsing is for bytes from strangers: every malformed line raises CandidateError (a
ValueError) and nothing else. Round trips are exact for lines in canonical form (single
spaces, canonical IP text); transport case is kept as written ("UDP" or "udp").
Addresses must be IP literals: FQDN / mDNS (".local") candidates are refused because
every Address in macula is numeric.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from macula.config import CANDIDATE_TYPES
from macula.net.endpoint import Address

from ..errors import InvalidValue

__all__ = [
    "CANDIDATE_TYPES",
    "END_OF_CANDIDATES",
    "ICE_OPTIONS_TRICKLE",
    "KINDS",
    "Candidate",
    "CandidateError",
    "candidate_priority",
    "compute_foundation",
    "generate_pwd",
    "generate_ufrag",
    "ice_options_line",
    "ice_pwd_line",
    "ice_ufrag_line",
    "is_end_of_candidates",
    "parse_ice_options",
    "parse_ice_pwd",
    "parse_ice_ufrag",
    "type_preferences",
]

HOST, SRFLX, PRFLX, RELAY = "host", "srflx", "prflx", "relay"
TYPES = (HOST, SRFLX, PRFLX, RELAY)
KINDS = ("host", "srflx", "prflx", "turn", "gateway")
RELAY_EXTENSION = "macula-relay"
_RELAY_FLAVOURS = ("turn", "gateway")
PORT_EXTENSION = "macula-port"
_PREDICTED = (PORT_EXTENSION, "predicted")

END_OF_CANDIDATES = "a=end-of-candidates"
ICE_OPTIONS_TRICKLE = "a=ice-options:trickle"

MAX_PRIORITY = 2**31 - 1  # RFC 8445 5.1.2: 1 .. 2**31 - 1
MAX_LINE = 1024  # far above any real candidate line; refuses memory games early

# config name -> candidate kinds it covers
_CONFIG_KINDS: dict[str, tuple[str, ...]] = {
    "local": ("host",),
    "stun": ("srflx", "prflx"),
    "turn": ("turn",),
    "relay": ("gateway",),
}
_TIER_TOP, _TIER_STEP, _PRFLX_BONUS = 120, 30, 6

# ASCII-only patterns: str.isdigit() and \d accept other scripts' digits.
_ICE_CHARS = r"[A-Za-z0-9+/]"
_FOUNDATION = re.compile(_ICE_CHARS + r"{1,32}")
_UFRAG = re.compile(_ICE_CHARS + r"{4,256}")
_PWD = re.compile(_ICE_CHARS + r"{22,256}")
_OPTION_TAG = re.compile(_ICE_CHARS + r"+")
_TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_VCHARS = re.compile(r"[\x21-\x7e]+")
_COMPONENT = re.compile(r"[0-9]{1,3}")
_PRIORITY = re.compile(r"[0-9]{1,10}")
_PORT = re.compile(r"[0-9]{1,5}")
_IP_CHARS = re.compile(r"[0-9A-Fa-f:.]{2,45}")


class CandidateError(InvalidValue):
    """A candidate (or ICE SDP attribute line) that is malformed or unusable."""


def type_preferences(order: Sequence[str] = CANDIDATE_TYPES) -> dict[str, int]:
    """Type preference (0..126) per candidate kind, from the config's preference order."""
    names = list(order)
    for name in names:
        if name not in _CONFIG_KINDS:
            raise InvalidValue(f"unknown candidate type {name!r}; expected one of "
                             + ", ".join(CANDIDATE_TYPES))
    if len(set(names)) != len(names):
        raise InvalidValue("candidate types listed twice")
    full = names + [n for n in CANDIDATE_TYPES if n not in names]
    prefs: dict[str, int] = {}
    for tier, name in enumerate(full):
        for kind in _CONFIG_KINDS[name]:
            prefs[kind] = _TIER_TOP - _TIER_STEP * tier
    prefs["prflx"] = prefs["srflx"] + _PRFLX_BONUS
    return prefs


def enabled_kinds(order: Sequence[str] = CANDIDATE_TYPES) -> frozenset[str]:
    """The kinds the config allows us to gather and offer."""
    type_preferences(order)  # validates
    return frozenset(kind for name in order for kind in _CONFIG_KINDS[name])


def candidate_priority(kind: str, *, order: Sequence[str] = CANDIDATE_TYPES,
                       local_preference: int = 65535, component: int = 1) -> int:
    """RFC 8445 5.1.2.1: 2^24 * type pref + 2^8 * local pref + (256 - component id)."""
    if kind not in KINDS:
        raise InvalidValue(f"unknown candidate kind {kind!r}")
    if not 0 <= local_preference <= 65535:
        raise InvalidValue("local preference is 0..65535")
    if not 1 <= component <= 256:
        raise InvalidValue("component id is 1..256")
    return compose_priority(type_preferences(order)[kind], local_preference, component)


def compose_priority(type_preference: int, local_preference: int, component: int) -> int:
    return (type_preference << 24) + (local_preference << 8) + (256 - component)


def local_preference_of(priority: int) -> int:
    return (priority >> 8) & 0xFFFF


def compute_foundation(kind: str, base_ip: str, server_ip: str | None = None,
                       transport: str = "udp") -> str:
    """RFC 8445 5.1.1.3: equal for the same type, base IP, server IP and transport.

    A CRC32 of those, in decimal: stable across runs and processes (unlike hash()),
    short, and made only of ice-chars.
    """
    text = "|".join((kind, base_ip, server_ip or "", transport.lower()))
    return str(zlib.crc32(text.encode()))


def _parse_ip(text: str, what: str) -> str:
    # ipaddress accepts "%scope" suffixes on IPv6; a zone is meaningless to a peer.
    if not _IP_CHARS.fullmatch(text):
        raise CandidateError(f"{what} is not an IP literal: {text[:60]!r}")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise CandidateError(f"{what} is not an IP literal: {text[:60]!r}") from None


def _int(value: object, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CandidateError(f"{what} must be an integer {low}..{high}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Candidate:
    """One ICE candidate. Construct via the factories, `from_sdp`, or directly (validated)."""

    foundation: str
    component: int
    transport: str
    priority: int
    address: str
    port: int
    type: str
    related_address: str | None = None
    related_port: int | None = None
    # Extension attributes in line order, kept verbatim so lines round-trip exactly.
    extensions: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.foundation, str) or not _FOUNDATION.fullmatch(self.foundation):
            raise CandidateError(f"bad foundation {self.foundation!r}")
        _int(self.component, 1, 256, "component id")
        if not isinstance(self.transport, str) or not _TOKEN.fullmatch(self.transport):
            raise CandidateError(f"bad transport {self.transport!r}")
        _int(self.priority, 1, MAX_PRIORITY, "priority")
        if not isinstance(self.address, str):
            raise CandidateError("address must be text")
        object.__setattr__(self, "address", _parse_ip(self.address, "address"))
        _int(self.port, 1, 65535, "port")
        if self.type not in TYPES:
            raise CandidateError(f"unknown candidate type {self.type!r}")
        if self.related_address is not None:
            if not isinstance(self.related_address, str):
                raise CandidateError("related address must be text")
            object.__setattr__(self, "related_address",
                               _parse_ip(self.related_address, "related address"))
        if self.related_port is not None:
            _int(self.related_port, 0, 65535, "related port")
        if not isinstance(self.extensions, tuple):
            raise CandidateError("extensions must be a tuple of (name, value)")
        flavours = 0
        for item in self.extensions:
            if (not isinstance(item, tuple) or len(item) != 2
                    or not isinstance(item[0], str) or not isinstance(item[1], str)):
                raise CandidateError("extensions must be (name, value) pairs of text")
            name, value = item
            if not _TOKEN.fullmatch(name) or name in ("raddr", "rport"):
                raise CandidateError(f"bad extension name {name[:60]!r}")
            if not _VCHARS.fullmatch(value):
                raise CandidateError(f"bad value for extension {name!r}")
            if name == RELAY_EXTENSION:
                flavours += 1
                if self.type != RELAY or value not in _RELAY_FLAVOURS or flavours > 1:
                    raise CandidateError(f"bad {RELAY_EXTENSION} extension")

    # ------------------------------------------------------------------ views
    @property
    def addr(self) -> Address:
        return (self.address, self.port)

    @property
    def family(self) -> int:
        return 6 if ":" in self.address else 4

    @property
    def kind(self) -> str:
        """host, srflx, prflx, turn or gateway."""
        if self.type != RELAY:
            return self.type
        for name, value in self.extensions:
            if name == RELAY_EXTENSION:
                return value
        return "turn"

    @property
    def predicted(self) -> bool:
        """A port a preserving NAT will hand out, not one a server saw (PORT_EXTENSION)."""
        return self.type == SRFLX and _PREDICTED in self.extensions

    @property
    def base(self) -> Address:
        """Where checks from this candidate leave (RFC 8445 5.1.1.1): reflexive
        candidates carry their base in raddr/rport; host and relay are their own base."""
        if (self.type in (SRFLX, PRFLX) and self.related_address is not None
                and self.related_port):
            return (self.related_address, self.related_port)
        return self.addr

    # ------------------------------------------------------------------ factories
    @classmethod
    def host(cls, address: str, port: int, *, order: Sequence[str] = CANDIDATE_TYPES,
             local_preference: int = 65535, component: int = 1) -> Candidate:
        address = _parse_ip(address, "address")
        return cls(compute_foundation("host", address), component, "udp",
                   candidate_priority("host", order=order, local_preference=local_preference,
                                      component=component),
                   address, port, HOST)

    @classmethod
    def server_reflexive(cls, address: str, port: int, *, base: Address,
                         server: str | None = None, order: Sequence[str] = CANDIDATE_TYPES,
                         local_preference: int = 65535, component: int = 1) -> Candidate:
        """`server` is the STUN server's (or gateway's) IP: part of the foundation."""
        base_ip = _parse_ip(base[0], "base address")
        return cls(compute_foundation("srflx", base_ip, server), component, "udp",
                   candidate_priority("srflx", order=order, local_preference=local_preference,
                                      component=component),
                   address, port, SRFLX, base_ip, base[1])

    @classmethod
    def predicted_reflexive(cls, address: str, port: int, *, base: Address,
                            order: Sequence[str] = CANDIDATE_TYPES) -> Candidate:
        """Our public IP and a fresh socket's port, which a port-preserving symmetric NAT
        keeps for that socket's first mapping (nat/hard_nat.py, PREDICT)."""
        found = cls.server_reflexive(address, port, base=base, server="predicted", order=order)
        return replace(found, extensions=(_PREDICTED,))

    @classmethod
    def peer_reflexive(cls, address: str, port: int, *, base: Address, priority: int,
                       foundation: str | None = None, component: int = 1) -> Candidate:
        """Learned from a check (RFC 8445 7.2.5.3.1 / 7.3.1.3); priority comes from it."""
        base_ip = _parse_ip(base[0], "base address")
        return cls(foundation or compute_foundation("prflx", base_ip), component, "udp",
                   priority, address, port, PRFLX, base_ip, base[1])

    @classmethod
    def turn_relay(cls, address: str, port: int, *, server: str,
                   mapped: Address | None = None, order: Sequence[str] = CANDIDATE_TYPES,
                   local_preference: int = 65535, component: int = 1) -> Candidate:
        """A TURN allocation's relayed address; `mapped` (raddr) is the XOR-MAPPED-ADDRESS
        the TURN server reported, as RFC 8839 asks."""
        return cls(compute_foundation("turn", address, server), component, "udp",
                   candidate_priority("turn", order=order, local_preference=local_preference,
                                      component=component),
                   address, port, RELAY,
                   mapped[0] if mapped else None, mapped[1] if mapped else None)

    @classmethod
    def gateway_relay(cls, address: str, port: int, *, order: Sequence[str] = CANDIDATE_TYPES,
                      local_preference: int = 65535, component: int = 1) -> Candidate:
        """The gateway we relay through (its address): never checked, always a fallback."""
        return cls(compute_foundation("gateway", address, address), component, "udp",
                   candidate_priority("gateway", order=order,
                                      local_preference=local_preference, component=component),
                   address, port, RELAY, extensions=((RELAY_EXTENSION, "gateway"),))

    # ------------------------------------------------------------------ SDP
    def to_sdp(self, prefix: bool = True) -> str:
        """The RFC 8839 line: "a=candidate:..." (or "candidate:..." without the prefix, the
        form trickle signalling and WebRTC's RTCIceCandidate.candidate use)."""
        parts = [f"candidate:{self.foundation}", str(self.component), self.transport,
                 str(self.priority), self.address, str(self.port), "typ", self.type]
        if self.related_address is not None:
            parts += ["raddr", self.related_address]
        if self.related_port is not None:
            parts += ["rport", str(self.related_port)]
        for name, value in self.extensions:
            parts += [name, value]
        return ("a=" if prefix else "") + " ".join(parts)

    @classmethod
    def from_sdp(cls, line: str) -> Candidate:
        """Parse "a=candidate:..." or "candidate:..."; CandidateError on anything wrong."""
        text = _strip_line(line)
        if text.startswith("a="):
            text = text[2:]
        if not text.startswith("candidate:"):
            raise CandidateError("not a candidate attribute")
        fields = text[len("candidate:"):].split(" ")
        if len(fields) < 8:
            raise CandidateError("candidate line is too short")
        foundation, component, transport, priority, address, port, typ, ctype = fields[:8]
        if typ != "typ":
            raise CandidateError('expected "typ" before the candidate type')
        for value, pattern, what in ((component, _COMPONENT, "component id"),
                                     (priority, _PRIORITY, "priority"),
                                     (port, _PORT, "port")):
            if not pattern.fullmatch(value):
                raise CandidateError(f"bad {what}: {value[:20]!r}")
        rest = fields[8:]
        if len(rest) % 2:
            raise CandidateError("extension attribute without a value")
        related_address: str | None = None
        related_port: int | None = None
        extensions: list[tuple[str, str]] = []
        i = 0
        # rel-addr then rel-port, each optional, both before any extension (RFC 8839 5.1).
        if i < len(rest) and rest[i] == "raddr":
            related_address = rest[i + 1]
            i += 2
        if i < len(rest) and rest[i] == "rport":
            if not _PORT.fullmatch(rest[i + 1]):
                raise CandidateError("bad rport")
            related_port = int(rest[i + 1])
            i += 2
        while i < len(rest):
            extensions.append((rest[i], rest[i + 1]))
            i += 2
        return cls(foundation, int(component), transport, int(priority), address, int(port),
                   ctype, related_address, related_port, tuple(extensions))

    def __str__(self) -> str:
        return self.to_sdp(prefix=False)


def _strip_line(line: object) -> str:
    if not isinstance(line, str):
        raise CandidateError("an SDP line is text")
    if len(line) > MAX_LINE:
        raise CandidateError("SDP line too long")
    if line.endswith("\r\n"):
        return line[:-2]
    if line.endswith("\n"):
        return line[:-1]
    return line


def _attribute_value(line: object, name: str) -> str:
    text = _strip_line(line)
    if text.startswith("a="):
        text = text[2:]
    if not text.startswith(name + ":"):
        raise CandidateError(f"not an {name} attribute")
    return text[len(name) + 1:]


# ---------------------------------------------------------------------- session attributes
def ice_ufrag_line(ufrag: str) -> str:
    if not isinstance(ufrag, str) or not _UFRAG.fullmatch(ufrag):
        raise CandidateError("ice-ufrag is 4..256 ice-chars")
    return f"a=ice-ufrag:{ufrag}"


def ice_pwd_line(pwd: str) -> str:
    if not isinstance(pwd, str) or not _PWD.fullmatch(pwd):
        raise CandidateError("ice-pwd is 22..256 ice-chars")
    return f"a=ice-pwd:{pwd}"


def ice_options_line(*options: str) -> str:
    if not options or not all(isinstance(o, str) and _OPTION_TAG.fullmatch(o)
                              for o in options):
        raise CandidateError("ice-options are one or more ice-char tags")
    return "a=ice-options:" + " ".join(options)


def parse_ice_ufrag(line: str) -> str:
    value = _attribute_value(line, "ice-ufrag")
    if not _UFRAG.fullmatch(value):
        raise CandidateError("ice-ufrag is 4..256 ice-chars")
    return value


def parse_ice_pwd(line: str) -> str:
    value = _attribute_value(line, "ice-pwd")
    if not _PWD.fullmatch(value):
        raise CandidateError("ice-pwd is 22..256 ice-chars")
    return value


def parse_ice_options(line: str) -> tuple[str, ...]:
    tags = tuple(_attribute_value(line, "ice-options").split(" "))
    if not all(_OPTION_TAG.fullmatch(t) for t in tags):
        raise CandidateError("ice-options are ice-char tags separated by single spaces")
    return tags


def is_end_of_candidates(line: str) -> bool:
    try:
        return _strip_line(line) in (END_OF_CANDIDATES, END_OF_CANDIDATES[2:])
    except CandidateError:
        return False


_ICE_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def generate_ufrag(length: int = 8) -> str:
    """48 random bits by default (RFC 8445 5.3 asks for at least 24)."""
    return "".join(secrets.choice(_ICE_ALPHABET) for _ in range(max(4, length)))


def generate_pwd(length: int = 24) -> str:
    """144 random bits by default (RFC 8445 5.3 asks for at least 128)."""
    return "".join(secrets.choice(_ICE_ALPHABET) for _ in range(max(22, length)))


def unique_foundation(wanted: str, taken: Iterable[str]) -> str:
    """`wanted`, changed just enough to differ from every foundation in `taken`."""
    used = set(taken)
    candidate, n = wanted, 0
    while candidate in used:
        n += 1
        candidate = f"{wanted[:24]}+{n}"
    return candidate
