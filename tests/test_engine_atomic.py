"""A failed notification changes nothing and is never acknowledged (issue 10 items 1-3).

Against the emulated backend with real storage keys.  The SSKE race (the
guest changing a page's key between the engine's check and its store) is
staged by a spy that forwards every call and runs the guest's action right
after a chosen cmpxchg.
"""

from __future__ import annotations

import errno
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from indicators.adapters import AdapterModel, build_model
from indicators.config import parse_config
from indicators.engine import Engine, NotifyError
from indicators.memop import CmpxchgResult, EmulatedBackend, MemopBackend
from indicators.sinks import QueueSink

MEMORY = 1 << 16
SUMMARY_PAGE, DSCI_PAGE = 0x1000, 0x2000


def virtio(name: str, summary: int, dsci: int, vectors: int, key: int | None) -> dict[str, Any]:
    return {"name": name, "kind": "virtio-ccw", "summary_indicator": summary,
            "device_indicator": dsci, "vectors": vectors, "key": key}  # fmt: skip


def make(devices: list[dict[str, Any]]) -> tuple[AdapterModel, EmulatedBackend]:
    config = parse_config(
        {"backend": {"kind": "emulated", "memory_size": MEMORY}, "devices": devices}
    )
    return build_model(config), EmulatedBackend(MEMORY)


def storage_keys(backend: EmulatedBackend) -> list[int]:
    return [backend.get_storage_key(page << 12) for page in range(MEMORY >> 12)]


class AfterCmpxchg(MemopBackend):
    """Forwards to ``inner``; after the cmpxchg at ``gaddr`` runs ``action`` once (the guest)."""

    def __init__(self, inner: EmulatedBackend, gaddr: int, action: Callable[[], None]) -> None:
        self.inner = inner
        self.gaddr = gaddr
        self.action: Callable[[], None] | None = action
        self.calls: list[tuple[str, int, int, int]] = []  # (op, gaddr, old, new)

    def cmpxchg(
        self, gaddr: int, size: int, old: int, new: int, key: int | None = None
    ) -> CmpxchgResult:
        self.calls.append(("cmpxchg", gaddr, old, new))
        result = self.inner.cmpxchg(gaddr, size, old, new, key)
        if gaddr == self.gaddr and self.action is not None:
            action, self.action = self.action, None
            action()
        return result

    def check(self, gaddr: int, size: int, key: int | None = None, *, store: bool = True) -> None:
        self.calls.append(("check", gaddr, 0, 0))
        self.inner.check(gaddr, size, key, store=store)

    def read(self, gaddr: int, size: int, key: int | None = None) -> bytes:
        return self.inner.read(gaddr, size, key)

    def write(self, gaddr: int, data: bytes, key: int | None = None) -> None:
        self.inner.write(gaddr, data, key)


# ------------------------------------------------ the check: nothing written


async def test_summary_key_mismatch_writes_nothing_and_counts_nothing() -> None:
    """The issue's repro: key 3, dsci page ACC 3, summary page ACC 5."""
    model, backend = make([virtio("net0", 0x1100, 0x2200, 4, key=3)])
    backend.set_storage_key(DSCI_PAGE, 0x30)
    backend.set_storage_key(SUMMARY_PAGE, 0x50)
    memory, keys = backend.memory.snapshot(), storage_keys(backend)
    sink = QueueSink()
    engine = Engine(model, backend, sink)
    engine.set_counts = Counter()
    events: list[str] = []
    engine.subscribe(lambda event: events.append(event.kind))
    with pytest.raises(NotifyError) as info:
        await engine.notify("net0", 2)
    error = info.value
    assert (error.device, error.vector, error.code, error.where) == ("net0", 2, "4", "summary")
    assert (error.gaddr, error.size, error.key, error.errno) == (0x1100, 1, 3, None)
    assert str(error) == (
        "device 'net0' vector 2: summary at gaddr 0x1100 size 1 key 3: "
        "program exception 4 (protection) (code 4)"
    )
    assert backend.memory.snapshot() == memory, "the dsci byte is not 0x20 afterwards"
    assert storage_keys(backend) == keys, "not even R and C: no store was made"
    assert engine.stats.applied == 0 and engine.set_counts == Counter()
    assert engine.stats.failures == {"4": 1} and engine.stats.notifications == 1
    assert engine.stats.as_dict()["adapters"]["3"]["notifications"] == 0
    assert sink.count == [0] * 8 and events == ["failed"]


async def test_one_check_per_summary_per_batch() -> None:
    model, inner = make([virtio(f"d{i}", 0x1100, 0x2200 + i, 8, key=None) for i in range(4)])
    backend = AfterCmpxchg(inner, -1, lambda: None)
    engine = Engine(model, backend, QueueSink())
    errors = await engine.notify_many([(f"d{i}", v) for i in range(4) for v in range(8)])
    assert errors == [None] * 32
    assert [call[:2] for call in backend.calls] == [
        ("check", 0x1100), ("cmpxchg", 0x2200), ("cmpxchg", 0x1100)
    ], "one check of the shared summary, one dsci window, one summary window"  # fmt: skip


