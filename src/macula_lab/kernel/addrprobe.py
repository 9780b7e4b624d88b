"""A tiny plain-UDP "what's my address" responder and its clients, for probing lab NATs.

Runs inside lab namespaces with `python -m macula_lab.kernel.addrprobe CMD ...`; every
command prints JSON lines on stdout. Messages are JSON datagrams:

    {"op": "whoami", "id": N}  -> {"op": "addr", "id": N, "observed": "ip:port", "via": "ip:port"}
    {"op": "filter", "id": N, "delay": S}
                               -> the addr reply, plus {"op": "unsolicited", "from": ...} sent
                                  S seconds later to the observed address from every *other*
                                  server socket
    {"op": "ping", "id": N}    -> {"op": "pong", "id": N}

Commands:
    serve --bind IP:PORT ...                 the responder (server namespace)
    probe --server IP1:P1 IP1:P2 IP2:P1 IP2:P2   mapping + filtering of this host's NAT
    rtt --server IP:PORT --count N           round-trip times
    punch --server IP:PORT                   prints its mapping, reads the peer's from stdin,
                                             then plain UDP hole punching (answers any source
                                             it hears the peer from)

Every loop is bounded by a deadline; `--parent-pid` makes servers exit with their parent.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

Addr = tuple[str, int]
MAX_DGRAM = 2048


def parse_addr(text: str) -> Addr:
    host, _, port = text.rpartition(":")
    return host, int(port)


def fmt(addr: Addr) -> str:
    return f"{addr[0]}:{addr[1]}"


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, sort_keys=True), flush=True)


def send(sock: socket.socket, obj: dict[str, Any], addr: Addr) -> None:
    try:
        sock.sendto(json.dumps(obj).encode(), addr)
    except OSError:
        pass  # e.g. ICMP-induced ECONNREFUSED; UDP probes tolerate loss


def recv(sock: socket.socket, timeout: float) -> tuple[dict[str, Any], Addr] | None:
    """One JSON datagram or None after `timeout`; junk datagrams are skipped."""
    deadline = time.monotonic() + timeout
    for _ in range(1000):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([sock], [], [], left)[0]:
            return None
        try:
            data, addr = sock.recvfrom(MAX_DGRAM)
            msg = json.loads(data)
        except (OSError, ValueError):
            continue
        if isinstance(msg, dict):
            return msg, (addr[0], addr[1])
    return None


def udp_socket(bind: str = "0.0.0.0", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, port))
    return sock


def request(sock: socket.socket, obj: dict[str, Any], server: Addr, *, tries: int = 5,
            wait: float = 0.4) -> tuple[dict[str, Any], Addr] | None:
    """Send with retries until a reply with the same id comes from `server`."""
    for _ in range(tries):
        send(sock, obj, server)
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            got = recv(sock, left)
            if got is None:
                break
            msg, src = got
            if src == server and msg.get("id") == obj["id"] and msg.get("op") != "unsolicited":
                return msg, src
    return None


# --- server -----------------------------------------------------------------------------

def serve(binds: Sequence[Addr], max_seconds: float, parent_pid: int | None) -> None:
    socks = [udp_socket(ip, port) for ip, port in binds]
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    emit({"ready": [fmt(s.getsockname()) for s in socks]})
    pending: list[tuple[float, socket.socket, dict[str, Any], Addr]] = []  # delayed sends
    deadline = time.monotonic() + max_seconds
    while not stop[0] and time.monotonic() < deadline:
        if parent_pid and os.getppid() != parent_pid:
            break
        now = time.monotonic()
        due = [p for p in pending if p[0] <= now]
        pending = [p for p in pending if p[0] > now]
        for _, sock, msg, dest in due:
            send(sock, msg, dest)
        wait = min([0.2] + [p[0] - now for p in pending])
        try:
            readable = select.select(socks, [], [], max(0.0, wait))[0]
        except InterruptedError:
            continue
        for sock in readable:
            _answer(sock, socks, pending)
    for sock in socks:
        sock.close()


def _answer(sock: socket.socket, socks: list[socket.socket],
            pending: list[tuple[float, socket.socket, dict[str, Any], Addr]]) -> None:
    try:
        data, src = sock.recvfrom(MAX_DGRAM)
        msg = json.loads(data)
    except (OSError, ValueError):
        return
    if not isinstance(msg, dict):
        return
    op, ident = msg.get("op"), msg.get("id")
    here = fmt(sock.getsockname())
    if op == "ping":
        send(sock, {"op": "pong", "id": ident}, src)
    elif op in ("whoami", "filter"):
        send(sock, {"op": "addr", "id": ident, "observed": fmt(src), "via": here}, src)
        if op != "filter" or len(pending) > 1000:
            return
        # "delay" lets a client test whether a mapping still filters after idling.
        at = time.monotonic() + min(max(float(msg.get("delay") or 0.0), 0.0), 60.0)
        for other in socks:
            if other is not sock:
                out = {"op": "unsolicited", "id": ident, "from": fmt(other.getsockname())}
                pending.append((at, other, out, src))


# --- clients ----------------------------------------------------------------------------

def probe(servers: Sequence[Addr], window: float, filter_delay: float = 0.0) -> dict[str, Any]:
    """Mapping seen from servers[0..2] on one socket; filtering on a fresh socket.

    The fresh socket has sent only to servers[0], so whatever reaches it from the other
    server sockets passed the NAT's filter unsolicited.
    """
    result: dict[str, Any] = {"servers": [fmt(s) for s in servers]}
    with udp_socket() as sock:
        observed = []
        for n, server in enumerate(servers[:3]):
            got = request(sock, {"op": "whoami", "id": n}, server)
            observed.append(got[0]["observed"] if got else None)
        result["local_port"] = sock.getsockname()[1]
        result["mapping"] = observed
    result["mapping_behavior"] = classify_mapping(observed)
    with udp_socket() as sock:
        result.update(_filter_probe(sock, servers, window, filter_delay))
    return result


def _filter_probe(sock: socket.socket, servers: Sequence[Addr], window: float,
                  delay: float = 0.0, tries: int = 5, wait: float = 0.4) -> dict[str, Any]:
    """Ask servers[0] to answer and to have its other sockets write to us `delay` s later.

    Unsolicited datagrams may overtake the reply, so one loop collects both.
    """
    filtering = {fmt(s): False for s in servers}
    mapping: str | None = None
    sent = 0
    next_send = time.monotonic()
    window_end: float | None = None
    for _ in range(1000):
        now = time.monotonic()
        if window_end is None:
            if now >= next_send:
                if sent >= tries:
                    break
                send(sock, {"op": "filter", "id": 100, "delay": delay}, servers[0])
                sent += 1
                next_send = now + wait
            until = next_send
        else:
            if now >= window_end or all(filtering.values()):
                break
            until = window_end
        reply = recv(sock, max(0.0, until - time.monotonic()))
        if reply is None:
            continue
        msg, src = reply
        if msg.get("op") == "addr" and msg.get("id") == 100 and src == servers[0]:
            filtering[fmt(src)] = True
            mapping = msg.get("observed")
            if window_end is None:
                window_end = time.monotonic() + delay + window
        elif msg.get("op") == "unsolicited" and fmt(src) in filtering:
            filtering[fmt(src)] = True
    return {"filter_mapping": mapping, "filtering": filtering}


def classify_mapping(observed: Sequence[str | None]) -> str:
    """RFC 4787 mapping from the addresses seen by IP1:P1, IP1:P2, IP2:P1."""
    if len(observed) < 3 or any(o is None for o in observed):
        return "unknown"
    a, b, c = observed[:3]
    if a == b == c:
        return "endpoint_independent"
    if a == b:
        return "address_dependent"
    return "address_and_port_dependent"


def rtt(server: Addr, count: int, interval: float, wait: float) -> dict[str, Any]:
    rtts: list[float] = []
    lost = 0
    with udp_socket() as sock:
        for n in range(count):
            start = time.perf_counter()
            send(sock, {"op": "ping", "id": n}, server)
            deadline = time.monotonic() + wait
            ok = False
            while (left := deadline - time.monotonic()) > 0:
                got = recv(sock, left)
                if got is None:
                    break
                if got[0].get("op") == "pong" and got[0].get("id") == n:
                    rtts.append((time.perf_counter() - start) * 1000.0)
                    ok = True
                    break
            lost += not ok
            if interval > 0:
                time.sleep(interval)
    return {"rtts_ms": rtts, "lost": lost, "count": count}


def punch(server: Addr, duration: float, interval: float, stdin_timeout: float) -> dict[str, Any]:
    """Hole punch toward the peer whose mapped address arrives as a JSON line on stdin."""
    with udp_socket() as sock:
        got = request(sock, {"op": "whoami", "id": 0}, server)
        mapped = got[0]["observed"] if got else None
        emit({"mapped": mapped, "local_port": sock.getsockname()[1]})
        if not select.select([sys.stdin], [], [], stdin_timeout)[0]:
            return {"mapped": mapped, "error": "no peer address on stdin"}
        peer_line = sys.stdin.readline()
        try:
            peer = parse_addr(json.loads(peer_line)["peer"])
        except (ValueError, KeyError, TypeError):
            return {"mapped": mapped, "error": f"bad peer line {peer_line!r}"}
        targets = [peer]
        received = acked = False
        start = time.monotonic()
        deadline = start + duration
        next_send = start
        linger = 3  # sends after success, so the peer hears our "got" too
        while time.monotonic() < deadline and linger > 0:
            now = time.monotonic()
            if now >= next_send:
                for target in targets:
                    send(sock, {"op": "punch", "got": received}, target)
                next_send = now + interval
                if received and acked:
                    linger -= 1
            reply = recv(sock, max(0.0, next_send - time.monotonic()))
            if reply is None:
                continue
            msg, src = reply
            if msg.get("op") != "punch":
                continue
            received = True
            acked = acked or bool(msg.get("got"))
            if src not in targets:
                targets.append(src)  # peer-reflexive: answer the source we hear from
        return {"mapped": mapped, "peer": fmt(peer), "received": received, "acked": acked,
                "heard_from": [fmt(t) for t in targets[1:]],
                "elapsed_ms": round((time.monotonic() - start) * 1000.0, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m macula_lab.kernel.addrprobe")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--bind", action="append", required=True, type=parse_addr)
    p_serve.add_argument("--max-seconds", type=float, default=600.0)
    p_serve.add_argument("--parent-pid", type=int, default=0)
    p_probe = sub.add_parser("probe")
    p_probe.add_argument("--server", nargs=4, required=True, type=parse_addr,
                         metavar=("IP1:P1", "IP1:P2", "IP2:P1", "IP2:P2"))
    p_probe.add_argument("--window", type=float, default=0.5,
                         help="seconds to wait for unsolicited datagrams")
    p_probe.add_argument("--filter-delay", type=float, default=0.0,
                         help="server waits this long (host idle) before the unsolicited sends")
    p_rtt = sub.add_parser("rtt")
    p_rtt.add_argument("--server", required=True, type=parse_addr)
    p_rtt.add_argument("--count", type=int, default=10)
    p_rtt.add_argument("--interval", type=float, default=0.0)
    p_rtt.add_argument("--wait", type=float, default=1.0)
    p_punch = sub.add_parser("punch")
    p_punch.add_argument("--server", required=True, type=parse_addr)
    p_punch.add_argument("--duration", type=float, default=3.0)
    p_punch.add_argument("--interval", type=float, default=0.05)
    p_punch.add_argument("--stdin-timeout", type=float, default=20.0)
    args = parser.parse_args(argv)

    if args.cmd == "serve":
        serve(args.bind, args.max_seconds, args.parent_pid or None)
    elif args.cmd == "probe":
        emit(probe(args.server, args.window, args.filter_delay))
    elif args.cmd == "rtt":
        emit(rtt(args.server, max(1, min(args.count, 10000)), args.interval, args.wait))
    else:
        emit(punch(args.server, args.duration, args.interval, args.stdin_timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
