"""Private networks: a CA key signs membership certificates, an ACL says who may reach whom.

A membership certificate names one node id, a human name, groups, a validity window and a
serial, signed by the network's CA key (Ed25519). A node carries it inside the X.509
certificate of every QUIC handshake it makes (an extension the peer reads), so the gateway
and the other node check it in the handshake itself. The ACL file allows sessions between
groups or ids; in a CA network two nodes that share no group are kept apart unless a rule
allows it. A revocation list names serials or node ids that no longer count.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .config import ConfigError
from .errors import MaculaError
from .identity import MEMBERSHIP_OID, Identity, NodeId

BEGIN, END = "-----BEGIN MACULA MEMBERSHIP-----", "-----END MACULA MEMBERSHIP-----"
CA_PUBLIC_TAG = "macula-ca"
MAX_GROUPS = 32
_GROUP = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class MembershipError(MaculaError):
    """A membership certificate that does not count; `reason` is a short code for metrics
    (unparsable, wrong_ca, wrong_node, expired, not_yet_valid, revoked, missing)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# ------------------------------------------------------------------ the CA
@dataclass(frozen=True)
class CaPublicKey:
    key: Ed25519PublicKey

    @property
    def ca_id(self) -> str:
        return NodeId.from_public_key(self.key).text

    def line(self) -> str:
        raw = self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"{CA_PUBLIC_TAG} {self.ca_id} {base64.b64encode(raw).decode()}\n"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CaPublicKey:
        """The `ca.pub` written by `macula ca init`: `macula-ca CA_ID BASE64KEY`."""
        source = os.fspath(path)
        parts = _read(path, "CA public key").split()
        try:
            if len(parts) != 3 or parts[0] != CA_PUBLIC_TAG:
                raise ValueError
            ca = cls(Ed25519PublicKey.from_public_bytes(base64.b64decode(parts[2],
                                                                         validate=True)))
        except (ValueError, binascii.Error):
            raise ConfigError(source, f"expected '{CA_PUBLIC_TAG} CA_ID KEY' (macula ca init "
                                      "writes it)") from None
        if ca.ca_id != parts[1]:
            raise ConfigError(source, f"the key hashes to {ca.ca_id}, not {parts[1]}")
        return ca


