"""The indicator engine against the emulated backend, with a simulated guest clearing."""

from __future__ import annotations

import asyncio
import errno
import os
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layouts import LAYOUT, expected_bits, layout_config

from indicators.adapters import AdapterModel, build_model
from indicators.config import RetryPolicy, parse_config
from indicators.engine import Engine, NotifyError
from indicators.memop import CmpxchgResult, EmulatedBackend, FaultInjector, MemopBackend
from indicators.simguest import SimulatedGuest
from indicators.sinks import QueueSink
from indicators.testing.oracle import oracle_for

MEMORY = 1 << 16


def virtio(name: str, summary: int, dsci: int, vectors: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "virtio-ccw", "summary_indicator": summary,
            "device_indicator": dsci, "vectors": vectors, **extra}  # fmt: skip


def zpci(name: str, aisb: int, aisbo: int, aibv: int, noi: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "zpci", "aisb": aisb, "aisbo": aisbo, "aibv": aibv,
            "noi": noi, "isc": extra.pop("isc", 2), **extra}  # fmt: skip


def make(devices: list[dict[str, Any]], **backend: Any) -> tuple[AdapterModel, EmulatedBackend]:
    config = parse_config(
        {"backend": {"kind": "emulated", "memory_size": MEMORY}, "devices": devices}
    )
    return build_model(config), EmulatedBackend(MEMORY, **backend)


class Recording(MemopBackend):
    """Wraps a backend and logs every cmpxchg (a spy, not a fake: it forwards)."""

    def __init__(self, inner: MemopBackend, log: list[tuple[str, int]]) -> None:
        self.inner = inner
        self.log = log

    def cmpxchg(self, gaddr: int, size: int, old: int, new: int, key: int | None = None) -> Any:
        self.log.append(("cmpxchg", gaddr))
        return self.inner.cmpxchg(gaddr, size, old, new, key)

    def read(self, gaddr: int, size: int, key: int | None = None) -> bytes:
        return self.inner.read(gaddr, size, key)

    def write(self, gaddr: int, data: bytes, key: int | None = None) -> None:
        self.inner.write(gaddr, data, key)


class LoggingSink(QueueSink):
    def __init__(self, log: list[tuple[str, int]]) -> None:
        super().__init__()
        self.log = log

    def inject(self, adapter: Any) -> None:
        self.log.append(("interrupt", adapter.isc))
        super().inject(adapter)


# --------------------------------------------------------------- basics


async def test_notify_sets_dsci_then_summary_then_interrupt() -> None:
    model, backend = make([virtio("net0", 0x100, 0x200, 4, key=3)])
    backend.set_storage_key(0x0, 0x30)
    log: list[tuple[str, int]] = []
    engine = Engine(model, Recording(backend, log), LoggingSink(log))
    await engine.notify("net0", 2)
    assert backend.read(0x200, 1) == b"\x20", "vector 2 is mask 0x20 of the first byte"
    assert backend.read(0x100, 1) == b"\x01", "the virtio summary byte gets 0x01"
    assert log == [("cmpxchg", 0x200), ("cmpxchg", 0x100), ("interrupt", 3)]
    assert backend.get_storage_key(0) & 0x06 == 0x06, "a store sets R and C"
    await engine.notify("net0", 3)
    assert log[-1] == ("cmpxchg", 0x100), "summary already set: no second interrupt"
    assert engine.stats.interrupts_injected == 1


async def test_unknown_device_or_vector_changes_nothing() -> None:
    model, backend = make([virtio("net0", 0x100, 0x200, 4)])
    engine = Engine(model, backend, QueueSink())
    before = backend.memory.snapshot()
    with pytest.raises(ValueError, match="unknown device 'nope'"):
        await engine.notify_many([("net0", 0), ("nope", 0)])
    with pytest.raises(ValueError, match=r"device 'net0' has vectors 0..3; vector 4"):
        await engine.notify("net0", 4)
    assert backend.memory.snapshot() == before
    assert engine.stats.notifications == 0


