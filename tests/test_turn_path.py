"""The "turn" path end to end: two nodes, a gateway and a real coturn on loopback."""

import asyncio

import pytest
from helpers import Mesh, wait_until

from macula.node.turn_relays import TurnServerSpec
from macula_lab.coturn import Coturn, coturn_available

ok, why = coturn_available()
pytestmark = pytest.mark.skipif(not ok, reason=why)

# Both nodes are "open" on loopback, so direct would always win: put TURN candidates
# first in the preference order to make ICE select the TURN pair.
PREFER_TURN = ("turn", "local", "stun", "relay")


@pytest.fixture(scope="module")
def coturn():
    with Coturn(users={"macula": "s3cret"}) as server:
        yield server


async def test_session_moves_onto_turn_and_loses_nothing(coturn):
    spec = TurnServerSpec(coturn.address, "macula", "s3cret")
    mesh = Mesh()
    await mesh.start_gateway()
    try:
        a = await mesh.node(turn_servers=[spec], candidate_types=PREFER_TURN)
        b = await mesh.node(turn_servers=[spec], candidate_types=PREFER_TURN)
        await wait_until(lambda: a.core.turn.candidates() and b.core.turn.candidates(), 5)
        sa = await a.connect(b.node_id)
        sb = await b.accept(timeout=5)
        for i in range(200):
            sa.send(b"%d" % i)
            sb.send(b"%d" % i)
            await asyncio.sleep(0.002)
        got_b = [await sb.recv(5) for _ in range(200)]
        got_a = [await sa.recv(5) for _ in range(200)]
        assert got_b == got_a == [b"%d" % i for i in range(200)]
        await wait_until(lambda: sa.connection_type == "turn", 5)
        stats = sa.stats()
        assert stats["bytes_by_path"]["turn"]["sent"] > 0
        relays = a.core.turn.stats()
        assert relays[0]["state"] == "allocated" and relays[0]["bytes_to_relay"] > 0
    finally:
        await mesh.close()


async def test_bad_turn_credentials_leave_the_session_on_its_other_paths(coturn):
    spec = TurnServerSpec(coturn.address, "macula", "wrong")
    mesh = Mesh()
    await mesh.start_gateway()
    try:
        a = await mesh.node(turn_servers=[spec])
        b = await mesh.node()
        await wait_until(lambda: a.core.turn.errors, 5)
        assert any("credentials" in e or "401" in e for e in a.core.turn.errors)
        sa = await a.connect(b.node_id)
        sb = await b.accept(timeout=5)
        sa.send(b"still works")
        assert await sb.recv(5) == b"still works"
    finally:
        await mesh.close()


async def test_configured_stun_server_is_queried_and_reported(coturn):
    from macula.metrics import NodeCollector, registry_for, render

    mesh = Mesh()
    await mesh.start_gateway()
    try:
        a = await mesh.node(stun_servers=[coturn.address])
        await wait_until(lambda: a.core.stun_reflexive is not None, 5)
        # On loopback the STUN server sees what the gateway sees: no extra candidate.
        assert a.core.stun_reflexive[0] == a.local_address
        assert a.core._candidates_gateway_lacks() == []
        text = render(registry_for(NodeCollector(a.core)))
        server = f"{coturn.address[0]}:{coturn.address[1]}"
        assert f'macula_node_stun_success_ratio{{server="{server}"}} 1.0' in text
        assert "macula_node_stun_servers_unreachable 0.0" in text
    finally:
        await mesh.close()


@pytest.fixture(scope="module")
def coturn_rest():
    """coturn in TURN REST API mode: no users, credentials derived from a shared secret."""
    with Coturn(auth_secret="shared-with-the-gateway") as server:
        yield server