class CertificateAuthority:
    """The network's signing key (keep it offline; only `macula ca sign` needs it)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.public = CaPublicKey(key.public_key())

    @classmethod
    def init(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        """Make ca.key (0600) and ca.pub in `directory`; refuses to overwrite a CA."""
        folder = Path(directory).expanduser()
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path = folder / "ca.key"
        if key_path.exists():
            raise MaculaError(f"{key_path} exists: a CA is already there (a new one would "
                              "invalidate every membership it signed)")
        identity = Identity.load_or_create(key_path)  # same PEM format and file mode
        ca = cls(identity.private_key)
        (folder / "ca.pub").write_text(ca.public.line())
        return ca

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CertificateAuthority:
        return cls(Identity.load(path).private_key)

    def sign(self, node: NodeId, *, name: str, groups: list[str], days: float,
             now: float | None = None) -> Membership:
        for group in groups:
            if not _GROUP.match(group):
                raise MaculaError(f"group {group!r}: letters, digits, '_', '.', '-' only")
        if not groups or len(groups) > MAX_GROUPS:
            raise MaculaError(f"a membership needs 1 to {MAX_GROUPS} groups")
        if days <= 0:
            raise MaculaError("--days must be > 0")
        issued = int(now if now is not None else time.time())
        body = {"v": 1, "ca": self.public.ca_id, "node": node.text, "name": name[:128],
                "groups": sorted(set(groups)), "serial": secrets.token_hex(8),
                "not_before": issued - 300, "not_after": issued + int(days * 86400)}
        data = _canonical(body)
        return Membership.from_parts(data, self.key.sign(data))


def _read(path: str | os.PathLike[str], what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise ConfigError(os.fspath(path), f"cannot read the {what}: {exc.strerror}") from None


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


# ------------------------------------------------------------------ memberships
@dataclass(frozen=True)
class Membership:
    body: dict[str, Any]
    signed: bytes  # the canonical body the signature covers
    signature: bytes

    @classmethod
    def from_parts(cls, signed: bytes, signature: bytes) -> Membership:
        try:
            body = json.loads(signed)
        except ValueError as exc:
            raise MembershipError("unparsable", f"membership does not parse: {exc}") from None
        if (not isinstance(body, dict) or body.get("v") != 1
                or not all(isinstance(body.get(k), str) for k in ("ca", "node", "serial"))
                or not isinstance(body.get("groups"), list)
                or not all(isinstance(g, str) for g in body["groups"])
                or not all(isinstance(body.get(k), int) for k in ("not_before", "not_after"))):
            raise MembershipError("unparsable", "membership does not parse: fields missing "
                                                "or of the wrong type")
        return cls(body, signed, signature)

    # The wire form (the X.509 extension's value): base64(body) "." base64(signature).
    def encode(self) -> bytes:
        return base64.b64encode(self.signed) + b"." + base64.b64encode(self.signature)

    @classmethod
    def decode(cls, data: bytes) -> Membership:
        try:
            signed, signature = (base64.b64decode(part, validate=True)
                                 for part in data.strip().split(b"."))
        except (ValueError, binascii.Error):
            raise MembershipError("unparsable", "membership does not parse") from None
        return cls.from_parts(signed, signature)

    def pem(self) -> str:
        return f"{BEGIN}\n{self.encode().decode()}\n{END}\n"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Membership:
        source = os.fspath(path)
        inner = _read(path, "membership").replace(BEGIN, "").replace(END, "").strip()
        try:
            return cls.decode(inner.encode())
        except MembershipError as exc:
            raise ConfigError(source, str(exc)) from None

    @property
    def node(self) -> str:
        return str(self.body["node"])

    @property
    def name(self) -> str:
        return str(self.body.get("name", ""))

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(self.body["groups"])

    @property
    def serial(self) -> str:
        return str(self.body["serial"])

    @property
    def not_after(self) -> int:
        return int(self.body["not_after"])

    def check(self, ca: CaPublicKey, node: NodeId, now: float,
              revoked: frozenset[str] = frozenset()) -> None:
        """Raises MembershipError unless this membership is `ca`'s, for `node`, valid at
        `now` (wall clock) and not revoked (by serial or node id)."""
        if self.body["ca"] != ca.ca_id:
            raise MembershipError("wrong_ca", f"membership is signed by CA {self.body['ca']}, "
                                              f"not this network's {ca.ca_id}")
        try:
            ca.key.verify(self.signature, self.signed)
        except InvalidSignature:
            raise MembershipError("wrong_ca", "membership signature does not verify with "
                                              f"CA {ca.ca_id}") from None
        if self.node != node.text:
            raise MembershipError("wrong_node", f"membership names node {self.node}, "
                                                f"not {node}")
        self.check_validity(now, revoked)

    def check_validity(self, now: float, revoked: frozenset[str] = frozenset()) -> None:
        """The part of `check` that changes with time and the revocation list (for
        memberships whose signature and node were checked when presented)."""
        if now < self.body["not_before"]:
            raise MembershipError("not_yet_valid", "membership is not valid yet")
        if now > self.not_after:
            raise MembershipError("expired", "membership expired at " + time.strftime(
                "%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.not_after)))
        if self.serial in revoked or self.node in revoked:
            raise MembershipError("revoked", f"membership {self.serial} of {self.node} "
                                             "is revoked")


def membership_of_certificate(certificate: x509.Certificate | None) -> Membership:
    """The membership a peer's handshake certificate carries (MembershipError if none)."""
    if certificate is None:
        raise MembershipError("missing", "no certificate")
    try:
        extension = certificate.extensions.get_extension_for_oid(MEMBERSHIP_OID)
    except x509.ExtensionNotFound:
        raise MembershipError("missing", "no membership certificate (not a member of this "
                                         "network)") from None
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise MembershipError("unparsable", "membership extension of an unexpected kind")
    return Membership.decode(value.value)