async def test_key_mismatch_fails_with_protection_and_names_everything() -> None:
    model, backend = make([virtio("net0", 0x100, 0x1200, 4, key=5)])
    backend.set_storage_key(0x0, 0x50)  # the summary page matches
    backend.set_storage_key(0x1000, 0x30)  # the dsci page has ACC 3
    sink = QueueSink()
    engine = Engine(model, backend, sink)
    with pytest.raises(NotifyError) as info:
        await engine.notify("net0", 1)
    error = info.value
    assert (error.device, error.vector, error.code, error.key) == ("net0", 1, "4", 5)
    assert error.gaddr == 0x1200 and error.size == 1 and error.where == "dsci"
    assert error.errno is None, "a program exception has no errno"
    assert "net0" in str(error) and "0x1200" in str(error) and "key 5" in str(error)
    assert "dsci" in str(error) and "code 4" in str(error)
    assert backend.read(0x100, 1) == b"\x00", "no summary without its indicator"
    assert backend.read(0x1200, 1) == b"\x00"
    assert sink.count == [0] * 8
    assert engine.stats.failures == {"4": 1}


# ----------------------------------------------------------- coalescing


async def test_burst_in_one_window_is_two_cmpxchg_and_one_interrupt() -> None:
    model, backend = make([virtio("wide", 0x100, 0x200, 128)])
    sink = QueueSink()
    engine = Engine(model, backend, sink)
    errors = await engine.notify_many([("wide", v) for v in range(128)])
    assert errors == [None] * 128
    assert backend.read(0x200, 16) == b"\xff" * 16
    assert engine.stats.cmpxchg == 2, "one 16-byte cmpxchg for the window, one for the summary"
    assert sum(sink.count) == 1


async def test_burst_over_devices_sharing_a_summary_updates_it_once() -> None:
    devices = [virtio(f"d{i}", 0x100, 0x200 + 2 * i, 16) for i in range(8)]
    model, backend = make(devices)
    log: list[tuple[str, int]] = []
    sink = LoggingSink(log)
    engine = Engine(model, Recording(backend, log), sink)
    await engine.notify_many([(f"d{i}", v) for i in range(8) for v in range(16)])
    assert backend.read(0x200, 16) == b"\xff" * 16
    assert log == [("cmpxchg", 0x200), ("cmpxchg", 0x100), ("interrupt", 3)]


async def test_bits_in_two_bytes_use_the_smallest_covering_size() -> None:
    model, backend = make([virtio("d", 0x100, 0x200, 128)])
    sizes: list[int] = []
    original = backend.cmpxchg

    def spy(gaddr: int, size: int, old: int, new: int, key: int | None = None) -> CmpxchgResult:
        sizes.append(size)
        return original(gaddr, size, old, new, key)

    backend.cmpxchg = spy  # type: ignore[method-assign]
    engine = Engine(model, backend, QueueSink())
    for pair in ((3, 5), (7, 8), (2, 3)):  # byte numbers in the window
        backend.write(0x100, bytes(0x200))  # the guest consumed everything
        await engine.notify_many([("d", pair[0] * 8), ("d", pair[1] * 8 + 1)])
    assert sizes[0::2] == [8, 16, 2], "aligned 8 covers 3..5, only 16 covers 7..8, 2 covers 2..3"


async def test_held_notifies_are_coalesced_into_one_batch() -> None:
    model, backend = make([virtio("d", 0x100, 0x200, 64)])
    engine = Engine(model, backend, QueueSink())
    engine.pause()
    tasks = [asyncio.create_task(engine.notify("d", v)) for v in range(64)]
    while engine.pending < 64:
        await asyncio.sleep(0)
    engine.resume()
    await asyncio.gather(*tasks)
    assert backend.read(0x200, 8) == b"\xff" * 8
    assert engine.stats.cmpxchg == 2, "one 8-byte dsci cmpxchg, one summary cmpxchg"


# ----------------------------------------------------------- interrupts


