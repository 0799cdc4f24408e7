"""The cmpxchg retry loops pinned: -EAGAIN backoff, its attempt limit, the no-exchange bound.

:class:`~indicators.bitor.BitSetter` runs here over the emulated backend
wrapped in backends that inject faults on a script.  The backoff is measured
by the sleeps the loop *requests* (``asyncio.sleep`` replaced in
:mod:`indicators.bitor` by a recorder that yields at once), never by the
wall clock.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Iterator

import pytest

from indicators import bitor
from indicators.bitor import BitSetter, OrFailure
from indicators.config import RetryPolicy, parse_config
from indicators.engine import Engine
from indicators.memop import CmpxchgResult, EmulatedBackend, MemopBackend, TransientError
from indicators.memop.emulated import FaultInjector
from indicators.stats import EngineStats

GADDR = 0x100
BIT = 0x04
#: 1e-4 s doubling reaches the 1e-2 s cap after about 7 doublings.
POLICY = RetryPolicy(
    eagain_backoff_base=1e-4, eagain_backoff_cap=1e-2, eagain_attempts=32, max_no_xchg_rounds=10
)


class Faulty(MemopBackend):
    """``inner`` with scripted faults in front of its cmpxchg.

    ``eagain``: how many of the first calls fail with -EAGAIN (-1: all).
    ``racing``: for how many calls another writer flips a neighbour bit of
    the byte just before the cmpxchg, so its compare fails (-1: all).
    """

    def __init__(self, inner: EmulatedBackend, *, eagain: int = 0, racing: int = 0) -> None:
        self.inner = inner
        self.eagain = eagain
        self.racing = racing
        self.calls = 0

    def cmpxchg(
        self, gaddr: int, size: int, old: int, new: int, key: int | None = None
    ) -> CmpxchgResult:
        self.calls += 1
        if self.eagain:
            self.eagain -= 1
            raise TransientError(gaddr=gaddr, size=size, key=key, old=old)
        if self.racing:
            self.racing -= 1
            byte = self.inner.memory.load(gaddr + size - 1, 1)
            self.inner.memory.write(gaddr + size - 1, bytes([byte ^ 0x01]))
        return self.inner.cmpxchg(gaddr, size, old, new, key)

    def read(self, gaddr: int, size: int, key: int | None = None) -> bytes:
        return self.inner.read(gaddr, size, key)

    def write(self, gaddr: int, data: bytes, key: int | None = None) -> None:
        self.inner.write(gaddr, data, key)


@pytest.fixture
def emulated() -> Iterator[EmulatedBackend]:
    with EmulatedBackend(1 << 16) as backend:
        yield backend


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the retry loop asks to sleep, in order (each sleep yields at once)."""
    requested: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float) -> None:
        requested.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(bitor, "asyncio", types.SimpleNamespace(sleep=record))
    return requested


def nominal(transient: int, policy: RetryPolicy = POLICY) -> float:
    """The policy's exponential backoff before jitter: doubling from the base, capped."""
    return min(policy.eagain_backoff_cap, policy.eagain_backoff_base * 2**transient)


# ------------------------------------------------------------------ -EAGAIN


async def test_eagain_backs_off_growing_within_the_policy_bounds(
    emulated: EmulatedBackend, sleeps: list[float]
) -> None:
    backend = Faulty(emulated, eagain=12)
    stats = EngineStats()
    old = await BitSetter(backend, POLICY, stats).or_bits(GADDR, 1, BIT, None)

    assert old == 0 and emulated.memory.load(GADDR, 1) == BIT, "applied after the EAGAINs"
    assert (backend.calls, stats.eagain, stats.cmpxchg) == (13, 12, 13)
    assert len(sleeps) == 12, f"expected one backoff per -EAGAIN, got {sleeps}"
    cap, base = POLICY.eagain_backoff_cap, POLICY.eagain_backoff_base
    assert all(0 < d <= cap for d in sleeps), f"a delay outside (0, cap]: {sleeps}"
    assert sleeps[0] <= 4 * base, f"the first backoff starts near the base: {sleeps}"
    # With at most 2x jitter and 2x growth, delays never shrink below the cap's half.
    growing = [d for d in sleeps if d < cap / 2]
    assert growing == sorted(growing) and len(growing) >= 4, f"not growing: {sleeps}"
    assert sleeps[-1] >= cap / 2, f"the backoff never reached the cap: {sleeps}"
    assert sleeps[-1] >= 16 * sleeps[0], f"the backoff is not exponential: {sleeps}"
    for transient, delay in enumerate(sleeps, 1):
        assert nominal(transient) / 2 <= delay <= nominal(transient), (transient, delay)


