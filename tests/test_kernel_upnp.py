"""The `symmetric_upnp` kernel preset: a symmetric NAT whose router runs miniupnpd.

Pure checks always run. The kernel part (root, network namespaces, miniupnpd-nftables)
maps the host's socket with each of PCP, NAT-PMP and UPnP-IGD through our PortMapper
(`python -m macula.nat.portmap` inside the host namespace), shows that a server socket the
host never talked to reaches it through the mapped port, and that the deletion on close
shuts that door again; a plain `symmetric` peer lets no such datagram in.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from macula_lab.kernel import (
    PRESETS,
    KernelLab,
    cleanup_leftovers,
    kernel_lab_available,
    miniupnpd,
    netns,
    probes,
)
from macula_lab.kernel.nat_rules import PORTMAP_PRESETS, nat_chain

AVAILABLE, REASON = kernel_lab_available()
MINIUPNPD_OK, MINIUPNPD_REASON = miniupnpd.miniupnpd_available()

kernel = pytest.mark.kernel
needs_lab = pytest.mark.skipif(not AVAILABLE, reason=REASON or "kernel lab unavailable")
needs_miniupnpd = pytest.mark.skipif(not MINIUPNPD_OK, reason=MINIUPNPD_REASON)

# Sends from a fresh socket on the server's second IP, then waits for the host's echo.
UNSOLICITED = """
import json, socket, sys
target = (sys.argv[1], int(sys.argv[2]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("203.0.113.20", 0))
s.settimeout(float(sys.argv[3]))
got = None
for attempt in range(3):
    s.sendto(b"unsolicited-%d" % attempt, target)
    try:
        data, src = s.recvfrom(2048)
    except OSError:
        continue
    got = {"data": data.decode(), "from": "%s:%d" % src}
    break
print(json.dumps({"echo": got, "sender": "%s:%d" % s.getsockname()}))
"""


# --- pure ------------------------------------------------------------------------------------


def test_preset_is_outside_the_matrices() -> None:
    assert "symmetric_upnp" in PORTMAP_PRESETS and "symmetric_upnp" not in PRESETS
    assert nat_chain("symmetric_upnp") == ("symmetric",)
    with pytest.raises(ValueError, match="symmetric_upnp"):
        nat_chain("upnp")


def test_router_rules_and_config() -> None:
    rules = miniupnpd.router_rules(wan_ip="198.51.100.11", stun_ips=("203.0.113.10", "203.0.113.20"))
    assert 'insert rule ip natlab snat_out oifname "wan" ip saddr 198.51.100.11 accept' in rules
    assert "ip saddr { 203.0.113.10, 203.0.113.20 } udp sport { 34780, 34781 } accept" in rules
    assert "table inet miniupnpd {" in rules and "policy accept; jump forward_miniupnpd;" in rules
    conf = miniupnpd.config(lan_net="192.168.1.0/24", stun=("203.0.113.10", 34780),
                            uuid_text="00000000-0000-4000-8000-000000000000")
    lines = conf.splitlines()
    for line in ("ext_ifname=wan", "listening_ip=lan", "enable_upnp=yes", "enable_natpmp=yes",
                 "ext_perform_stun=yes", "ext_stun_host=203.0.113.10", "ext_stun_port=34780",
                 "upnp_nat_chain=prerouting_miniupnpd", "secure_mode=yes"):
        assert line in lines
    assert lines[-2:] == ["allow 1024-65535 192.168.1.0/24 1024-65535",
                          "deny 0-65535 0.0.0.0/0 0-65535"]
    assert miniupnpd.stun_binds(("203.0.113.10", "203.0.113.20")) == [
        ("203.0.113.10", 34780), ("203.0.113.10", 34781),
        ("203.0.113.20", 34780), ("203.0.113.20", 34781)]


def test_miniupnpd_missing_is_a_clear_reason(tmp_path: Any) -> None:
    ok, reason = miniupnpd.miniupnpd_available(str(tmp_path / "miniupnpd"))
    assert not ok and "apt-get install miniupnpd-nftables" in reason


# --- kernel ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab() -> Iterator[KernelLab]:
    if not AVAILABLE:
        pytest.skip(REASON)
    if not MINIUPNPD_OK:
        pytest.skip(MINIUPNPD_REASON)
    cleanup_leftovers("mlab")
    with KernelLab() as kl:
        yield kl
    mine = f"mlab{os.getpid()}-"
    assert [n for n in netns.list_ns() if n.startswith(mine)] == []


@pytest.fixture(scope="module")
def upnp_peer(lab: KernelLab) -> Iterator[Any]:
    peer = lab.add_peer("symmetric_upnp")
    daemon = peer.igd
    assert daemon is not None and daemon.proc.poll() is None
    yield peer
    lab.remove_peer(peer)
    assert peer.igd is None and daemon.proc.poll() is not None  # stopped and reaped
    assert not daemon.workdir.exists()


class _Lines:
    """JSON lines of a child's stdout through a reader thread, so waits can time out
    (select() on a buffered pipe misses lines Python has already read ahead)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.queue.put(line)
        self.queue.put("")

    def event(self, name: str, timeout: float = 15.0) -> dict[str, Any]:
        """The next line with this event, skipping others (bounded by `timeout`)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if not line:
                break
            obj: dict[str, Any] = json.loads(line)
            if obj.get("event") == name:
                return obj
        raise AssertionError(f"no {name!r} event from the mapper tool")


def _unsolicited(lab: KernelLab, target: str, wait: float) -> dict[str, Any]:
    ip, _, port = target.rpartition(":")
    out = lab.run(lab.server_ns, [sys.executable, "-c", UNSOLICITED, ip, port, str(wait)],
                  timeout=30.0).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def _dnat_rules(lab: KernelLab, peer: Any) -> str:
    return lab.run(peer.nat_ns[0], ["nft", "list", "chain", "inet", "miniupnpd",
                                    "prerouting_miniupnpd"]).stdout


@kernel
@needs_lab
@needs_miniupnpd
@pytest.mark.parametrize("protocols, protocol", [
    ("pcp", "pcp"), ("natpmp", "natpmp"), ("upnp", "upnp"),
    ("pcp,natpmp,upnp", "pcp"),  # the default order stops at the first that maps
])
def test_mapping_lets_unsolicited_traffic_in(lab: KernelLab, upnp_peer: Any, protocols: str,
                                             protocol: str) -> None:
    tool = lab.popen_python(upnp_peer.host_ns, "macula.nat.portmap", "--protocols", protocols,
                            "--max-seconds", "60", "--parent-pid", str(os.getpid()),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = _Lines(tool)
    try:
        found = lines.event("discovered")
        local_port = int(found["local"].rpartition(":")[2])
        mapping = found["mapping"]
        assert mapping is not None, found
        assert found["answered"] == [protocol] and found["errors"] == []
        assert found["gateway"] == f"192.168.{upnp_peer.index}.1"
        assert mapping["protocol"] == protocol
        assert mapping["internal"] == f"{upnp_peer.host_ip}:{local_port}"
        ext_ip, _, ext_port = mapping["external"].rpartition(":")
        assert ext_ip == upnp_peer.public_ip
        assert f"dnat ip to {upnp_peer.host_ip}:{local_port}" in _dnat_rules(lab, upnp_peer)

        # A server socket the host never sent to gets in through the mapped port, and the
        # host's answer leaves through the same mapping.
        sent = _unsolicited(lab, mapping["external"], wait=1.0)
        assert sent["echo"] is not None, sent
        assert sent["echo"]["from"] == mapping["external"]
        got = lines.event("received")
        assert got["from"] == sent["sender"] and got["data"].startswith("unsolicited-")

        # close() deletes the mapping on the router: the door shuts again.
        assert tool.stdin is not None
        tool.stdin.write("close\n")
        tool.stdin.flush()
        lines.event("closed")
        assert f"dport {ext_port} " not in _dnat_rules(lab, upnp_peer)
        assert _unsolicited(lab, mapping["external"], wait=0.3)["echo"] is None
        tool.stdin.write("quit\n")
        tool.stdin.flush()
        assert tool.wait(timeout=15) == 0
    finally:
        if tool.poll() is None:
            tool.kill()
            tool.wait(timeout=5)


@kernel
@needs_lab
@needs_miniupnpd
def test_unmapped_traffic_stays_symmetric(lab: KernelLab, upnp_peer: Any) -> None:
    """Without a mapping both presets filter: only the server socket we sent to answers."""
    plain = lab.add_peer("symmetric")
    try:
        with probes.ProbeServer(lab, ports=(3478, 3479)) as server:
            mapping, inbound = probes.EXPECTED_BEHAVIOR["symmetric"]
            for peer in (plain, upnp_peer):
                result = probes.probe_nat(lab, peer.host_ns, server)
                assert (result["mapping_behavior"], result["inbound"]) == (mapping, inbound), result
    finally:
        lab.remove_peer(plain)