async def test_summary_byte_test_vs_bit_test() -> None:
    shared = [
        zpci("a", 0x100, 0, 0x200, 8, suppressible=False, summary_test="byte"),
        zpci("b", 0x100, 1, 0x208, 8, suppressible=False, summary_test="byte"),
    ]
    model, backend = make(shared)
    sink = QueueSink()
    engine = Engine(model, backend, sink)
    await engine.notify("a", 0)
    await engine.notify("b", 0)
    assert sink.count[2] == 1, "QEMU tests the whole summary byte: b's bit set, byte was not 0"
    for device in shared:
        device["summary_test"] = "bit"
    model, backend = make(shared)
    sink = QueueSink()
    engine = Engine(model, backend, sink)
    await engine.notify("a", 0)
    await engine.notify("b", 0)
    assert sink.count[2] == 2, "KVM tests the bit: b's summary bit was clear"


async def test_adapter_interruption_suppression_single_and_all() -> None:
    model, backend = make([zpci("p", 0x100, 0, 0x200, 8, isc=2)])
    sink = QueueSink()
    engine = Engine(model, backend, sink)
    events: list[str] = []
    engine.subscribe(lambda event: events.append(event.kind))

    async def fresh_interrupt() -> None:
        backend.write(0x100, b"\x00")  # the guest consumed the summary
        await engine.notify("p", 0)

    engine.set_ais_mode(2, 1)  # SINGLE: the next one goes through, then nimm
    await fresh_interrupt()
    await fresh_interrupt()
    assert sink.count[2] == 1 and engine.stats.interrupts_suppressed == 1
    assert events == ["interrupt", "suppressed"]
    engine.set_ais_mode(2, 1)  # the guest re-arms SINGLE after its scan
    await fresh_interrupt()
    assert sink.count[2] == 2
    engine.set_ais_mode(2, 0)  # ALL: never suppressed
    await fresh_interrupt()
    await fresh_interrupt()
    assert sink.count[2] == 4
    with pytest.raises(ValueError, match="AIS mode 7"):
        engine.set_ais_mode(2, 7)


async def test_virtio_adapters_are_not_suppressed() -> None:
    model, backend = make([virtio("v", 0x100, 0x200, 8)])
    sink = QueueSink()
    engine = Engine(model, backend, sink)
    engine.set_ais_mode(3, 1)
    for _ in range(3):
        backend.write(0x100, b"\x00")
        await engine.notify("v", 0)
    assert sink.count[3] == 3


# ---------------------------------------------------------------- faults


async def test_eagain_on_half_the_calls_still_delivers_everything() -> None:
    faults = FaultInjector(eagain_probability=0.5, eagain_sizes=frozenset({1, 2, 4, 8, 16}),
                           seed=7)  # fmt: skip
    model, backend = make([virtio(f"d{i}", 0x100, 0x200 + 16 * i, 8) for i in range(8)],
                          faults=faults)  # fmt: skip
    policy = RetryPolicy(eagain_backoff_base=1e-6, eagain_backoff_cap=1e-4, eagain_attempts=64)
    engine = Engine(model, backend, QueueSink(), policy)
    engine.set_counts = __import__("collections").Counter()
    guest = SimulatedGuest(backend.memory, model)
    guest.start()
    rng = random.Random(1)
    for _ in range(50):
        batch = [(f"d{rng.randrange(8)}", rng.randrange(8)) for _ in range(rng.randrange(1, 20))]
        assert await engine.notify_many(batch) == [None] * len(batch)
    guest.stop()
    assert faults.injected["eagain"] > 0 and engine.stats.eagain == faults.injected["eagain"]
    assert guest.counts == engine.set_counts


async def test_protected_summary_fails_before_the_indicator_is_written() -> None:
    faults = FaultInjector()
    faults.protect(0x100, 1)
    model, backend = make([virtio("v", 0x100, 0x200, 8)], faults=faults)
    engine = Engine(model, backend, QueueSink())
    with pytest.raises(NotifyError) as info:
        await engine.notify("v", 0)
    assert info.value.code == "4" and info.value.gaddr == 0x100
    assert info.value.where == "summary"
    assert backend.read(0x200, 1) == b"\x00", "the summary's check failed: no indicator"
    assert engine.stats.cmpxchg == 0 and engine.stats.applied == 0