async def test_a_node_with_no_turn_config_allocates_with_credentials_from_the_gateway(
        coturn_rest):
    mesh = Mesh()
    await mesh.start_gateway(turn_secret="shared-with-the-gateway",
                             turn_servers=(coturn_rest.address,), turn_credential_ttl=2.0)
    try:
        a = await mesh.node(candidate_types=PREFER_TURN)  # no turn_servers, no password
        b = await mesh.node(candidate_types=PREFER_TURN)
        assert a.options.turn_servers == ()
        await wait_until(lambda: a.core.turn.candidates() and b.core.turn.candidates(), 5)
        relays = a.core.turn.stats()
        assert relays[0]["state"] == "allocated"
        username = a.core.turn._clients[0].username
        expiry, _, who = username.partition(":")
        assert who == a.node_id.text and int(expiry) > 0
        sa = await a.connect(b.node_id)
        sb = await b.accept(timeout=5)
        for i in range(100):
            sa.send(b"over TURN with handed-out credentials %d" % i)
            await asyncio.sleep(0.002)
        got = [await sb.recv(5) for _ in range(100)]
        assert got == [b"over TURN with handed-out credentials %d" % i for i in range(100)]
        await wait_until(lambda: sa.connection_type == "turn", 5)
        # Renewed at half the 2 s lifetime: fresh credentials wait for the next Allocate
        # (the live allocation keeps its own, RFC 8656 441), and the session carries on.
        await wait_until(lambda: a.core.turn_credentials_received >= 2
                         and b.core.turn_credentials_received >= 2, 5)
        client = a.core.turn._clients[0]
        assert client.username == username and client._next_credentials[0] != username
        assert a.core.turn.stats()[0]["state"] == "allocated"
        sa.send(b"after the renewal")
        assert await sb.recv(5) == b"after the renewal"
        assert mesh.gateway.core.turn_credentials_issued >= 4
    finally:
        await mesh.close()


async def test_credentials_from_a_gateway_with_the_wrong_secret_are_refused(coturn_rest):
    mesh = Mesh()
    await mesh.start_gateway(turn_secret="not-the-secret", turn_servers=(coturn_rest.address,))
    try:
        a = await mesh.node()
        await wait_until(lambda: a.core.turn.errors, 5)
        assert not a.core.turn.candidates()
    finally:
        await mesh.close()


@pytest.fixture(scope="module")
def coturn_tls():
    from macula_lab.coturn import _free_port

    with Coturn(users={"macula": "s3cret"}, tls_port=_free_port("127.0.0.1")) as server:
        yield server


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_turn_over_tcp_and_tls_carries_the_session(coturn_tls, transport):
    """Issue 13: entries with transport tcp or tls allocate over that connection and their
    relayed candidates join ICE like UDP ones (coturn with a TLS listener, self-signed)."""
    port = coturn_tls.tls_port if transport == "tls" else coturn_tls.port
    spec = TurnServerSpec(("127.0.0.1", port), "macula", "s3cret", transport)
    mesh = Mesh()
    await mesh.start_gateway()
    try:
        a = await mesh.node(turn_servers=[spec], candidate_types=PREFER_TURN)
        b = await mesh.node(turn_servers=[spec], candidate_types=PREFER_TURN)
        await wait_until(lambda: a.core.turn.candidates() and b.core.turn.candidates(), 5)
        assert a.core.turn.stats()[0]["transport"] == transport
        sa = await a.connect(b.node_id)
        sb = await b.accept(timeout=5)
        for i in range(100):
            sa.send(b"%d" % i)
            await asyncio.sleep(0.002)
        assert [await sb.recv(5) for _ in range(100)] == [b"%d" % i for i in range(100)]
        await wait_until(lambda: sa.connection_type == "turn", 5)
        assert sa.stats()["transport"] == transport
        assert a.core.turn.stats()[0]["bytes_to_relay"] > 0
        # The connection under the allocation ends: so does the allocation, and the
        # session moves to another path instead of waiting out TURN's 39.5 s timeout.
        streams = a._turn_streams
        assert streams is not None
        for conn in list(streams._conns.values()):
            conn.writer.close()
        await wait_until(lambda: a.core.turn.stats()[0]["state"] == "failed", 5)
        sa.send(b"after")
        assert await sb.recv(5) == b"after"
        await wait_until(lambda: sa.connection_type != "turn", 10)
    finally:
        await mesh.close()