async def test_eagain_attempt_limit_fails_with_the_eagain_code_and_writes_nothing(
    emulated: EmulatedBackend, sleeps: list[float]
) -> None:
    policy = POLICY.model_copy(update={"eagain_attempts": 5})
    backend = Faulty(emulated, eagain=-1)
    stats = EngineStats()
    with pytest.raises(OrFailure) as info:
        await BitSetter(backend, policy, stats).or_bits(GADDR, 1, BIT, None)
    failure = info.value
    assert (failure.code, failure.gaddr, failure.size) == ("EAGAIN", GADDR, 1)
    assert "-EAGAIN 5 times" in failure.desc
    assert isinstance(failure.cause, TransientError)
    assert backend.calls == stats.eagain == 5
    assert len(sleeps) == 4, "a backoff between attempts, none after the last"
    assert emulated.memory.load(GADDR, 1) == 0


async def test_injected_eagain_rate_every_delay_within_bounds(
    emulated: EmulatedBackend, sleeps: list[float]
) -> None:
    """Random -EAGAIN at 50 %: every OR lands, each -EAGAIN costs one bounded backoff."""
    emulated.faults = FaultInjector(eagain_probability=0.5, seed=11)
    stats = EngineStats()
    setter = BitSetter(emulated, POLICY, stats)
    for number in range(400):
        gaddr = GADDR + number // 8
        await setter.or_bits(gaddr, 1, 0x80 >> number % 8, None)
    assert emulated.memory.read(GADDR, 50) == b"\xff" * 50
    injected = emulated.faults.injected["eagain"]
    assert injected > 100 and stats.eagain == injected == len(sleeps)
    assert all(POLICY.eagain_backoff_base / 2 <= d <= POLICY.eagain_backoff_cap for d in sleeps)
    # Back-to-back -EAGAINs back off longer than first ones.
    assert max(sleeps) > 2 * min(sleeps), sleeps


# --------------------------------------------------------------- no exchange


async def test_no_exchange_bound_fails_with_its_code_and_never_writes(
    emulated: EmulatedBackend, sleeps: list[float]
) -> None:
    """A writer that changes the byte before every compare: the loop gives up after
    ``max_no_xchg_rounds`` (10), not after the writer's 1000 rounds, and never sets the bit."""
    backend = Faulty(emulated, racing=1000)
    stats = EngineStats()
    with pytest.raises(OrFailure) as info:
        await BitSetter(backend, POLICY, stats).or_bits(GADDR, 1, BIT, None)
    assert (info.value.code, info.value.gaddr) == ("NO_XCHG_LIMIT", GADDR)
    assert "no exchange after 10 rounds" in info.value.desc
    assert backend.calls == stats.no_xchg == 10
    assert not emulated.memory.load(GADDR, 1) & BIT
    assert sleeps == [], "compare failures retry at once"


async def test_compare_failures_retry_from_the_value_found(
    emulated: EmulatedBackend, sleeps: list[float]
) -> None:
    backend = Faulty(emulated, racing=3)
    stats = EngineStats()
    await BitSetter(backend, POLICY, stats).or_bits(GADDR, 1, BIT, None)
    assert stats.no_xchg == 3 and backend.calls == 4
    assert emulated.memory.load(GADDR, 1) == BIT | 0x01  # the racer's last flip kept


async def test_bits_already_set_end_the_loop_without_a_write(emulated: EmulatedBackend) -> None:
    emulated.memory.write(GADDR, bytes([BIT | 0x10]))
    backend = Faulty(emulated)
    old = await BitSetter(backend, POLICY, EngineStats()).or_bits(GADDR, 1, BIT, None)
    assert old == BIT | 0x10
    assert backend.calls == 1, "one compare shows the bit set; nothing more"


# ------------------------------------------------- through the engine's notify


def _engine(backend: MemopBackend, policy: RetryPolicy) -> Engine:
    from indicators.adapters import build_model
    from indicators.sinks import QueueSink

    config = parse_config(
        {
            "backend": {"kind": "emulated", "memory_size": 1 << 16},
            "devices": [
                {"name": "net0", "kind": "virtio-ccw", "summary_indicator": 0x200,
                 "device_indicator": GADDR, "vectors": 8, "isc": 3},
            ],
        }
    )  # fmt: skip
    return Engine(build_model(config), backend, QueueSink(), policy)


@pytest.mark.parametrize(
    ("faults", "code"),
    [({"eagain": -1}, "EAGAIN"), ({"racing": 1000}, "NO_XCHG_LIMIT")],
    ids=["eagain", "no-exchange"],
)
async def test_a_notify_fails_with_the_bounds_code(
    emulated: EmulatedBackend, sleeps: list[float], faults: dict[str, int], code: str
) -> None:
    engine = _engine(Faulty(emulated, **faults), POLICY.model_copy(update={"eagain_attempts": 3}))
    (error,) = await engine.notify_many([("net0", 5)])
    assert error is not None and error.code == code
    assert engine.stats.failures == {code: 1} and engine.stats.applied == 0
    assert emulated.memory.load(GADDR, 1) & 0x7F == 0 and emulated.memory.load(0x200, 1) == 0