# ------------------------------------------------------------------ ACL and revocation
@dataclass(frozen=True)
class Rule:
    source: str  # "*", "group:NAME" or a node id
    destination: str

    @staticmethod
    def _matches(pattern: str, membership: Membership) -> bool:
        if pattern == "*":
            return True
        if pattern.startswith("group:"):
            return pattern[6:] in membership.groups
        return pattern == membership.node


@dataclass(frozen=True)
class Acl:
    """Who may open sessions to whom. Without a rule, members that share a group may."""

    rules: tuple[Rule, ...] = ()

    def allows(self, source: Membership, destination: Membership) -> bool:
        if source.groups & destination.groups:
            return True
        return any(Rule._matches(r.source, source) and Rule._matches(r.destination, destination)
                   for r in self.rules)

    def connects(self, a: Membership, b: Membership) -> bool:
        """Either may open a session to the other (relay and punches serve both ways)."""
        return self.allows(a, b) or self.allows(b, a)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Acl:
        """Lines `allow SOURCE -> DESTINATION` (`*`, `group:NAME` or a node id); `#`
        comments. An error names the file and line."""
        source = os.fspath(path)
        lines = _read(path, "ACL").splitlines()
        rules = []
        for number, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            match = re.fullmatch(r"allow\s+(\S+)\s*->\s*(\S+)", line)
            if match is None:
                raise ConfigError(f"{source}:{number}", "expected 'allow SOURCE -> DESTINATION' "
                                  f"(SOURCE, DESTINATION: *, group:NAME or a node id), got "
                                  f"{raw.strip()[:80]!r}")
            for pattern in match.groups():
                if pattern == "*" or (pattern.startswith("group:") and _GROUP.match(pattern[6:])):
                    continue
                try:
                    NodeId.parse(pattern)
                except ValueError:
                    raise ConfigError(f"{source}:{number}", f"{pattern[:80]!r} is not *, "
                                      "group:NAME or a node id") from None
            rules.append(Rule(*match.groups()))
        return cls(tuple(rules))


def load_revoked(path: str | os.PathLike[str]) -> frozenset[str]:
    """Serials (16 hex digits) or node ids, one per line, `#` comments."""
    source = os.fspath(path)
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return frozenset()  # nothing revoked yet
    except OSError as exc:
        raise ConfigError(source, f"cannot read the revocation list: {exc.strerror}") from None
    revoked = set()
    for number, raw in enumerate(lines, 1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        if not re.fullmatch(r"[0-9a-f]{16}", entry):
            try:
                entry = NodeId.parse(entry).text
            except ValueError:
                raise ConfigError(f"{source}:{number}", "expected a membership serial (16 hex "
                                  f"digits) or a node id, got {entry[:80]!r}") from None
        revoked.add(entry)
    return frozenset(revoked)


@dataclass(frozen=True)
class NetworkTrust:
    """What a member of a CA network checks a peer against."""

    ca: CaPublicKey
    acl: Acl = Acl()
    revoked: frozenset[str] = frozenset()

    @classmethod
    def load(cls, ca: str | os.PathLike[str], acl: str | os.PathLike[str] | None = None,
             revoked: str | os.PathLike[str] | None = None) -> NetworkTrust:
        """From the CA's public key file and, when given, the ACL and revocation files."""
        return cls(ca=CaPublicKey.load(ca), acl=Acl.load(acl) if acl else Acl(),
                   revoked=load_revoked(revoked) if revoked else frozenset())

    def check(self, presented: bytes | None, node: NodeId, now: float) -> Membership:
        """The membership a handshake presented (the raw extension value, None if there
        was none), checked for `node` at `now`."""
        if presented is None:
            raise MembershipError("missing", "no membership certificate (not a member of "
                                             "this network)")
        membership = Membership.decode(presented)
        membership.check(self.ca, node, now, self.revoked)
        return membership