async def test_in_one_dsci_window_only_the_failing_device_fails() -> None:
    # a and b share the dsci window at 0x2200; a's summary page has the wrong key.
    model, backend = make(
        [virtio("a", 0x1100, 0x2200, 8, key=3), virtio("b", 0x3100, 0x2201, 8, key=3)]
    )
    backend.set_storage_key(DSCI_PAGE, 0x30)
    backend.set_storage_key(SUMMARY_PAGE, 0x50)
    backend.set_storage_key(0x3000, 0x30)
    sink = QueueSink()
    engine = Engine(model, backend, sink)
    engine.set_counts = Counter()
    errors = await engine.notify_many([("a", 0), ("b", 1), ("a", 7), ("b", 1)])
    assert errors[1] is None and errors[3] is None
    assert [e.where if e else None for e in (errors[0], errors[2])] == ["summary", "summary"]
    assert backend.read(0x2200, 2) == b"\x00\x40", "a's bits not written, b's stay"
    assert backend.read(0x1100, 1) == b"\x00" and backend.read(0x3100, 1) == b"\x01"
    assert engine.stats.applied == 2 and engine.stats.merged == 1
    assert engine.set_counts == Counter({("b", 1): 1})
    assert engine.stats.failures == {"4": 2} and sum(sink.count) == 1


# ------------------------------------------------- the undo: the SSKE race


async def test_sske_between_check_and_store_takes_the_dsci_bits_back() -> None:
    model, inner = make(
        [virtio("a", 0x1100, 0x2200, 16, key=3), virtio("b", 0x1108, 0x2202, 8, key=3)]
    )
    inner.set_storage_key(DSCI_PAGE, 0x30)
    inner.set_storage_key(SUMMARY_PAGE, 0x30)
    inner.write(0x2200, b"\x80")  # a's vector 0 is already set (an earlier notification)
    # The guest changes the summary page's key right after the dsci store.
    backend = AfterCmpxchg(inner, 0x2200, lambda: inner.set_storage_key(SUMMARY_PAGE, 0x50))
    engine = Engine(model, backend, QueueSink())
    engine.set_counts = Counter()
    errors = await engine.notify_many([("a", 0), ("a", 1), ("a", 9), ("b", 7)])
    assert all(isinstance(e, NotifyError) and e.where == "summary" for e in errors)
    assert [e.code for e in errors if e] == ["4"] * 4
    assert inner.read(0x2200, 3) == b"\x80\x00\x00", "exactly the bits this batch turned on"
    assert inner.read(0x1108, 1) == b"\x00", "b's summary (same window) was not set either"
    assert inner.read(0x1100, 16) == bytes(16)
    assert engine.stats.undone == 3 and engine.stats.stranded == 0
    assert engine.stats.applied == 0 and engine.set_counts == Counter()
    undo = [call for call in backend.calls if call[0] == "cmpxchg"][-1]
    assert undo == ("cmpxchg", 0x2200, 0xC0400100, 0x80000000), (
        "one 4-byte cmpxchg clears a's 0x40 and 0x40, b's 0x01, and keeps a's 0x80"
    )


async def test_undo_takes_back_only_the_failed_devices_bits_of_a_shared_window() -> None:
    # a and b share the dsci window 0x2200; only a's summary page is re-keyed.
    model, inner = make(
        [virtio("a", 0x1100, 0x2200, 8, key=3), virtio("b", 0x3100, 0x2201, 8, key=3)]
    )
    for page in (SUMMARY_PAGE, DSCI_PAGE, 0x3000):
        inner.set_storage_key(page, 0x30)
    backend = AfterCmpxchg(inner, 0x2200, lambda: inner.set_storage_key(SUMMARY_PAGE, 0x50))
    sink = QueueSink()
    engine = Engine(model, backend, sink)
    engine.set_counts = Counter()
    errors = await engine.notify_many([("a", 2), ("b", 3)])
    assert errors[0] is not None and errors[0].where == "summary" and errors[1] is None
    assert inner.read(0x2200, 2) == b"\x00\x10", "a's bit taken back, b's stays"
    assert inner.read(0x3100, 1) == b"\x01" and sink.count[3] == 1
    assert engine.set_counts == Counter({("b", 3): 1}) and engine.stats.applied == 1
    assert engine.stats.undone == 1


