"""A real coturn for tests and the lab: configured in a temp dir, unprivileged, bounded.

`Coturn` writes a turnserver config, starts `/usr/bin/turnserver -c CONF` (dropping to
the Debian package's `turnserver` user through setpriv when we are root, so the relay
never runs with our privileges), waits until the port answers a STUN Binding, and kills
the process on stop(), on context exit, and at interpreter exit. Inside a kernel-lab
namespace, pass `prefix=["ip", "netns", "exec", NS]` or the lab's own `popen`; the
readiness probe then runs through the same door.

coturn refuses to relay to loopback peers unless told (`allow-loopback-peers`), and we
add `allowed-peer-ip` for every peer range a test names, so loopback and the lab's
documentation ranges work whatever the packaged defaults deny.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["COTURN_BINARY", "Coturn", "CoturnError", "coturn_available", "stun_probe"]

COTURN_BINARY = "/usr/bin/turnserver"
SERVICE_USER = "turnserver"  # created by the Debian package
_MAGIC = 0x2112A442

_running: set[Coturn] = set()


class CoturnError(RuntimeError):
    """coturn did not start (the message carries the tail of its log)."""


def coturn_available(binary: str = COTURN_BINARY) -> tuple[bool, str]:
    """(True, version) when the binary runs; (False, why) for a test skip reason."""
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        return False, f"{binary} not found (apt-get install coturn)"
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{binary} --version failed: {exc}"
    version = (out.stdout or out.stderr).strip().splitlines()
    return True, version[0] if version else "coturn"


def stun_probe(ip: str, port: int, timeout: float = 0.2, *, tcp: bool = False) -> bool:
    """One STUN Binding request; True if a Binding answer with our transaction id came."""
    tid = os.urandom(12)
    request = struct.pack("!HHI12s", 0x0001, 0, _MAGIC, tid)
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    kind = socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM
    try:
        with socket.socket(family, kind) as sock:
            sock.settimeout(timeout)
            if tcp:
                sock.connect((ip, port))
                sock.sendall(request)
            else:
                sock.sendto(request, (ip, port))
            answer = sock.recv(2048)
    except OSError:
        return False
    return len(answer) >= 20 and answer[0] < 4 and answer[8:20] == tid


# The probe run through `prefix`/`popen` (inside a namespace): this file's stun_probe, so
# the child needs nothing but the interpreter.
_PROBE_CODE = (
    "import sys,runpy;"
    "m=runpy.run_path(sys.argv[1]);"
    "sys.exit(0 if m['stun_probe'](sys.argv[2],int(sys.argv[3]),float(sys.argv[4]),tcp=sys.argv[5]=='1') else 1)"
)


def _free_port(ip: str) -> int:
    """A port free for both UDP and TCP on `ip` right now (coturn listens on both)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.bind((ip, 0))
            port = udp.getsockname()[1]
            with socket.socket(family, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((ip, port))
                except OSError:
                    continue
                return port
    raise CoturnError(f"no port free for both UDP and TCP on {ip}")


class Coturn:
    """One turnserver process. Use as a (async) context manager or call start()/stop()."""

    def __init__(
        self,
        listen_ip: str = "127.0.0.1",
        port: int | None = None,
        relay_ip: str | None = None,
        min_port: int | None = None,
        max_port: int | None = None,
        realm: str = "macula.test",
        users: Mapping[str, str] | None = None,
        udp: bool = True,
        tcp: bool = True,
        extra_args: Sequence[str] = (),
        *,
        allowed_peer_ips: Iterable[str] = (),
        allow_loopback_peers: bool = True,
        stale_nonce: int | None = None,
        auth_secret: str | None = None,
        binary: str = COTURN_BINARY,
        prefix: Sequence[str] = (),
        popen: Callable[..., subprocess.Popen[Any]] | None = None,
        run_as: str | None = SERVICE_USER,
        start_timeout: float = 5.0,
        tls_port: int | None = None,
    ) -> None:
        if not (udp or tcp):
            raise ValueError("coturn needs UDP or TCP listeners")
        if (min_port is None) != (max_port is None):
            raise ValueError("give both min_port and max_port, or neither")
        self.listen_ip = listen_ip
        self.port = port
        self.relay_ip = relay_ip or listen_ip
        self.min_port, self.max_port = min_port, max_port
        self.realm = realm
        self.users: dict[str, str] = dict(users) if users is not None else {"macula": "secret"}
        self.udp, self.tcp = udp, tcp
        self.extra_args = list(extra_args)
        self.allowed_peer_ips = list(allowed_peer_ips)
        self.allow_loopback_peers = allow_loopback_peers
        self.stale_nonce = stale_nonce
        # TURN REST API (use-auth-secret): time-limited credentials derived from this
        # secret instead of the static users.
        self.auth_secret = auth_secret
        self.binary = binary
        self.prefix = list(prefix)
        self._popen = popen
        self.run_as = run_as
        self.start_timeout = start_timeout
        # TURN over TLS on this port, with a self-signed certificate made at start.
        self.tls_port = tls_port
        self.proc: subprocess.Popen[Any] | None = None
        self._dir: Path | None = None
        self._log: IO[bytes] | None = None
        self._final_log = ""

    # -- addresses and logs -------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        if self.port is None:
            raise CoturnError("coturn has not been started")
        return (self.listen_ip, self.port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        """coturn's output so far (kept after stop() for post-mortems)."""
        if self._dir is None or not (self._dir / "turnserver.log").exists():
            return self._final_log
        return (self._dir / "turnserver.log").read_text(errors="replace")

    # -- config -------------------------------------------------------------------------------------

    def config_text(self) -> str:
        assert self.port is not None and self._dir is not None
        lines = [
            f"listening-ip={self.listen_ip}",
            f"listening-port={self.port}",
            f"relay-ip={self.relay_ip}",
            f"realm={self.realm}",
            *(["use-auth-secret", f"static-auth-secret={self.auth_secret}"]
              if self.auth_secret else ["lt-cred-mech"]),
            "fingerprint",
            "no-cli",
            *([f"tls-listening-port={self.tls_port}", f"cert={self._dir / 'cert.pem'}",
               f"pkey={self._dir / 'key.pem'}"] if self.tls_port else ["no-tls"]),
            "no-dtls",
            "log-file=stdout",
            "simple-log",
            "no-multicast-peers",
            # Our own files, not the system's /var/lib/turn/turndb or /var/run pid file.
            f"userdb={self._dir / 'turndb'}",
            f"pidfile={self._dir / 'turnserver.pid'}",
        ]
        if self.min_port is not None:
            lines += [f"min-port={self.min_port}", f"max-port={self.max_port}"]
        if not self.udp:
            lines.append("no-udp")
        if not self.tcp:
            lines.append("no-tcp")
        if self.allow_loopback_peers:
            lines.append("allow-loopback-peers")
        lines += [f"allowed-peer-ip={ip}" for ip in self.allowed_peer_ips]
        if self.stale_nonce is not None:
            lines.append(f"stale-nonce={self.stale_nonce}")
        for user, password in (self.users.items() if not self.auth_secret else ()):
            if ":" in user or any(c in user + password for c in "\n\r"):
                raise ValueError(f"user name or password unusable in a coturn config: {user!r}")
            lines.append(f"user={user}:{password}")
        return "\n".join(lines) + "\n"

    def _argv(self, conf: Path) -> list[str]:
        argv = [self.binary, "-c", str(conf), *self.extra_args]
        account = self._account()
        if account is not None:
            # setpriv execs coturn, so the pid we hold is coturn's own.
            argv = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups", *argv]
        return [*self.prefix, *argv]

    def _account(self) -> pwd.struct_passwd | None:
        """The user coturn drops to: only when we are root (otherwise we already are not)."""
        if os.geteuid() != 0 or self.run_as is None:
            return None
        if shutil.which("setpriv") is None:
            raise CoturnError("running as root but setpriv is missing: cannot drop privileges")
        try:
            return pwd.getpwnam(self.run_as)
        except KeyError as exc:
            raise CoturnError(f"user {self.run_as!r} does not exist (is the coturn package installed?)") from exc

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> Coturn:
        """Start and wait (at most `start_timeout`) until a STUN Binding gets an answer."""
        if self.proc is not None:
            raise CoturnError("already started")
        ok, why = coturn_available(self.binary)
        if not ok:
            raise CoturnError(why)
        if self.port is None:
            # Inside a lab namespace the address is not ours to probe from here, and the
            # namespace is fresh: the standard port is free there.
            self.port = 3478 if (self.prefix or self._popen) else _free_port(self.listen_ip)
        self._dir = Path(tempfile.mkdtemp(prefix="macula-coturn-"))
        conf = self._dir / "turnserver.conf"
        conf.write_text(self.config_text())
        owned = [conf]
        if self.tls_port:
            from macula.gateway.stream_listener import self_signed_pem

            cert_pem, key_pem = self_signed_pem("macula-lab-turn")
            (self._dir / "cert.pem").write_bytes(cert_pem)
            (self._dir / "key.pem").write_bytes(key_pem)
            os.chmod(self._dir / "key.pem", 0o600)
            owned += [self._dir / "cert.pem", self._dir / "key.pem"]
        account = self._account()
        if account is not None:
            # coturn writes its pid file and user db here after dropping to that user.
            os.chown(self._dir, account.pw_uid, account.pw_gid)
            for path in owned:
                os.chown(path, account.pw_uid, account.pw_gid)
        self._log = open(self._dir / "turnserver.log", "wb")
        popen = self._popen or subprocess.Popen
        self.proc = popen(
            self._argv(conf),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our own process group, so stop() can reach all of it
        )
        _running.add(self)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise CoturnError(f"turnserver exited with {self.proc.returncode}:\n{self._log_tail()}")
            if self._probe(min(0.2, max(0.01, deadline - time.monotonic()))):
                return
            time.sleep(0.02)  # bounded poll of a child process: there is no event to wait on
        raise CoturnError(
            f"turnserver did not answer STUN on {self.listen_ip}:{self.port} within "
            f"{self.start_timeout} s:\n{self._log_tail()}"
        )

    def _probe(self, timeout: float) -> bool:
        assert self.port is not None
        tcp = not self.udp
        if not self.prefix and self._popen is None:
            return stun_probe(self.listen_ip, self.port, timeout, tcp=tcp)
        argv = [sys.executable, "-c", _PROBE_CODE, __file__, self.listen_ip, str(self.port), str(timeout), "1" if tcp else "0"]
        popen = self._popen or subprocess.Popen
        child = popen([*self.prefix, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            return child.wait(timeout + 5.0) == 0
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            return False

    def _log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, timeout: float = 3.0) -> None:
        """Terminate coturn (SIGTERM, then SIGKILL after `timeout`) and remove its files."""
        _running.discard(self)
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            self._final_log = self.log()
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @staticmethod
    def _signal(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
        # The group is the one start_new_session made for this very child.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            proc.send_signal(sig)

    def __enter__(self) -> Coturn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Coturn:
        # start() blocks on the readiness probe: keep the event loop free meanwhile.
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop(timeout=1.0)