async def test_a_summary_store_failing_after_its_check_takes_the_indicator_back() -> None:
    """A read-only summary passes the key-0 check but not the store: the dsci bit
    this batch set is undone, the one already set stays, nothing is acknowledged."""
    model, backend = make([virtio("v", 0x1100, 0x200, 8)])
    backend.set_readonly(0x1000, 0x1000)
    backend.write(0x200, b"\x01")  # vector 7: set by an earlier notification
    engine = Engine(model, backend, QueueSink())
    with pytest.raises(NotifyError) as info:
        await engine.notify("v", 2)
    assert info.value.where == "summary"
    assert backend.read(0x200, 1) == b"\x01", "the batch's own dsci bit was taken back"
    assert backend.read(0x1100, 1) == b"\x00"
    assert engine.stats.undone == 1 and engine.stats.applied == 0


async def test_protected_indicator_byte_fails_only_its_notifications() -> None:
    faults = FaultInjector()
    model, backend = make([virtio("v", 0x100, 0x200, 32)], faults=faults)
    faults.protect(0x201, 1)
    engine = Engine(model, backend, QueueSink())
    errors = await engine.notify_many([("v", 0), ("v", 8), ("v", 16)])
    assert errors[0] is None and errors[2] is None
    assert isinstance(errors[1], NotifyError) and errors[1].code == "4"
    assert backend.read(0x200, 3) == b"\x80\x00\x80"
    assert backend.read(0x100, 1) == b"\x01"


async def test_eagain_bound_is_the_policy() -> None:
    faults = FaultInjector(eagain_probability=1.0)
    model, backend = make([virtio("v", 0x100, 0x200, 8)], faults=faults)
    policy = RetryPolicy(eagain_attempts=5, eagain_backoff_base=1e-6, eagain_backoff_cap=1e-5)
    engine = Engine(model, backend, QueueSink(), policy)
    with pytest.raises(NotifyError) as info:
        await engine.notify("v", 0)
    assert info.value.code == "EAGAIN" and engine.stats.cmpxchg == 5
    assert info.value.errno == errno.EAGAIN and info.value.where == "dsci"
    assert backend.read(0x100, 1) == b"\x00"


class NeverExchanges(MemopBackend):
    """A fake that always reports a changed value (a writer that never stops)."""

    def __init__(self) -> None:
        self.calls = 0

    def cmpxchg(self, gaddr: int, size: int, old: int, new: int, key: int | None = None) -> Any:
        self.calls += 1
        return CmpxchgResult(False, 0x01 if old != 0x01 else 0x02)

    def read(self, gaddr: int, size: int, key: int | None = None) -> bytes:
        return bytes(size)

    def write(self, gaddr: int, data: bytes, key: int | None = None) -> None:
        pass


async def test_no_exchange_bound_is_the_policy() -> None:
    model, _ = make([virtio("v", 0x100, 0x200, 8)])
    fake = NeverExchanges()
    engine = Engine(model, fake, QueueSink(), RetryPolicy(max_no_xchg_rounds=9))
    with pytest.raises(NotifyError) as info:
        await engine.notify("v", 0)
    assert info.value.code == "NO_XCHG_LIMIT" and fake.calls == 9


async def test_pause_holds_until_resume() -> None:
    model, backend = make([virtio("v", 0x100, 0x200, 8)])
    engine = Engine(model, backend, QueueSink())
    engine.pause()
    task = asyncio.create_task(engine.notify("v", 1))
    await asyncio.sleep(0.01)
    assert not task.done() and engine.pending == 1
    assert backend.read(0x200, 1) == b"\x00", "nothing is written while paused"
    engine.resume()
    await task
    assert backend.read(0x200, 1) == b"\x40"


# -------------------------------------------------------- property test