async def test_undo_leaves_bits_the_guest_already_consumed() -> None:
    model, inner = make([virtio("a", 0x1100, 0x2200, 8, key=3)])
    inner.set_storage_key(DSCI_PAGE, 0x30)
    inner.set_storage_key(SUMMARY_PAGE, 0x30)

    def guest_scans_and_changes_key() -> None:
        inner.memory.write(0x2200, b"\x00")  # a guest scan consumed the bit
        inner.set_storage_key(SUMMARY_PAGE, 0x50)

    backend = AfterCmpxchg(inner, 0x2200, guest_scans_and_changes_key)
    engine = Engine(model, backend, QueueSink())
    with pytest.raises(NotifyError):
        await engine.notify("a", 3)
    assert engine.stats.undone == 0 and inner.read(0x2200, 1) == b"\x00"
    assert backend.calls[-1] == ("cmpxchg", 0x2200, 0x10, 0x00), "tried, found it clear"


async def test_undo_that_fails_is_counted_logged_and_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, inner = make([virtio("a", 0x1100, 0x2200, 8, key=3)])
    inner.set_storage_key(DSCI_PAGE, 0x30)
    inner.set_storage_key(SUMMARY_PAGE, 0x30)

    def sske_on_both_pages() -> None:
        inner.set_storage_key(SUMMARY_PAGE, 0x50)
        inner.set_storage_key(DSCI_PAGE, 0x50)

    engine = Engine(model, AfterCmpxchg(inner, 0x2200, sske_on_both_pages), QueueSink())
    with caplog.at_level(logging.ERROR, "indicators"), pytest.raises(NotifyError) as info:
        await engine.notify("a", 0)
    assert info.value.where == "summary" and "stay set" in str(info.value)
    assert engine.stats.stranded == 1 and engine.stats.undone == 0
    assert engine.stats.as_dict()["stranded"] == 1
    assert "device a: 1 dsci bit(s) in window 0x2200 stay set" in caplog.text


async def test_read_only_summary_with_key_none_is_taken_back() -> None:
    """The kernel's check passes a read-only memslot for key 0; the store does not."""
    model, backend = make([virtio("a", 0x1100, 0x2200, 8, key=None)])
    backend.set_readonly(SUMMARY_PAGE, 0x1000)
    before = backend.memory.snapshot()
    engine = Engine(model, backend, QueueSink())
    with pytest.raises(NotifyError) as info:
        await engine.notify("a", 5)
    error = info.value
    assert (error.errno, error.where) == (errno.EOPNOTSUPP, "summary")
    assert error.code == errno.errorcode[errno.EOPNOTSUPP]
    assert backend.memory.snapshot() == before
    assert engine.stats.undone == 1 and engine.stats.applied == 0


async def test_dsci_failure_names_the_dsci_and_sets_no_summary() -> None:
    model, backend = make([virtio("a", 0x1100, 0x2200, 8, key=3)])
    backend.set_storage_key(SUMMARY_PAGE, 0x30)
    backend.set_storage_key(DSCI_PAGE, 0x50)
    before = backend.memory.snapshot()
    engine = Engine(model, backend, QueueSink())
    with pytest.raises(NotifyError) as info:
        await engine.notify("a", 0)
    assert (info.value.where, info.value.gaddr, info.value.code) == ("dsci", 0x2200, "4")
    assert backend.memory.snapshot() == before


# ------------------------------------------------------------- the counters


class RefusingSink(QueueSink):
    def inject(self, adapter: Any) -> None:
        raise OSError(errno.EBUSY, "FLIC busy")


async def test_a_refused_injection_is_not_a_failed_notification() -> None:
    model, backend = make([virtio("a", 0x1100, 0x2200, 8, key=None)])
    engine = Engine(model, backend, RefusingSink())
    await engine.notify("a", 0)  # acknowledged: bit and summary are in memory
    assert backend.read(0x2200, 1) == b"\x80" and backend.read(0x1100, 1) == b"\x01"
    stats = engine.stats
    assert (stats.applied, stats.interrupts_failed, stats.failures) == (1, 1, {})
    assert stats.as_dict()["interrupts-failed"] == 1


async def test_notifications_are_applied_or_failed_by_code() -> None:
    model, backend = make(
        [virtio("ok", 0x1100, 0x2200, 8, key=3), virtio("locked", 0x3100, 0x3200, 8, key=3)]
    )
    backend.set_storage_key(SUMMARY_PAGE, 0x30)
    backend.set_storage_key(DSCI_PAGE, 0x30)
    backend.set_storage_key(0x3000, 0x50)
    engine = Engine(model, backend, QueueSink())
    errors = await engine.notify_many([("ok", 1), ("locked", 1), ("ok", 1), ("locked", 2)])
    assert [e is None for e in errors] == [True, False, True, False]
    engine.set_unavailable("QEMU stopped")
    await engine.notify_many([("ok", 2)])
    stats = engine.stats.as_dict()
    assert (stats["notifications"], stats["applied"], stats["merged"]) == (4, 2, 1)
    assert stats["failures"] == {"4": 2, "UNAVAILABLE": 1}
    assert stats["adapters"]["3"] == {"notifications": 2, "interrupts": 1, "suppressed": 0,
                                      "failures": 3}  # fmt: skip
