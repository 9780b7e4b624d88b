"""Run the fuzz targets: every oracle in fuzz/oracles.py for N inputs each.

    python fuzz/run.py [--runs 100000] [--engine auto|atheris|hypothesis] [target ...]

With atheris (coverage-guided libFuzzer; `pip install -e '.[fuzz]'`), each target runs in
its own process with macula and aioice instrumented, starting from the oracle's seeds plus
the corpus earlier runs grew under build/fuzz/corpus/<target>/; a crashing input is saved
as build/fuzz/artifacts/<target>-crash-<sha1>. Without atheris (no wheel for this Python,
say) the same oracles run under hypothesis for the same number of inputs. Exit status 0
means no target found anything; the per-target counts and times are printed and written
to build/fuzz/report.json.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE.parent / "build" / "fuzz"


@dataclass
class Result:
    target: str
    engine: str
    inputs: int
    seconds: float
    outcome: str  # ok, finding, skipped
    detail: str = ""


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    import oracles  # not instrumented here: the parent only plans and reports

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=f"default: all ({', '.join(oracles.ORACLES)})")
    parser.add_argument("--runs", type=int, default=100_000, help="inputs per target")
    parser.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    args = parser.parse_args(argv)
    unknown = [t for t in args.targets if t not in oracles.ORACLES]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}")
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if importlib.util.find_spec("atheris") else "hypothesis"
        if engine == "hypothesis":
            print("atheris is not installed: running the oracles under hypothesis instead")

    results = []
    for name in args.targets or list(oracles.ORACLES):
        reason = oracles.unavailable(name)
        if reason is not None:
            result = Result(name, engine, 0, 0.0, "skipped", reason)
        elif engine == "atheris":
            result = _run_atheris(name, args.runs, oracles)
        else:
            result = _run_hypothesis(name, args.runs, oracles)
        results.append(result)
        print(f"{result.target:<20} {result.engine:<10} {result.inputs:>9} inputs "
              f"{result.seconds:>8.1f} s  {result.outcome} {result.detail}", flush=True)

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.json").write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    findings = [r for r in results if r.outcome == "finding"]
    print(f"\n{len(results)} targets, {sum(r.inputs for r in results)} inputs, "
          f"{sum(r.seconds for r in results):.0f} s, "
          f"{len(findings)} with findings" + (": " + ", ".join(r.target for r in findings)
                                             if findings else ""))
    return 1 if findings else 0


# ---------------------------------------------------------------- atheris
def _run_atheris(name: str, runs: int, oracles) -> Result:
    corpus = OUT / "corpus" / name
    artifacts = OUT / "artifacts"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    for seed in oracles.seeds(name):
        (corpus / f"seed-{hashlib.sha1(seed).hexdigest()[:12]}").write_bytes(seed)
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", name,
               f"-runs={runs}", f"-max_len={oracles.MAX_LEN[name]}", "-timeout=10",
               "-rss_limit_mb=2048", "-print_final_stats=1",
               f"-artifact_prefix={artifacts}/{name}-", str(corpus)]
    scratch = oracles.scratch_dir()
    began = time.monotonic()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, errors="replace",
                              env={**os.environ, oracles.SCRATCH_ENV: str(scratch)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.monotonic() - began
    log = proc.stdout + proc.stderr
    (OUT / f"{name}.log").write_text(log)
    executed = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    inputs = int(executed.group(1)) if executed else 0
    if proc.returncode != 0 or inputs < runs:
        crash = re.search(r"Test unit written to (\S+)", log)
        detail = crash.group(1) if crash else f"exit {proc.returncode}; see {OUT / name}.log"
        return Result(name, "atheris", inputs, seconds, "finding", detail)
    return Result(name, "atheris", inputs, seconds, "ok")


def _child(name: str, libfuzzer_args: list[str]) -> None:
    import atheris

    sys.path.insert(0, str(HERE))
    with atheris.instrument_imports(include=["macula", "aioice"]):
        import oracles
    oracle = oracles.ORACLES[name]
    atheris.Setup([sys.argv[0], *libfuzzer_args], oracle)
    atheris.Fuzz()


# ---------------------------------------------------------------- hypothesis
def _run_hypothesis(name: str, runs: int, oracles) -> Result:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    seeds = oracles.seeds(name)
    inputs = st.one_of(
        st.binary(max_size=oracles.MAX_LEN[name]),
        st.sampled_from(seeds).flatmap(lambda seed: _mutations(st, seed)),
    )
    count = 0

    @settings(max_examples=runs, deadline=None, database=None, derandomize=False,
              phases=(Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck))
    @given(inputs)
    def run(data: bytes) -> None:
        nonlocal count
        count += 1
        oracles.ORACLES[name](data)

    began = time.monotonic()
    try:
        run()
    except Exception as exc:  # hypothesis printed the shrunk counterexample
        return Result(name, "hypothesis", count, time.monotonic() - began, "finding",
                      f"{type(exc).__name__}: {str(exc)[:300]}")
    return Result(name, "hypothesis", count, time.monotonic() - began, "ok")


def _mutations(st, seed: bytes):
    """A seed with a few bytes overwritten, cut short or extended."""
    edits = st.lists(st.tuples(st.integers(0, max(len(seed) - 1, 0)), st.integers(0, 255)),
                     max_size=6)
    tail = st.one_of(st.just(b""), st.binary(max_size=64))
    cut = st.integers(0, len(seed))

    def apply(parts) -> bytes:
        changes, end, extra = parts
        data = bytearray(seed)
        for index, value in changes:
            if index < len(data):
                data[index] = value
        return bytes(data[:end]) + extra

    return st.tuples(edits, cut, tail).map(apply)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(main())
