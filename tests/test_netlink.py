"""The rtnetlink watcher: the message counter on made-up and random datagrams, and the
watcher itself in a lab namespace whose address the test changes (root only)."""

from __future__ import annotations

import struct
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from macula.net.netlink import count_changes
from macula_lab.kernel import kernel_lab_available

AVAILABLE, REASON = kernel_lab_available()


def _message(kind: int, body: bytes = b"") -> bytes:
    length = 16 + len(body)
    padded = body + b"\0" * (-length % 4)
    return struct.pack("=IHHII", length, kind, 0, 0, 0) + padded


def test_counts_link_address_and_route_messages_only() -> None:
    datagram = (_message(20, b"\x02" * 9) + _message(28, b"neighbour") + _message(25)
                + _message(16, b"x" * 20))
    assert count_changes(datagram) == 3  # NEWADDR, DELROUTE, NEWLINK; not NEWNEIGH (28)


def test_a_truncated_or_zero_length_message_ends_the_count() -> None:
    assert count_changes(_message(20)[:10]) == 0
    assert count_changes(struct.pack("=IHHII", 0, 20, 0, 0, 0) * 3) == 0


@given(st.binary(max_size=4096))
def test_any_datagram_is_counted_without_raising(datagram: bytes) -> None:
    assert 0 <= count_changes(datagram) <= len(datagram) // 16


@pytest.mark.kernel
@pytest.mark.skipif(not AVAILABLE, reason=REASON or "kernel lab unavailable")
def test_the_watcher_calls_back_once_when_an_address_changes() -> None:
    from macula_lab.kernel import KernelLab

    script = textwrap.dedent("""
        import asyncio, subprocess
        from macula.net.netlink import NetworkWatcher

        async def main():
            calls = []
            watcher = NetworkWatcher.start(lambda: calls.append(1))
            assert watcher is not None
            subprocess.run(["ip", "addr", "add", "192.0.2.77/32", "dev", "lo"], check=True)
            subprocess.run(["ip", "addr", "add", "192.0.2.78/32", "dev", "lo"], check=True)
            for _ in range(100):
                if calls:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # a second callback would come by now
            watcher.close()
            print(len(calls), watcher.changes)

        asyncio.run(main())
    """)
    with KernelLab() as lab:
        proc = lab.popen(lab.server_ns, [sys.executable, "-c", script],
                         stdout=-1, stderr=-1, text=True, env=_env())
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    calls, changes = map(int, out.split())
    assert calls == 1 and changes >= 2  # two changes in one burst: one callback


def _env() -> dict[str, str]:
    from macula_lab.kernel import netns

    return netns.python_env()
