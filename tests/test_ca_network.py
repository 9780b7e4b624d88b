"""A private network on a CA: membership certificates in the handshake, group ACLs at the
gateway and the receiving node, revocation. Loopback gateway and nodes; the CA made with
the `macula ca` command."""

import asyncio
import subprocess
import sys
import time

import pytest
from helpers import Mesh, wait_until

from macula import ConfigError, Identity, NotAdmitted, NotAllowed, SessionClosedError
from macula.membership import CertificateAuthority, Membership, membership_of_certificate

MACULA = [sys.executable, "-m", "macula.cli"]


@pytest.fixture
def ca(tmp_path):
    out = subprocess.run([*MACULA, "ca", "init", "--dir", str(tmp_path / "ca")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "ca.pub" in out.stdout
    return tmp_path / "ca"


def sign(ca, tmp_path, identity, groups, days=1.0):
    out_file = tmp_path / f"{identity.node_id}.membership"
    out = subprocess.run([*MACULA, "ca", "sign", identity.node_id.text, "--groups", groups,
                          "--days", str(days), "--dir", str(ca), "--out", str(out_file),
                          "--name", f"node in {groups}"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return str(out_file)


async def member(mesh, ca, tmp_path, groups, **options):
    identity = Identity.generate()
    return await mesh.node(identity, membership=sign(ca, tmp_path, identity, groups),
                           ca=str(ca / "ca.pub"), **options)


async def say(dialer, acceptor, text: bytes):
    """A session from `dialer` to `acceptor` that carried `text`: (ours, theirs)."""
    session = await dialer.connect(acceptor.node_id, timeout=5)
    incoming = await acceptor.accept(timeout=5)
    session.send(text)
    assert await incoming.recv(5) == text
    return session, incoming


async def test_members_meet_strangers_stay_out_and_groups_stay_apart(ca, tmp_path):
    mesh = Mesh()
    await mesh.start_gateway(admission="ca", ca=str(ca / "ca.pub"))
    try:
        with pytest.raises(NotAdmitted, match="no membership"):
            await mesh.node()  # no membership at all
        assert mesh.gateway.core.dropped["membership_missing"] == 1
        ops1 = await member(mesh, ca, tmp_path, "ops")
        ops2 = await member(mesh, ca, tmp_path, "ops,backup")
        lab1 = await member(mesh, ca, tmp_path, "lab")
        # The membership rides in the handshake certificate.
        assert membership_of_certificate(ops1.core.identity.certificate).groups == {"ops"}
        # Same group: a session, and it goes direct.
        session, _ = await say(ops1, ops2, b"hello ops")
        await wait_until(lambda: session.connection_type == "direct", 5)
        # Different groups, no rule: the dialer hears why at once, nothing is relayed.
        started = asyncio.get_running_loop().time()
        with pytest.raises(NotAllowed, match="ACL does not let"):
            await ops1.connect(lab1.node_id, timeout=5)
        assert asyncio.get_running_loop().time() - started < 2
        assert mesh.gateway.core.dropped["acl_denied"] >= 1
        assert lab1._accepted.empty()
    finally:
        await mesh.close()


async def test_an_acl_rule_opens_one_direction_and_the_receiver_enforces_it(ca, tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("# ops may reach lab, not the other way\nallow group:ops -> group:lab\n")
    mesh = Mesh()
    await mesh.start_gateway(admission="ca", ca=str(ca / "ca.pub"), acl=str(acl))
    try:
        ops1 = await member(mesh, ca, tmp_path, "ops", acl=str(acl))
        lab1 = await member(mesh, ca, tmp_path, "lab", acl=str(acl))
        session, _ = await say(ops1, lab1, b"ops -> lab")
        await session.close()
        await wait_until(lambda: lab1.session(ops1.node_id) is None, 5)
        # lab -> ops: the gateway relays (the pair may talk), but ops refuses the session.
        back = await lab1.connect(ops1.node_id, timeout=5)
        back.send(b"lab -> ops")
        with pytest.raises(SessionClosedError, match="ACL does not let"):
            await back.drain(0)
        assert ops1.core.dropped["acl_denied"] == 1
    finally:
        await mesh.close()


async def test_revocation_disconnects_a_member_and_ends_its_sessions(ca, tmp_path):
    revoked = tmp_path / "revoked"
    revoked.write_text("")
    mesh = Mesh()
    await mesh.start_gateway(admission="ca", ca=str(ca / "ca.pub"), revoked=str(revoked))
    try:
        ops1 = await member(mesh, ca, tmp_path, "ops")
        ops2 = await member(mesh, ca, tmp_path, "ops")
        session = await ops1.connect(ops2.node_id, timeout=5)
        await ops2.accept(timeout=5)
        session.send(b"before")
        await session.drain(0)
        serial = Membership.load(ops2.options.membership).serial
        revoked.write_text(f"{serial}  # laptop lost\n")
        started = time.monotonic()
        # The gateway re-reads the list within its 5 s housekeeping: ops2 is gone from
        # the registry, and ops1's session with it ends (the gateway tells every member).
        await wait_until(lambda: mesh.gateway.core.registry.get(ops2.node_id.raw) is None, 15)
        await wait_until(lambda: session.closed.is_set(), 15)
        assert time.monotonic() - started < 60
        assert "revoked" in session.close_reason
        assert mesh.gateway.core.dropped["membership_revoked"] >= 1
        refused = await ops2.wait_refused()
        assert isinstance(refused, NotAdmitted) and "revoked" in str(refused)
    finally:
        await mesh.close()


async def test_memberships_that_cannot_count_are_refused_with_one_clear_line(ca, tmp_path):
    other_ca = CertificateAuthority.init(tmp_path / "other")
    mesh = Mesh()
    await mesh.start_gateway(admission="ca", ca=str(ca / "ca.pub"))
    try:
        me = Identity.generate()
        # Expired: refused at the node before it registers.
        expired = tmp_path / "expired.membership"
        expired.write_text(CertificateAuthority.load(ca / "ca.key").sign(
            me.node_id, name="old", groups=["ops"], days=1, now=time.time() - 3 * 86400).pem())
        with pytest.raises(ConfigError, match="expired"):
            await mesh.node(me, membership=str(expired), ca=str(ca / "ca.pub"))
        # Another node's membership.
        with pytest.raises(ConfigError, match="names node"):
            await mesh.node(Identity.generate(), membership=sign(ca, tmp_path, me, "ops"))
        # Another CA's: the node does not know this network's CA, the gateway refuses it
        # and counts why.
        foreign = tmp_path / "foreign.membership"
        foreign.write_text(other_ca.sign(me.node_id, name="x", groups=["ops"], days=1).pem())
        with pytest.raises(NotAdmitted, match="signed by CA"):
            await mesh.node(me, membership=str(foreign))
        assert mesh.gateway.core.dropped["membership_wrong_ca"] == 1
        # Garbage.
        garbage = tmp_path / "garbage.membership"
        garbage.write_text("-----BEGIN MACULA MEMBERSHIP-----\nnot base64!\n")
        with pytest.raises(ConfigError, match="does not parse"):
            await mesh.node(me, membership=str(garbage))
    finally:
        await mesh.close()


async def test_an_acl_with_an_error_stops_the_start_and_a_bad_reload_keeps_the_rules(
        ca, tmp_path):
    acl = tmp_path / "acl"
    acl.write_text("allow group:ops -> group:lab\npermit everything\n")
    mesh = Mesh()
    with pytest.raises(ConfigError, match=rf"{acl}:2: expected 'allow SOURCE -> DESTINATION'"):
        await mesh.start_gateway(admission="ca", ca=str(ca / "ca.pub"), acl=str(acl))
    acl.write_text("allow group:ops -> group:lab\n")
    await mesh.start_gateway(admission="ca", ca=str(ca / "ca.pub"), acl=str(acl))
    try:
        acl.write_text("allow group:ops -> nobody-here\n")
        mesh.gateway.reload()
        assert [r.destination for r in mesh.gateway.core.trust.acl.rules] == ["group:lab"]
    finally:
        await mesh.close()
