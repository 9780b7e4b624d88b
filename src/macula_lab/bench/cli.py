"""`macula bench [--quick] [--json] [--png DIR]`: every case, ours beside theirs.

The command always exits 0 once it has measured: goals that are not met are findings, not
failures. With --json the LAST line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from macula_lab.bench.report import DEFAULT_RELAY_PRICE_PER_GB


def add_bench_parser(sub: Any, add_common: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks beside raw aioquic, coturn and aioice")
    add_common(p)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="smaller runs (1-2 minutes here; what `make bench` runs)")
    size.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tests' size
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument("--png", metavar="DIR", help="draw the figures into DIR")
    p.add_argument("--profile", metavar="DIR",
                   help="also profile the direct and relay cases (pstats files into DIR)")
    p.add_argument("--relay-price-per-gb", type=float, metavar="PRICE",
                   default=DEFAULT_RELAY_PRICE_PER_GB,
                   help="what a relayed GB costs you, for the monthly cost figure (default "
                        f"{DEFAULT_RELAY_PRICE_PER_GB}, a typical cloud egress price)")
    p.add_argument("--qh3-python", metavar="PATH",
                   help="an interpreter with qh3 installed: adds the qh3 vs aioquic case")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from macula_lab.bench.config import MODES
    from macula_lab.bench.report import summary
    from macula_lab.bench.runner import run_bench

    config = MODES["tiny" if args.tiny else "quick" if args.quick else "full"]
    out = sys.stderr if args.json else sys.stdout
    flags = [f for f, on in (("--quick", args.quick), ("--tiny", args.tiny), ("--json", args.json))
             if on]
    result = run_bench(config, qh3_python=args.qh3_python, profile_dir=args.profile,
                       command=" ".join(["macula bench", *flags]),
                       relay_price_per_gb=args.relay_price_per_gb,
                       progress=lambda line: print(line, file=out, flush=True))
    if args.png:
        from macula_lab.bench.plots import draw

        try:
            for path in draw(result, args.png):
                print(f"drew {path}", file=out)
        except Exception as exc:  # a missing matplotlib must not lose the measurement
            result["errors"]["png"] = f"{type(exc).__name__}: {exc}"
    print(summary(result), file=out, flush=True)
    if args.json:
        print(json.dumps(result, default=str), flush=True)
    return 0
