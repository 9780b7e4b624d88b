"""Flush the conntrack table of the namespace we run in, over ctnetlink (`conntrack -F`).

The lab needs this for NAT rebinding faults, and the conntrack tool is not installed on
the machines we run on, while ctnetlink is in every kernel that has conntrack. Run inside
a lab namespace:

    ip netns exec NS python -m macula_lab.kernel.conntrack flush

It prints {"flushed": true} (or {"error": ...}) and exits 0 (1).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big endian on the wire)


def flush_request(family: int = socket.AF_INET, seq: int = 1) -> bytes:
    """A CT_DELETE without attributes: the kernel reads it as "delete every entry"."""
    body = _NFGENMSG.pack(family, 0, 0)
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK,
                          seq, 0) + body


def flush(family: int = socket.AF_INET, timeout: float = 2.0) -> None:
    """Flush this namespace's conntrack table; raises OSError with the kernel's errno."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.send(flush_request(family))
        answer = sock.recv(4096)
    if len(answer) < _NLMSGHDR.size + 4:
        raise OSError(0, "short netlink answer")
    _, kind, _, _, _ = _NLMSGHDR.unpack_from(answer)
    if kind == NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", answer, _NLMSGHDR.size)
        if error:
            raise OSError(-error, os.strerror(-error))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["flush"]:
        print(json.dumps({"error": "usage: python -m macula_lab.kernel.conntrack flush"}))
        return 2
    try:
        flush()
    except OSError as exc:
        print(json.dumps({"error": f"conntrack flush failed: {exc}"}))
        return 1
    print(json.dumps({"flushed": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
