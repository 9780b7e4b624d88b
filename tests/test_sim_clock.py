"""The virtual-time event loop: time jumps, timer order, limits, determinism."""

from __future__ import annotations

import asyncio
import functools
import random
import time

import pytest

from macula_lab.sim import (
    SimulationLimitExceeded,
    SimulationStalled,
    new_virtual_loop,
    run_simulation,
)


def test_hour_long_sleep_takes_no_wall_time() -> None:
    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(3600)
        return start, loop.time()

    wall = time.perf_counter()
    start, end = run_simulation(main, seed=1)
    assert time.perf_counter() - wall < 0.5
    assert end - start == pytest.approx(3600.0, abs=1e-6)


def test_timers_fire_in_time_order_at_their_virtual_times() -> None:
    async def main() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        fired: list[tuple[str, float]] = []
        for name, delay in [("c", 3.0), ("a", 1.0), ("d", 10.0), ("b", 2.5)]:
            loop.call_later(delay, lambda n=name: fired.append((n, loop.time())))
        await asyncio.sleep(11)
        return fired

    fired = run_simulation(main, seed=1)
    assert [name for name, _ in fired] == ["a", "b", "c", "d"]
    assert [t for _, t in fired] == pytest.approx([1.0, 2.5, 3.0, 10.0])


def test_concurrent_sleepers_interleave_by_virtual_time() -> None:
    async def sleeper(name: str, period: float, log: list[str]) -> None:
        for _ in range(3):
            await asyncio.sleep(period)
            log.append(name)

    async def main() -> list[str]:
        log: list[str] = []
        await asyncio.gather(sleeper("slow", 1.0, log), sleeper("fast", 0.4, log))
        return log

    # fast: 0.4 0.8 1.2; slow: 1.0 2.0 3.0
    assert run_simulation(main, seed=1) == ["fast", "fast", "slow", "fast", "slow", "slow"]


def test_wait_for_times_out_in_virtual_time() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        never: asyncio.Future[None] = loop.create_future()
        start = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(never, timeout=30.0)
        return loop.time() - start

    assert run_simulation(main, seed=1) == pytest.approx(30.0)


def test_time_limit_stops_a_runaway_program() -> None:
    async def forever() -> None:
        while True:
            await asyncio.sleep(60)

    with pytest.raises(SimulationLimitExceeded, match="virtual time limit"):
        run_simulation(forever, seed=1, time_limit=600)


def test_iteration_limit_stops_a_busy_loop() -> None:
    async def spin() -> None:
        while True:
            await asyncio.sleep(0)

    with pytest.raises(SimulationLimitExceeded, match="iteration limit"):
        run_simulation(spin, seed=1, max_iterations=10_000)


def test_deadlock_is_reported_not_hung() -> None:
    async def deadlock() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(SimulationStalled, match="deadlock"):
        run_simulation(deadlock, seed=1, stall_timeout=0.01)


def test_abort_cancels_leftover_tasks_and_closes_cleanly() -> None:
    cleaned: list[bool] = []

    async def background() -> None:
        try:
            await asyncio.sleep(10_000)
        finally:
            cleaned.append(True)

    async def main() -> None:
        asyncio.get_running_loop().create_task(background())
        await asyncio.sleep(10_000)

    with pytest.raises(SimulationLimitExceeded):
        run_simulation(main, seed=1, time_limit=100)
    assert cleaned == [True]


def test_thread_wakeups_still_work() -> None:
    async def main() -> int:
        return await asyncio.get_running_loop().run_in_executor(None, lambda: 41 + 1)

    assert run_simulation(main, seed=1) == 42


def test_global_random_is_seeded_for_the_run_and_restored() -> None:
    async def draw() -> list[float]:
        return [random.random() for _ in range(3)]

    before = random.getstate()
    first = run_simulation(draw, seed=7)
    assert random.getstate() == before
    assert run_simulation(draw, seed=7) == first
    assert run_simulation(draw, seed=8) != first


def test_usable_as_an_asyncio_runner_loop_factory() -> None:
    async def main() -> float:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(120)
        return loop.time()

    factory = functools.partial(new_virtual_loop, seed=3)
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(main()) == pytest.approx(120.0)


def test_random_timer_workload_is_deterministic() -> None:
    async def main() -> list[tuple[int, float]]:
        loop = asyncio.get_running_loop()
        rng = random.Random(99)
        log: list[tuple[int, float]] = []

        async def worker(n: int) -> None:
            for _ in range(20):
                await asyncio.sleep(rng.expovariate(10.0))
                log.append((n, loop.time()))

        await asyncio.gather(*(worker(n) for n in range(10)))
        return log

    first = run_simulation(main, seed=5)
    assert len(first) == 200
    assert run_simulation(main, seed=5) == first
