"""`macula lab ...`: the NAT pair matrix, chaos faults and the soak, in the simulator or
the kernel lab."""

from __future__ import annotations

import argparse
import json
import sys

from macula_lab.kernel.nat_rules import KERNEL_ONLY_PRESETS
from macula_lab.sim.presets import PRESETS, SYMMETRIC_VARIANTS, TCP_PRESETS


def add_lab_parser(sub, add_common) -> None:
    lab = sub.add_parser("lab", help="NAT lab: simulator and kernel network namespaces")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)
    p = lab_sub.add_parser("matrix", help="every pair of NAT presets, N trials each")
    add_common(p)
    p.add_argument("--kernel", action="store_true",
                   help="real NATs in network namespaces (root) instead of the simulator")
    p.add_argument("--nat", metavar="LIST", default=",".join(PRESETS),
                   help=f"comma-separated presets (default: {','.join(PRESETS)})")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--latency-ms", type=float, default=0.0, help="one-way latency per NAT uplink")
    p.add_argument("--loss", type=float, default=0.0, help="loss probability per NAT uplink")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--messages", type=int, default=200, help="messages each way per trial")
    p.add_argument("--strategy", default="opportunistic",
                   choices=["always_relay", "opportunistic", "direct_only"])
    p.add_argument("--turn", action="store_true",
                   help="run a TURN server beside the gateway (coturn in the kernel lab, the "
                        "built-in one in the simulator) and offer it to both nodes")
    p.add_argument("--hard-nat", action=argparse.BooleanOptionalAction, default=True,
                   help="hard-NAT traversal in both nodes (port prediction and birthday "
                        "probing against symmetric NATs): on, as shipped; --no-hard-nat "
                        "turns it off")
    p.add_argument("--one-ip", action="store_true",
                   help="kernel lab: the gateway on one IP only, as most deployments (NAT "
                        "discovery then has the alternate port, not a second address)")
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument("--png", metavar="FILE", help="draw the grid")
    p.set_defaults(func=cmd_matrix)
    add_chaos_parsers(lab_sub, add_common)


def _presets(text: str, *, kernel: bool = False) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    # Presets whose router runs a real UPnP/NAT-PMP/PCP daemon, or routes IPv6 through a
    # stateful firewall, exist only in the kernel lab; the gentler symmetric NATs only in
    # the simulator.
    known = PRESETS + TCP_PRESETS + (KERNEL_ONLY_PRESETS if kernel else SYMMETRIC_VARIANTS)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"macula: error: unknown NAT preset(s) {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(known)}")
    return names


def cmd_matrix(args: argparse.Namespace) -> int:
    from macula_lab.matrix import draw_png, format_grid, run_matrix
    from macula_lab.sim_trial import TrialOptions

    presets = _presets(args.nat, kernel=args.kernel)
    if args.trials < 1 or args.messages < 1:
        raise SystemExit("macula: error: --trials and --messages must be at least 1")
    if not 0.0 <= args.loss < 1.0:
        raise SystemExit("macula: error: --loss must be in [0, 1)")
    options = TrialOptions(latency_ms=args.latency_ms, loss=args.loss, messages=args.messages,
                           strategy=args.strategy, turn=args.turn, hard_nat=args.hard_nat,
                           one_ip=args.one_ip)
    out = sys.stderr if args.json else sys.stdout
    if args.kernel:
        from macula_lab.kernel_trial import KernelMatrix

        with KernelMatrix(options) as backend:
            result = run_matrix(presets, args.trials, backend.run_trial,
                                progress=lambda line: print(line, file=out, flush=True))
        backend_name = "kernel"
    else:
        from macula_lab.sim_trial import run_sim_trial

        result = run_matrix(
            presets, args.trials,
            lambda a, b, t: run_sim_trial(a, b, t, args.seed, options),
            progress=lambda line: print(line, file=out, flush=True))
        backend_name = "simulator"
    result["summary"].update({"backend": backend_name, "latency_ms": args.latency_ms,
                              "loss": args.loss, "seed": args.seed, "strategy": args.strategy,
                              "turn_server": args.turn, "hard_nat": args.hard_nat,
                              "messages": args.messages, "one_ip": args.one_ip})
    print(format_grid(result, presets), file=out)
    if args.png:
        draw_png(result, presets, args.png,
                 f"macula NAT matrix ({backend_name}, {args.latency_ms} ms/uplink"
                 + (", TURN" if args.turn else "") + (", hard-NAT" if args.hard_nat else "")
                 + ")")
        print(f"grid drawn to {args.png}", file=out)
    if args.json:
        print(json.dumps(result))
    ok = result["summary"]["connected"] == result["summary"]["trials"]
    return 0 if ok else 1


