"""The eager path (issue 13 item 1): an idle engine applies a notification in the
caller's own callback, with no task; under load notifications queue and coalesce."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from indicators.adapters import AdapterModel, build_model
from indicators.config import RetryPolicy, parse_config
from indicators.daemon.eventfds import EventfdSources
from indicators.engine import EAGER_STREAK, Engine, EngineEvent
from indicators.memop import CmpxchgResult, EmulatedBackend, MemopBackend, TransientError
from indicators.sinks import QueueSink

MEMORY = 1 << 16
FAST = RetryPolicy(eagain_backoff_base=1e-6, eagain_backoff_cap=1e-5)


def make() -> tuple[AdapterModel, EmulatedBackend]:
    device = {"name": "d", "kind": "virtio-ccw", "summary_indicator": 0x100,
              "device_indicator": 0x200, "vectors": 64}  # fmt: skip
    config = parse_config(
        {"backend": {"kind": "emulated", "memory_size": MEMORY}, "devices": [device]}
    )
    return build_model(config), EmulatedBackend(MEMORY)


class EagainOnce(MemopBackend):
    """Forwards to ``inner``, but the first cmpxchg reports ``-EAGAIN`` (a busy
    neighbour): the batch in flight has to wait and back off."""

    def __init__(self, inner: EmulatedBackend) -> None:
        self.inner = inner
        self.armed = True

    def cmpxchg(
        self, gaddr: int, size: int, old: int, new: int, key: int | None = None
    ) -> CmpxchgResult:
        if self.armed:
            self.armed = False
            raise TransientError(gaddr=gaddr, size=size, key=key, old=old)
        return self.inner.cmpxchg(gaddr, size, old, new, key)

    def check(self, gaddr: int, size: int, key: int | None = None, *, store: bool = True) -> None:
        self.inner.check(gaddr, size, key, store=store)

    def read(self, gaddr: int, size: int, key: int | None = None) -> bytes:
        return self.inner.read(gaddr, size, key)

    def write(self, gaddr: int, data: bytes, key: int | None = None) -> None:
        self.inner.write(gaddr, data, key)


def record_tasks(engine: Engine) -> list[tuple[str, asyncio.Task[Any] | None]]:
    """Which task (None: a plain callback) each engine event was emitted from."""
    seen: list[tuple[str, asyncio.Task[Any] | None]] = []

    def listener(event: EngineEvent) -> None:
        seen.append((event.kind, asyncio.current_task()))

    engine.subscribe(listener)
    return seen


# ------------------------------------------------------------ idle: at once


async def test_idle_engine_applies_in_the_callers_callback_without_a_task() -> None:
    model, backend = make()
    sink = QueueSink()
    engine = Engine(model, backend, sink)
    emitted = record_tasks(engine)
    seen: dict[str, Any] = {}
    done = asyncio.Event()

    def callback() -> None:  # a plain loop callback, like an eventfd reader
        before = asyncio.all_tasks()
        seen["outcome"] = engine.notify_nowait([("d", 2)])
        # Still inside the callback: no other loop iteration has run.
        seen["dsci"], seen["summary"] = backend.read(0x200, 1), backend.read(0x100, 1)
        seen["interrupts"] = sink.count[3]
        seen["new tasks"] = asyncio.all_tasks() - before
        done.set()

    asyncio.get_running_loop().call_soon(callback)
    await asyncio.wait_for(done.wait(), 10)
    assert seen["outcome"] == [None], "a completed outcome, not a future"
    assert (seen["dsci"], seen["summary"], seen["interrupts"]) == (b"\x20", b"\x01", 1)
    assert seen["new tasks"] == set()
    assert emitted == [("interrupt", None)], "the interrupt was decided in the callback"
    assert engine.stats.applied == 1 and engine.stats.latency.count == 1


async def test_awaited_notify_on_an_idle_engine_never_suspends() -> None:
    model, backend = make()
    engine = Engine(model, backend, QueueSink())
    coro = engine.notify("d", 9)
    with pytest.raises(StopIteration):  # finished in its first step
        coro.send(None)
    assert backend.read(0x201, 1) == b"\x40"


async def test_an_eventfd_write_is_applied_in_the_reader_callback() -> None:
    model, backend = make()
    engine = Engine(model, backend, QueueSink())
    emitted = record_tasks(engine)
    interrupted = asyncio.Event()
    engine.subscribe(lambda event: interrupted.set())
    sources = EventfdSources(engine)
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    sources.attach("d", 17, fd)
    writer = os.dup(fd)
    try:
        os.eventfd_write(writer, 1)
        await asyncio.wait_for(interrupted.wait(), 10)
    finally:
        os.close(writer)
        sources.close()
    assert backend.read(0x202, 1) == b"\x40"
    assert emitted == [("interrupt", None)], "applied in the add_reader callback, no task"
    assert not sources._inflight


async def test_refused_and_held_notifications() -> None:
    model, backend = make()
    engine = Engine(model, backend, QueueSink())
    engine.set_unavailable("QEMU is gone")
    (error,) = engine.notify_nowait([("d", 0)])  # type: ignore[misc]
    assert error is not None and error.code == "UNAVAILABLE"
    engine.set_available()
    engine.pause()
    held = engine.notify_nowait([("d", 0)])
    assert isinstance(held, asyncio.Future) and not held.done() and engine.pending == 1
    assert backend.read(0x200, 1) == b"\x00", "held: nothing written"
    engine.resume()
    assert await asyncio.wait_for(held, 10) == [None]
    assert backend.read(0x200, 1) == b"\x80"
    with pytest.raises(ValueError, match="vector 64 is not one"):
        engine.notify_nowait([("d", 64)])


# ------------------------------------------------------- busy: queue, coalesce


async def test_notifications_during_a_flush_are_coalesced() -> None:
    model, inner = make()
    engine = Engine(model, EagainOnce(inner), QueueSink(), FAST)
    first = engine.notify_nowait([("d", 0)])
    assert isinstance(first, asyncio.Future), "-EAGAIN: the batch waits in a flush task"
    rest = [engine.notify_nowait([("d", v)]) for v in range(1, 64)]
    assert all(isinstance(f, asyncio.Future) for f in rest) and engine.pending == 63
    outcomes = await asyncio.wait_for(asyncio.gather(first, *rest), 10)  # type: ignore[arg-type]
    assert outcomes == [[None]] * 64
    assert inner.read(0x200, 8) == b"\xff" * 8
    assert engine.stats.eagain == 1
    # First batch: the -EAGAIN, the dsci retry, the summary.  The 63 that came
    # during it, as one batch: an 8-byte dsci cmpxchg (twice: its first guess
    # did not know vector 0's bit) and the summary's (already set: a compare).
    assert engine.stats.cmpxchg == 6 and engine.stats.no_xchg == 2, "not 2 per notification"
    assert engine.stats.interrupts_injected == 1 and engine.stats.applied == 64


async def test_a_cancelled_caller_does_not_stop_its_waiting_batch() -> None:
    model, inner = make()
    engine = Engine(model, EagainOnce(inner), QueueSink(), FAST)
    task = asyncio.create_task(engine.notify("d", 3))
    await asyncio.sleep(0)  # the task ran: its batch is waiting out the -EAGAIN
    assert not task.done()
    task.cancel()
    await asyncio.wait_for(engine.drain(), 10)
    assert inner.read(0x200, 1) == b"\x10" and engine.stats.applied == 1


async def test_a_listener_notifying_during_an_eager_batch_is_queued_then_applied() -> None:
    model, backend = make()
    engine = Engine(model, backend, QueueSink())
    reentrant: list[Any] = []

    def listener(event: EngineEvent) -> None:
        if not reentrant:
            reentrant.append(engine.notify_nowait([("d", 40)]))

    engine.subscribe(listener)
    assert engine.notify_nowait([("d", 1)]) == [None]
    (queued,) = reentrant
    assert isinstance(queued, asyncio.Future), "the engine was not idle: queued"
    assert await asyncio.wait_for(queued, 10) == [None]
    assert backend.read(0x205, 1) == b"\x80"


async def test_a_task_notifying_in_a_tight_loop_yields_every_eager_streak() -> None:
    model, backend = make()
    engine = Engine(model, backend, QueueSink())
    other_ran = asyncio.Event()

    async def other() -> None:  # sets the flag as soon as the loop runs it
        other_ran.set()

    task = asyncio.create_task(other())
    seen_at = None
    for i in range(2 * EAGER_STREAK):
        await engine.notify("d", i % 64)
        if other_ran.is_set() and seen_at is None:
            seen_at = i
    await task
    assert seen_at == EAGER_STREAK, "eager (no suspension) until the streak, then one yield"
    assert engine.stats.applied == 2 * EAGER_STREAK


async def test_a_bug_in_an_eager_batch_fails_it_as_internal_and_the_engine_goes_on() -> None:
    model, backend = make()
    engine = Engine(model, backend, QueueSink())
    calls = 0

    def buggy_on_due(*_: Any) -> None:  # a bug in the last step, once
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")

    engine.writer.on_due = buggy_on_due
    (error,) = engine.notify_nowait([("d", 0)])  # type: ignore[misc]
    assert error is not None and error.code == "INTERNAL" and "a bug" in str(error)
    assert engine.stats.failures == {"INTERNAL": 1}
    backend.write(0x100, b"\x00")
    assert engine.notify_nowait([("d", 1)]) == [None], "idle again, eager again"
