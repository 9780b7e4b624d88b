"""Virtual time for asyncio: an event loop whose clock jumps instead of sleeping.

`loop.time()` returns a virtual clock. When the loop has nothing ready and would block until
its next timer, the clock jumps straight to that timer. Everything built on asyncio timers
(asyncio.sleep, wait_for, asyncio.timeout, call_later, aioquic's loss/idle timers fed by
`loop.time()`) therefore runs in virtual time: deterministic and as fast as the CPU allows.

The loop is a normal SelectorEventLoop with a wrapping selector, so thread-safe wakeups
(call_soon_threadsafe, run_in_executor) still work; virtual time simply does not wait for
them while timers are pending. Real sockets are not meant to be used on this loop.
"""

from __future__ import annotations

import asyncio
import random
import selectors
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

# A day of virtual time: far beyond any single test, small enough to stop a runaway retry loop.
DEFAULT_TIME_LIMIT = 24 * 3600.0
DEFAULT_MAX_ITERATIONS = 5_000_000
# Real seconds to wait for another thread when no timer is pending before calling it a stall.
DEFAULT_STALL_TIMEOUT = 2.0


class SimulationError(RuntimeError):
    """The simulation could not run to completion."""


class SimulationLimitExceeded(SimulationError):
    """The virtual time limit or the loop iteration limit was reached: a runaway program."""


class SimulationStalled(SimulationError):
    """Nothing is scheduled and the main coroutine is still waiting: it can never finish."""


class _VirtualSelector(selectors.BaseSelector):
    """Delegates registrations to a real selector; `select(timeout)` polls it without
    blocking and then advances the virtual clock by `timeout` instead of sleeping."""

    def __init__(self) -> None:
        self._real = selectors.DefaultSelector()
        self.loop: VirtualTimeLoop | None = None

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def get_map(self) -> Any:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        # Wakeups from other threads (the loop's self-pipe) take priority over jumping ahead.
        events = self._real.select(0)
        if events:
            return events
        loop = self.loop
        assert loop is not None
        if timeout is None:
            # No timer and nothing ready: only another thread could still make progress.
            events = self._real.select(loop.stall_timeout)
            if not events:
                raise SimulationStalled(
                    f"simulation stalled at virtual t={loop.time():.6f}s: no timers pending "
                    "and the main coroutine is still waiting (deadlock)"
                )
            return events
        if timeout > 0:
            loop._advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio event loop running on a virtual clock.

    `time_limit` is the virtual duration after which the run is aborted with
    SimulationLimitExceeded; `max_iterations` bounds loop iterations (catches busy loops such
    as `while True: await asyncio.sleep(0)` that never let virtual time move).
    """

    def __init__(
        self,
        *,
        start_time: float = 0.0,
        time_limit: float | None = DEFAULT_TIME_LIMIT,
        max_iterations: int | None = DEFAULT_MAX_ITERATIONS,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        seed: int | None = None,
    ) -> None:
        selector = _VirtualSelector()
        self._now = float(start_time)
        self._start_time = float(start_time)
        self._deadline = None if time_limit is None else self._start_time + time_limit
        self._max_iterations = max_iterations
        self._iterations = 0
        self.stall_timeout = stall_timeout
        # The seed the simulation was started with, for components that want to derive theirs.
        self.seed = seed
        super().__init__(selector)
        selector.loop = self
        # The clock jumps exactly to the next timer, so no resolution slack is needed beyond
        # float rounding in `now + (when - now)`.
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._now

    @property
    def iterations(self) -> int:
        return self._iterations

    @property
    def elapsed(self) -> float:
        """Virtual seconds since the loop was created."""
        return self._now - self._start_time

    def extend_limits(self, *, time: float = 0.0, iterations: int = 0) -> None:
        """Give a finishing program more room (used to let tasks unwind after an abort)."""
        if self._deadline is not None:
            self._deadline = max(self._deadline, self._now) + time
        if self._max_iterations is not None:
            self._max_iterations = max(self._max_iterations, self._iterations) + iterations

    def _advance(self, delta: float) -> None:
        target = self._now + delta
        if self._deadline is not None and target > self._deadline:
            # Leave the clock at the limit so the error reports where time ran out.
            self._now = max(self._now, self._deadline)
            raise SimulationLimitExceeded(
                f"virtual time limit reached: the next timer is at t={target:.6f}s, "
                f"past the limit t={self._deadline:.6f}s"
            )
        self._now = target

    def _run_once(self) -> None:
        self._iterations += 1
        if self._max_iterations is not None and self._iterations > self._max_iterations:
            raise SimulationLimitExceeded(
                f"loop iteration limit ({self._max_iterations}) reached at virtual "
                f"t={self._now:.6f}s: a busy loop that never lets time advance?"
            )
        super()._run_once()


def new_virtual_loop(
    *,
    seed: int | None = None,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    max_iterations: int | None = DEFAULT_MAX_ITERATIONS,
) -> VirtualTimeLoop:
    """A fresh virtual-time loop (usable as `asyncio.Runner(loop_factory=...)` via partial)."""
    return VirtualTimeLoop(seed=seed, time_limit=time_limit, max_iterations=max_iterations)


def _cancel_leftovers(loop: VirtualTimeLoop) -> None:
    # Same clean-up asyncio.run does, with bounded room for tasks to unwind.
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.extend_limits(time=60.0, iterations=100_000)
    try:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    except SimulationError:
        return
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception during simulation shutdown",
                    "exception": task.exception(),
                    "task": task,
                }
            )


def run_simulation(
    coro_factory: Callable[[], Awaitable[T]],
    *,
    seed: int,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    max_iterations: int | None = DEFAULT_MAX_ITERATIONS,
    stall_timeout: float = DEFAULT_STALL_TIMEOUT,
) -> T:
    """Run `coro_factory()` to completion on a fresh virtual-time loop and close the loop.

    The global `random` module is seeded with `seed` for the run (and restored afterwards),
    so application code that jitters timers with `random` is deterministic too. Raises
    SimulationLimitExceeded / SimulationStalled instead of hanging.
    """
    loop = VirtualTimeLoop(
        seed=seed, time_limit=time_limit, max_iterations=max_iterations, stall_timeout=stall_timeout
    )
    saved_random = random.getstate()
    random.seed(seed)
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_as_coroutine(coro_factory))
    finally:
        try:
            _cancel_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        except SimulationError:
            pass
        finally:
            # As asyncio.run does: leave no loop behind as the thread's current one.
            asyncio.set_event_loop(None)
            random.setstate(saved_random)
            loop.close()


async def _as_coroutine(coro_factory: Callable[[], Awaitable[T]]) -> T:
    # Create the coroutine inside the loop so factories may call get_running_loop().
    return await coro_factory()
