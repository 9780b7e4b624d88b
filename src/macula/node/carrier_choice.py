"""Which carrier takes the node's gateway traffic: UDP, or the TLS (WebSocket) link (sans-IO).

UDP is always tried first. The link is dialled when registration over UDP has not happened
within `race_after` (300 ms plus the gateway's RTT once known), or when UDP to the gateway
goes quiet: something was sent, nothing came back for `SILENCE`, and `PROBES` STUN
requests to the gateway's UDP port got no answer either. Once the link is up it carries
the traffic, and UDP is probed in the background with backoff; the first UDP answer
moves the traffic back (and with it ICE, direct and TURN over UDP). Inputs are events and
`now`; outputs are `current`, `wants_dial()` and `probes_due()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Carrier = Literal["udp", "stream"]

RACE_AFTER = 0.3  # seconds without registration before the link is dialled
SILENCE = 1.0  # seconds of UDP sent to the gateway with nothing back before probing
PROBES = 3  # STUN probes, PROBE_GAP apart, before UDP counts as gone
PROBE_GAP = 0.2
PROBE_BACKOFF_MIN = 1.0  # seconds between UDP probes while on the link, doubling
PROBE_BACKOFF_MAX = 30.0
REDIAL_MIN = 0.5  # seconds before dialling again after a failed dial, doubling
REDIAL_MAX = 30.0
LINK_LINGER = 5.0  # seconds an unused link stays open after traffic moved back to UDP


@dataclass
class CarrierCounters:
    dials: int = 0
    dial_failures: int = 0
    to_stream: int = 0
    to_udp: int = 0
    probes: int = 0


class CarrierChoice:
    def __init__(self, now: float, *, race_after: float = RACE_AFTER) -> None:
        self.current: Carrier = "udp"
        self.link_up = False
        self.dialling = False
        self.registered = False
        self.counters = CarrierCounters()
        self.last_error = ""
        self._race_after = race_after
        self._race_at: float | None = now + race_after
        self._quiet_since: float | None = None  # first UDP send to the gateway unanswered
        self._probe_at: float | None = None
        self._probes_left = 0
        self._probing = False  # UDP went quiet: probes are out, answers awaited
        self._down_at: float | None = None  # UDP declared gone at this time, if probing
        self._probe_gap = PROBE_BACKOFF_MIN
        self._dial_at: float | None = None
        self._redial = REDIAL_MIN
        self._close_link_at: float | None = None

    # ------------------------------------------------------------------ inputs
    def on_registered(self, now: float) -> None:
        self.registered = True
        self._race_at = None
        if self.current == "udp" and self.link_up:
            self._close_link_at = now + LINK_LINGER

    def on_unregistered(self, now: float, rtt: float | None = None) -> None:
        """Registration was lost: UDP gets its head start again before the link is dialled
        (the gateway's RTT, when known, adds to it)."""
        self.registered = False
        if self.current == "udp" and not self.dialling and not self.link_up:
            self._race_at = now + self._race_after + (rtt or 0.0)

    def on_udp_sent(self, now: float) -> bool:
        """True when this send starts a quiet period (the timer changes)."""
        if self.current == "udp" and self._quiet_since is None:
            self._quiet_since = now
            return True
        return False

    @property
    def settled(self) -> bool:
        """On UDP with nothing unanswered: an answer from the gateway changes nothing."""
        return (self.current == "udp" and self._quiet_since is None and not self._probing
                and self._down_at is None and self._probe_at is None)

    def on_udp_heard(self, now: float) -> bool:
        """Something came from the gateway over UDP. True when that moves the traffic back
        to UDP."""
        self._quiet_since = None
        self._probes_left = 0
        self._probing = False
        self._down_at = None
        if self.current == "stream":
            self._back_to_udp(now)
            self._probe_gap = PROBE_BACKOFF_MIN
            self._close_link_at = now + LINK_LINGER
            return True
        self._probe_at = None
        return False

    def _back_to_udp(self, now: float) -> None:
        self.current = "udp"
        self.counters.to_udp += 1
        self._probe_at = None

    def on_dial_started(self, now: float) -> None:
        self.dialling = True
        self._dial_at = None
        self._race_at = None  # from here on, failed dials are retried with backoff
        self.counters.dials += 1

    def on_link_up(self, now: float) -> bool:
        """The link is ready. True when the traffic moves to it now: registration over
        UDP has not happened, or UDP to the gateway is gone."""
        self.dialling = False
        self.link_up = True
        self._redial = REDIAL_MIN
        if self.current == "udp" and (not self.registered or self._down_at is not None):
            self.current = "stream"
            self.counters.to_stream += 1
            self._quiet_since = None
            self._probes_left = 0
            self._probing = False
            self._probe_gap = PROBE_BACKOFF_MIN
            self._probe_at = now + self._probe_gap
            self._close_link_at = None
            return True
        self._close_link_at = now + LINK_LINGER
        return False

    def on_link_failed(self, now: float, error: str) -> None:
        self.dialling = False
        self.counters.dial_failures += 1
        self.last_error = error
        self._dial_at = now + self._redial
        self._redial = min(self._redial * 2, REDIAL_MAX)

    def on_link_closed(self, now: float, reason: str) -> bool:
        """The link ended. True when that moves the traffic back to UDP (which is then
        watched as usual: silence there dials again)."""
        self.link_up = False
        self.last_error = reason
        self._close_link_at = None
        if self.current == "stream":
            self._back_to_udp(now)
            self._quiet_since = now
            self._dial_at = now + self._redial
            self._redial = min(self._redial * 2, REDIAL_MAX)
            return True
        return False

    # ------------------------------------------------------------------ outputs
    def wants_dial(self, now: float) -> bool:
        if self.dialling or self.link_up:
            return False
        if self._race_at is not None and now >= self._race_at and not self.registered:
            return True
        if self._down_at is not None or (self.current == "udp" and not self.registered
                                         and self._race_at is None):
            return self._dial_at is None or now >= self._dial_at
        return False

    def wants_link_closed(self, now: float) -> bool:
        if self._close_link_at is not None and now >= self._close_link_at:
            self._close_link_at = None
            return self.current == "udp" and self.link_up
        return False

    def probes_due(self, now: float) -> int:
        """How many STUN probes to send to the gateway's UDP port now (0 or 1)."""
        if self.current == "udp":
            if self._quiet_since is not None and not self._probing \
                    and self._down_at is None and now >= self._quiet_since + SILENCE:
                self._probing = True
                self._probes_left = PROBES
                self._probe_at = now
            if self._probe_at is None or now < self._probe_at:
                return 0
            if self._probes_left > 0:
                self._probes_left -= 1
                self._probe_at = now + PROBE_GAP
                self.counters.probes += 1
                return 1
            # The last probe went PROBE_GAP ago, unanswered: UDP to the gateway is gone.
            self._probe_at = None
            self._probing = False
            self._down_at = now
            self._dial_at = self._dial_at if self._dial_at is not None else now
            return 0
        if self._probe_at is not None and now >= self._probe_at:
            self._probe_gap = min(self._probe_gap * 2, PROBE_BACKOFF_MAX)
            self._probe_at = now + self._probe_gap
            self.counters.probes += 1
            return 1
        return 0

    def get_timer(self) -> float | None:
        times: list[float] = []
        if self._race_at is not None and not self.registered:
            times.append(self._race_at)
        if self._quiet_since is not None and self.current == "udp" and not self._probing \
                and self._down_at is None:
            times.append(self._quiet_since + SILENCE)
        for t in (self._probe_at, self._close_link_at):
            if t is not None:
                times.append(t)
        if self._dial_at is not None and not self.dialling and not self.link_up \
                and (self._down_at is not None or not self.registered):
            times.append(self._dial_at)
        return min(times) if times else None