STREAM = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 39), st.integers(1, 30)), min_size=1, max_size=40
)
#: Storage keys of the summary page (0x1000) and the indicator pages (0x2000, 0x3000):
#: ACC 0, 3 or 5, fetch protection or not.
PAGE_KEYS = st.lists(st.sampled_from([0x00, 0x30, 0x50, 0x38, 0x58]), min_size=3, max_size=3)


def first_dsci_bit(device: dict[str, Any]) -> int:
    """The test's own reading of a raw device config: MSB-0 number of vector 0's bit."""
    if device["kind"] == "virtio-ccw":
        return int(device["device_indicator"]) * 8 + device.get("ind_bit", 0)
    if device["kind"] == "zpci":
        return int(device["aibv"]) * 8 + device.get("aibvo", 0)
    return int(device["ind_addr"]) * 8 + device.get("ind_offset", 0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=LAYOUT, stream=STREAM, page_keys=PAGE_KEYS)
def test_every_acknowledged_notify_is_consumed_and_a_failed_one_changes_nothing(
    layout: list[tuple[str, int, int, bool, int | None]],
    stream: list[tuple[int, int, int]],
    page_keys: list[int],
) -> None:
    from collections import Counter

    devices = layout_config(layout)
    model, backend = make(devices)
    pages = (0x1000, 0x2000, 0x3000)
    for page, skey in zip(pages, page_keys, strict=True):
        backend.set_storage_key(page, skey)
    noise = bytearray(os.urandom(MEMORY))
    bits = expected_bits(devices)
    for gaddr in bits:
        noise[gaddr] = 0
    backend.memory.write(0, bytes(noise))
    guest = SimulatedGuest(backend.memory, model)
    raw = {device["name"]: device for device in devices}

    def bit_of(name: str, vector: int) -> tuple[int, int]:
        number = first_dsci_bit(raw[name]) + vector
        return number // 8, 0x80 >> (number % 8)

    def fails(name: str) -> bool:
        """Worked out from the keys alone: a store under key k needs ACC k on both pages."""
        key = raw[name]["key"]
        dsci_page = bit_of(name, 0)[0] & ~0xFFF
        summary_page = 0x1000  # layout_config puts every summary there
        acc = {page: skey >> 4 for page, skey in zip(pages, page_keys, strict=True)}
        return bool(key) and (acc[dsci_page] != key or acc[summary_page] != key)

    oracle = oracle_for(lambda gaddr, size: backend.memory.load(gaddr, size), bit_of,
                        guest.counts)  # fmt: skip

    async def run() -> Counter[tuple[str, int]]:
        engine = Engine(model, backend, QueueSink())
        engine.set_counts = Counter()
        guest.start()
        names = list(model.devices)
        for device_index, vector, repeat in stream:
            device = model.devices[names[device_index % len(names)]]
            batch = [(device.name, (vector + i) % device.vectors) for i in range(repeat)]
            tokens = oracle.submit_many(batch)
            errors = await engine.notify_many(batch)
            for token, (name, _), error in zip(tokens, batch, errors, strict=True):
                assert (error is not None) == fails(name), (name, error)
                if error is None:
                    oracle.acknowledged(token)
                else:
                    assert (error.code, error.where) in (("4", "dsci"), ("4", "summary"))
                    oracle.failed(token, error.code)
        guest.stop()
        assert engine.stats.applied == sum(1 for _, _, n in stream for _ in range(n)) - sum(
            engine.stats.failures.values()
        )
        return engine.set_counts

    set_counts = asyncio.run(run())
    verdict = oracle.verdict()
    assert verdict.ok, str(verdict)
    assert guest.counts == set_counts, "every bit the engine set was consumed exactly once"
    after = backend.memory.snapshot()
    stranded = {gaddr: after[gaddr] for gaddr in bits if after[gaddr]}
    assert stranded == {}, "no bit left set: a failed notification wrote nothing"
    changed = [i for i in range(MEMORY) if after[i] != noise[i]]
    assert changed == [], f"bytes outside the indicators changed: {changed[:8]}"
