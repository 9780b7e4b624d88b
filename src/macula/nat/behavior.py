"""NAT behaviour discovery (RFC 5780): how does our NAT map and filter?

`BehaviorProbe` is the sans-IO state machine: it is fed datagrams and time and hands back
datagrams to send and the time it next wants to be woken, like aioquic's QuicConnection.
`detect_nat_behavior` drives it over a DatagramEndpoint on the event loop's clock, so the
same code runs on real sockets and in the virtual-time simulator.

Test order matters. The filtering tests (responses the server sends from its other
address/port) must finish before the mapping tests send anything to the server's second
IP, or that outbound traffic would open the very filter being measured.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Literal

from macula.net.endpoint import Address
from macula.wire.stun import (
    DEFAULT_SOFTWARE,
    Class,
    Message,
    StunError,
    binding_request,
    is_stun,
    mapped_address,
    parse_message,
)

from ..errors import InvalidValue

Behavior = Literal[
    "endpoint_independent", "address_dependent", "address_and_port_dependent", "unknown"
]
NatType = Literal[
    "open", "full_cone", "restricted_cone", "port_restricted", "symmetric", "udp_blocked", "unknown"
]
PortAllocation = Literal["preserving", "sequential", "random", "unknown"]

# Ports no further apart than this across consecutive new mappings count as sequential;
# other hosts behind the same NAT may take a few ports in between.
SEQUENTIAL_WINDOW = 16


@dataclass(frozen=True)
class NatBehavior:
    """What the probe learned. "unknown" means the test could not be run or did not answer."""

    nat_type: NatType
    mapping: Behavior
    filtering: Behavior
    public_address: Address | None
    hairpinning: bool | None  # None: not tested (no NAT, disabled, or no public address)
    port_allocation: PortAllocation
    local_address: Address | None = None
    server_has_second_ip: bool = False
    # Observed mappings, in the order the tests created them (primary first).
    mapped_addresses: tuple[Address, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass
class _Transaction:
    name: str
    tid: bytes
    data: bytes
    dest: Address
    deadline: float
    next_send: float
    interval: float
    state: Literal["pending", "ok", "failed", "timeout", "cancelled"] = "pending"
    response: Message | None = None
    source: Address | None = None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text)
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; compare them as IPv4.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _same_ip(a: str, b: str) -> bool:
    return _ip(a) == _ip(b)


def _same(a: Address | None, b: Address | None) -> bool:
    return a is not None and b is not None and a[1] == b[1] and _same_ip(a[0], b[0])


class BehaviorProbe:
    """RFC 5780 sections 4.3-4.5 as a state machine.

    Phases: primary Binding (a missing answer means UDP is blocked); filtering (CHANGE-
    REQUEST ip+port, then port only, run together, plus the hairpin check); mapping
    (Binding to IP2:P1 and IP2:P2 from OTHER-ADDRESS, or to IP1:P2 when the server has
    one IP and we know its second port). Each request is retransmitted RFC 8489-style:
    first after `rto`, the interval doubling, until its phase ends. The filtering phase
    gets `filter_share` of the time left after the primary answer (at most `filter_wait`
    when given), mapping the rest; the whole run ends by `now + timeout`.
    """

    def __init__(
        self,
        server_primary: Address,
        now: float,
        *,
        local_address: Address | None = None,
        alternate_port: int | None = None,
        timeout: float = 3.0,
        rto: float = 0.1,
        filter_share: float = 0.5,
        filter_wait: float | None = None,
        test_hairpin: bool = True,
        software: str | None = DEFAULT_SOFTWARE,
    ) -> None:
        if timeout <= 0 or rto <= 0 or not 0 < filter_share < 1:
            raise InvalidValue("timeout and rto must be positive, filter_share in (0, 1)")
        if filter_wait is not None and filter_wait <= 0:
            raise InvalidValue("filter_wait must be positive")
        self.server: Address = (server_primary[0], server_primary[1])
        self.local_address = local_address
        self._alternate_port = alternate_port
        self._deadline = now + timeout
        self._rto = rto
        self._filter_share = filter_share
        # A caller that knows the server's RTT bounds the filtering phase by it: a NAT that
        # filters answers nothing there, and waiting half the budget for that silence is
        # most of a port-restricted or symmetric NAT's discovery time.
        self._filter_wait = filter_wait
        self._test_hairpin = test_hairpin
        self._software = software
        self._outbox: list[tuple[bytes, Address]] = []
        self._transactions: dict[bytes, _Transaction] = {}
        self._by_name: dict[str, _Transaction] = {}
        self._notes: list[str] = []
        self._phase: Literal["primary", "filtering", "mapping", "done"] = "primary"
        self._phase_end = self._deadline
        self._x1: Address | None = None
        self._other_ip: str | None = None
        self._open = False
        self._filtering: Behavior = "unknown"
        self._hairpin: bool | None = None
        self.result: NatBehavior | None = None
        self._start("primary", self.server, now)

    # -- the sans-IO interface -----------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.result is not None

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        out, self._outbox = self._outbox, []
        return out

    def get_timer(self) -> float | None:
        """The absolute time at which `handle_timer` must be called, or None when done."""
        if self.result is not None:
            return None
        times = [self._phase_end]
        for tx in self._by_name.values():
            if tx.state == "pending" and tx.next_send < tx.deadline:
                times.append(tx.next_send)
        return min(times)

    def handle_timer(self, now: float) -> None:
        if self.result is not None:
            return
        for tx in list(self._by_name.values()):
            if tx.state == "pending" and tx.next_send <= now and tx.next_send < tx.deadline:
                self._outbox.append((tx.data, tx.dest))
                tx.interval *= 2
                tx.next_send = now + tx.interval
        if now >= self._phase_end:
            self._end_phase(now)

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> bool:
        """Offer one datagram. Returns True if it belonged to this probe (consumed)."""
        if self.result is not None or not is_stun(data):
            return False
        tx = self._transactions.get(bytes(data[8:20]))
        if tx is None:
            return False
        try:
            message = parse_message(data)
        except StunError:
            return True  # ours by transaction id but unusable; retransmissions continue
        if tx.state != "pending":
            return True  # a late duplicate
        if tx.name == "hairpin":
            # Our own request came back to us through the NAT's public address.
            if message.message_class == Class.REQUEST:
                tx.state = "ok"
        elif message.message_class == Class.RESPONSE:
            tx.response, tx.source = message, (addr[0], addr[1])
            tx.state = "ok" if self._source_ok(tx.name, addr) else "failed"
            if tx.state == "failed":
                self._notes.append(f"{tx.name}: server ignored CHANGE-REQUEST (answered from {addr})")
        elif message.message_class == Class.ERROR:
            tx.response, tx.source = message, (addr[0], addr[1])
            tx.state = "failed"
            code = message.attributes.get("ERROR-CODE", (0, ""))
            self._notes.append(f"{tx.name}: server answered error {code[0]} {code[1]}".rstrip())
        else:
            return True
        self._progress(now)
        return True

    # -- phases ------------------------------------------------------------------------------

    def _start(
        self, name: str, dest: Address, now: float, *, change_ip: bool = False, change_port: bool = False
    ) -> None:
        tid = os.urandom(12)
        data = binding_request(tid, change_ip=change_ip, change_port=change_port, software=self._software)
        tx = _Transaction(name, tid, data, dest, self._phase_end, now + self._rto, self._rto)
        self._transactions[tid] = tx
        self._by_name[name] = tx
        self._outbox.append((data, dest))

    def _source_ok(self, name: str, addr: Address) -> bool:
        # The filtering tests only mean something if the answer really came from where we
        # asked; an RFC 3489-only server ignores CHANGE-REQUEST and answers from P1.
        if name == "filter_ip_port":
            return not _same_ip(addr[0], self.server[0]) and addr[1] != self.server[1]
        if name == "filter_port":
            return _same_ip(addr[0], self.server[0]) and addr[1] != self.server[1]
        return True

    def _phase_transactions(self) -> list[_Transaction]:
        names = {
            "primary": ("primary",),
            "filtering": ("filter_ip_port", "filter_port", "hairpin"),
            "mapping": ("map2", "map3"),
        }.get(self._phase, ())
        return [self._by_name[n] for n in names if n in self._by_name]

    def _progress(self, now: float) -> None:
        # Test III of the filtering phase (port only) is moot once test II got through, but
        # it is not cancelled: its answer comes as fast, and whoever reports which of the
        # server's sockets answered (netcheck) would otherwise miss the one on the other port.
        if self._phase == "mapping":
            m3 = self._by_name.get("map3")
            if m3 is not None and m3.state == "pending" and _same(self._mapped("map2"), self._x1):
                m3.state = "cancelled"  # endpoint-independent mapping: test III is moot
        if all(tx.state != "pending" for tx in self._phase_transactions()):
            self._end_phase(now)

    def _end_phase(self, now: float) -> None:
        for tx in self._phase_transactions():
            if tx.state == "pending":
                tx.state = "timeout"
        if self._phase == "primary":
            self._after_primary(now)
        elif self._phase == "filtering":
            self._after_filtering(now)
        elif self._phase == "mapping":
            self._finish()

    def _after_primary(self, now: float) -> None:
        tx = self._by_name["primary"]
        if tx.state == "timeout":
            self._notes.append("no answer from the server: UDP blocked or server down")
            self._finish(found="udp_blocked")
            return
        x1 = mapped_address(tx.response) if tx.state == "ok" and tx.response else None
        if x1 is None:
            if tx.state == "ok":
                self._notes.append("the server's answer carried no mapped address")
            self._finish()  # an error answer was noted when it arrived
            return
        self._x1 = x1
        self._open = _same(x1, self.local_address)
        assert tx.response is not None
        other = tx.response.attributes.get("OTHER-ADDRESS")
        if other is not None and not _same_ip(other[0], self.server[0]):
            self._other_ip = other[0]
        if other is not None and other[1] != self.server[1]:
            self._alternate_port = other[1]
        if self._other_ip is None:
            self._notes.append("server has no second IP (no usable OTHER-ADDRESS)")

        self._phase = "filtering"
        share = (self._deadline - now) * self._filter_share
        self._phase_end = now + (min(share, self._filter_wait) if self._filter_wait else share)
        if self._other_ip is not None:
            self._start("filter_ip_port", self.server, now, change_ip=True, change_port=True)
        self._start("filter_port", self.server, now, change_port=True)
        if self._test_hairpin and not self._open:
            self._start("hairpin", x1, now)

    def _after_filtering(self, now: float) -> None:
        fip, fport = self._by_name.get("filter_ip_port"), self._by_name["filter_port"]
        if fip is not None and fip.state == "ok":
            self._filtering = "endpoint_independent"
        elif fport.state == "timeout":
            # Not even the server's other port on the same IP gets through.
            self._filtering = "address_and_port_dependent"
        elif fport.state == "ok" and fip is not None and fip.state == "timeout":
            self._filtering = "address_dependent"
        elif fport.state == "ok":
            self._notes.append(
                "filtering: answers from another port get through; telling endpoint-"
                "independent from address-dependent filtering needs a second server IP"
            )
        if fport.state == "ok" and self._alternate_port is None and fport.source is not None:
            self._alternate_port = fport.source[1]  # learned where the server's P2 is
        hairpin = self._by_name.get("hairpin")
        if hairpin is not None:
            self._hairpin = hairpin.state == "ok"

        if self._open:
            self._finish()  # no NAT: nothing maps, so there is no mapping to test
            return
        self._phase = "mapping"
        self._phase_end = self._deadline
        if self._other_ip is not None:
            self._start("map2", (self._other_ip, self.server[1]), now)
            if self._alternate_port is not None:
                self._start("map3", (self._other_ip, self._alternate_port), now)
        elif self._alternate_port is not None:
            self._notes.append(
                "mapping tested against the server's second port only: address-dependent "
                "mapping would look endpoint-independent"
            )
            self._start("map2", (self.server[0], self._alternate_port), now)
        else:
            self._notes.append("mapping not tested: the server offers no second address or port")
            self._finish()

    # -- the verdict ---------------------------------------------------------------------------

    def _mapped(self, name: str) -> Address | None:
        tx = self._by_name.get(name)
        if tx is None or tx.state != "ok" or tx.response is None:
            return None
        return mapped_address(tx.response)

    def _mapping(self) -> tuple[Behavior, bool | None]:
        """(mapping behaviour, endpoint-independent?) from the mapping tests."""
        if self._open:
            return "endpoint_independent", True
        x1, x2, x3 = self._x1, self._mapped("map2"), self._mapped("map3")
        if self._other_ip is None:
            if x2 is None:
                return "unknown", None
            # Same IP, other port: a new mapping means the port matters.
            return ("endpoint_independent", True) if _same(x2, x1) else ("address_and_port_dependent", False)
        if x2 is not None and _same(x2, x1):
            return "endpoint_independent", True
        if x2 is not None and x3 is not None:
            if _same(x3, x2):
                return "address_dependent", False
            return "address_and_port_dependent", False
        if x3 is not None and _same(x3, x1):
            return "endpoint_independent", True  # a new IP and port still map the same
        if x2 is not None or x3 is not None:
            return "unknown", False  # a new mapping was seen, but not enough to say which kind
        return "unknown", None

    def _port_allocation(self, mapped: list[Address], eim: bool | None) -> PortAllocation:
        """preserving: a socket's first mapping keeps its local port (on a cone NAT every
        mapping does; an endpoint-dependent one allocates the next ones elsewhere, and a
        fresh socket's port can be predicted: PREDICT in nat/hard_nat.py)."""
        local_port = self.local_address[1] if self.local_address is not None else None
        if local_port is not None and all(m[1] == local_port for m in mapped):
            return "preserving"
        if eim is False:
            if local_port is not None and mapped and mapped[0][1] == local_port:
                return "preserving"
            ports = [m[1] for m in mapped if m[1] != local_port]
            fresh = [p for i, p in enumerate(ports) if i == 0 or p != ports[i - 1]]
            if len(fresh) >= 2:
                steps = [b - a for a, b in zip(fresh, fresh[1:])]
                return "sequential" if all(0 < s <= SEQUENTIAL_WINDOW for s in steps) else "random"
        return "unknown"

    def _finish(self, found: NatType | None = None) -> None:
        nat_type: NatType
        mapping: Behavior = "unknown"
        eim: bool | None = None
        mapped: list[Address] = []
        if self._x1 is not None:
            mapping, eim = self._mapping()
            mapped = [m for m in (self._x1, self._mapped("map2"), self._mapped("map3")) if m is not None]
        if found is not None:
            nat_type = found
        else:
            if self._x1 is None:
                nat_type = "unknown"
            elif self._open:
                nat_type = "open"
            elif eim is False:
                nat_type = "symmetric"
            elif eim is True:
                nat_type = {
                    "endpoint_independent": "full_cone",
                    "address_dependent": "restricted_cone",
                    "address_and_port_dependent": "port_restricted",
                }.get(self._filtering or "", "unknown")  # type: ignore[assignment]
            else:
                nat_type = "unknown"
        self._phase = "done"
        self.result = NatBehavior(
            nat_type=nat_type,
            mapping=mapping,
            filtering=self._filtering,
            public_address=self._x1,
            hairpinning=self._hairpin,
            port_allocation=self._port_allocation(mapped, eim) if mapped else "unknown",
            local_address=self.local_address,
            server_has_second_ip=self._other_ip is not None,
            mapped_addresses=tuple(mapped),
            notes=tuple(self._notes),
        )
