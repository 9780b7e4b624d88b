"""Node identity: an Ed25519 key per node; the node id is a hash of its public key.

Every QUIC connection (node to gateway, node to node) presents a self-signed certificate
carrying this key, and the other end pins it against the node id it expects. Nobody needs
a certificate authority: the id *is* the key's fingerprint.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import NameOID

from .errors import InvalidValue, MaculaError

# 16 bytes of SHA-256: 128 bits is plenty against collisions among nodes, and keeps relay
# frame headers small. Text form is 26 chars of lowercase base32.
NODE_ID_BYTES = 16
_TEXT_LEN = 26


class IdentityError(MaculaError):
    """A key file that cannot be used, or a node id that cannot be parsed."""


class InvalidNodeId(IdentityError, InvalidValue):
    """Text that is not a node id. Also a ValueError: code that refuses bad input by
    catching ValueError (the control protocol handlers) counts it instead of crashing."""


@dataclass(frozen=True, slots=True)
class NodeId:
    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != NODE_ID_BYTES:
            raise IdentityError(f"node id must be {NODE_ID_BYTES} bytes, got {len(self.raw)}")

    @classmethod
    def from_public_key(cls, public_key: Ed25519PublicKey) -> NodeId:
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(hashlib.sha256(raw).digest()[:NODE_ID_BYTES])

    @classmethod
    def parse(cls, text: str) -> NodeId:
        t = text.strip().lower()
        shown = repr(text[:64]) + ("..." if len(text) > 64 else "")  # never echo a flood
        if len(t) != _TEXT_LEN:
            raise InvalidNodeId(f"not a node id: {shown} (expected {_TEXT_LEN} base32 characters)")
        try:
            raw = base64.b32decode(t.upper() + "======")
        except (ValueError, base64.binascii.Error) as exc:  # type: ignore[attr-defined]
            raise InvalidNodeId(f"not a node id: {shown} ({exc})") from None
        node_id = cls(raw)
        if node_id.text != t:  # non-canonical trailing bits
            raise InvalidNodeId(f"not a node id: {shown} (non-canonical encoding)")
        return node_id

    @property
    def text(self) -> str:
        return base64.b32encode(self.raw).decode("ascii").rstrip("=").lower()

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"NodeId({self.text})"


# The X.509 extension carrying a CA network's membership certificate (macula.membership).
# Under the 2.25 arc (OIDs derived from a UUID, X.667): no registration needed.
MEMBERSHIP_OID = x509.ObjectIdentifier("2.25.146484930906473526361203512012873905531")


class Identity:
    """A node's (or gateway's) private key, its node id and a certificate for QUIC."""

    def __init__(self, private_key: Ed25519PrivateKey, membership: bytes | None = None) -> None:
        """`membership`: a CA network's membership certificate (macula.membership), carried
        in every handshake's certificate for the peer to check."""
        self.private_key = private_key
        self.public_key = private_key.public_key()
        self.node_id = NodeId.from_public_key(self.public_key)
        self.membership = membership
        self.certificate = _self_signed_certificate(private_key, self.node_id, membership)

    def with_membership(self, membership: bytes) -> Identity:
        """The same key, presenting `membership` in its handshakes."""
        return Identity(self.private_key, membership)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the key at `path`, creating it (mode 0600, parents 0700) on first run."""
        p = Path(path).expanduser()
        if p.exists():
            return cls.load(p)
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # O_EXCL: two processes starting at once must not both write a key.
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return cls.load(p)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return cls(key)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        p = Path(path).expanduser()
        try:
            mode = p.stat().st_mode
            data = p.read_bytes()
        except OSError as exc:
            raise IdentityError(f"cannot read key file {p}: {exc.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"key file {p} is accessible by others (mode {stat.S_IMODE(mode):04o}); "
                f"run: chmod 600 {p}"
            )
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"key file {p} does not hold a usable private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"key file {p} holds a {type(key).__name__}, expected Ed25519")
        return cls(key)


def node_id_of_certificate(certificate: x509.Certificate) -> NodeId:
    """The node id a peer's certificate proves (its key signed the TLS handshake)."""
    key = certificate.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError(f"peer certificate key is {type(key).__name__}, expected Ed25519")
    return NodeId.from_public_key(key)


def _self_signed_certificate(key: Ed25519PrivateKey, node_id: NodeId,
                             membership: bytes | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id.text)])
    now = datetime.datetime.now(datetime.UTC)
    builder = x509.CertificateBuilder()
    if membership is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(MEMBERSHIP_OID, membership), critical=False)
    return (
        builder
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Validity is irrelevant (peers pin the key, not a chain); keep clocks-skew-proof.
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, None)
    )