def add_chaos_parsers(lab_sub, add_common) -> None:
    from macula_lab.faults import FAULTS

    p = lab_sub.add_parser("chaos", help="inject faults under a live stream; did it recover?")
    add_common(p)
    p.add_argument("--kernel", action="store_true",
                   help="real NATs, gateway and coturn in network namespaces (root)")
    p.add_argument("--fault", metavar="NAME", action="append", choices=list(FAULTS),
                   help=f"run only this fault (repeatable): {', '.join(FAULTS)}")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=cmd_chaos)

    p = lab_sub.add_parser("soak", help="many nodes, mixed NATs, churn; loss and gateway RSS")
    add_common(p)
    p.add_argument("--minutes", type=float, default=1.0,
                   help="measured minutes, after a warm-up (virtual unless --kernel)")
    p.add_argument("--nodes", type=int, default=12, help="ring slots (nodes online at once)")
    p.add_argument("--kernel", action="store_true",
                   help="each node in its own namespace behind a real NAT (root)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=cmd_soak)

    p = lab_sub.add_parser("cluster", help="a gateway cluster on one directory: sessions "
                                           "across gateways, a gateway killed or drained, "
                                           "the directory down")
    add_common(p)
    p.add_argument("--gateways", type=int, default=3)
    p.add_argument("--nodes", type=int, default=24, help="an even number: they pair up")
    p.add_argument("--kernel", action="store_true",
                   help="gateways and redis-server in a namespace, nodes behind real NATs "
                        "(root)")
    p.add_argument("--kill", type=int, default=0, metavar="K",
                   help="kill K gateways halfway (no goodbye): their nodes re-home")
    p.add_argument("--drain", type=int, default=0, metavar="K",
                   help="drain K gateways halfway: their nodes move, then they exit")
    p.add_argument("--redis-down", type=float, default=0.0, metavar="SECONDS",
                   help="take the directory away halfway (a restart: it comes back empty)")
    p.add_argument("--latency-ms", type=float, default=10.0,
                   help="one-way latency per node uplink")
    p.add_argument("--duration", type=float, default=12.0,
                   help="seconds each session streams (virtual unless --kernel)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.set_defaults(func=cmd_cluster)


def cmd_chaos(args: argparse.Namespace) -> int:
    from macula_lab.chaos import run_chaos
    from macula_lab.faults import FAULTS

    names = list(dict.fromkeys(args.fault or FAULTS))
    out = sys.stderr if args.json else sys.stdout
    result = run_chaos(names, kernel=args.kernel, seed=args.seed,
                       progress=lambda line: print(line, file=out, flush=True))
    failed = [row["fault"] for row in result["faults"] if not row["recovered"]]
    print(f"{len(names) - len(failed)}/{len(names)} faults recovered"
          + (f"; not: {', '.join(failed)}" if failed else ""), file=out)
    if args.json:
        print(json.dumps(result))
    return 0 if not failed else 1


def cmd_cluster(args: argparse.Namespace) -> int:
    from macula_lab.cluster import ClusterOptions, cluster_ok, run_sim_cluster, summary_line

    try:
        options = ClusterOptions(gateways=args.gateways, nodes=args.nodes, kill=args.kill,
                                 drain=args.drain, redis_down=args.redis_down,
                                 latency_ms=args.latency_ms, duration=args.duration,
                                 seed=args.seed)
    except ValueError as exc:
        print(f"macula: error: {exc}", file=sys.stderr)
        return 2
    if args.kernel:
        from macula_lab.kernel_cluster import run_kernel_cluster

        result = run_kernel_cluster(options, progress=lambda line: print(
            line, file=sys.stderr if args.json else sys.stdout, flush=True))
    else:
        result = run_sim_cluster(options)
    print(summary_line(result), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result))
    return 0 if cluster_ok(result) else 1


def cmd_soak(args: argparse.Namespace) -> int:
    from macula_lab.soak import run_soak
    from macula_lab.soak_plan import format_soak, soak_ok

    if args.minutes <= 0 or args.nodes < 2:
        print("macula: error: --minutes must be > 0 and --nodes at least 2", file=sys.stderr)
        return 2
    out = sys.stderr if args.json else sys.stdout
    result = run_soak(minutes=args.minutes, nodes=args.nodes, kernel=args.kernel,
                      seed=args.seed, progress=lambda line: print(line, file=out, flush=True))
    print(format_soak(result), file=out)
    if args.json:
        print(json.dumps(result))
    return 0 if soak_ok(result) else 1
