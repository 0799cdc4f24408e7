"""The QEMU guest rig: a real s390x guest clears indicators the host sets.

The host side here is the reference notifier the spec describes: a 1-byte CAS
OR loop on the DSCI bit, then on the summary.  Its CAS tells whether the bit
was clear, so it knows exactly how many clears the guest must have counted.
Tests marked ``qemu`` skip without qemu-system-s390x and the s390x binutils,
and fail instead when CI is set.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from indicators.guestmem import GuestMemory
from indicators.testing.guest import (
    MAGIC,
    OFF_AREAS,
    OFF_KEYS,
    PAGE_SIZE,
    PARAM_GADDR,
    Area,
    GuestState,
    KeySetting,
    Layout,
    ParamError,
)
from indicators.testing.plugin import require_qemu
from indicators.testing.qemu import (
    AirqGuest,
    BadParametersError,
    GuestProgramCheck,
    RigError,
    parse_skeys,
    skip_reason,
)

# Four areas that exercise every corner of the guest's scan:
# virtio-style byte summaries sharing one aligned word (0x30000, 0x30003),
# zPCI-style single-bit summaries sharing one byte (0x30010, bits 0 and 1),
# DSCI runs that start mid-byte, cross doublewords, share a doubleword
# (areas 1 and 2) and start at an odd address (area 3).
AREAS = (
    Area(summary_gaddr=0x30000, dsci_gaddr=0x31000, n_vectors=8, counter_base=0),
    Area(
        summary_gaddr=0x30010,
        summary_mask=0x80,
        dsci_gaddr=0x32000,
        first_bit=5,
        n_vectors=70,
        counter_base=8,
    ),
    Area(
        summary_gaddr=0x30010,
        summary_mask=0x40,
        dsci_gaddr=0x32000,
        first_bit=75,
        n_vectors=20,
        counter_base=78,
    ),
    Area(summary_gaddr=0x30003, dsci_gaddr=0x33007, n_vectors=100, counter_base=98),
)
KEYS = (
    KeySetting(0x30000, 0x30),  # ACC 3
    KeySetting(0x31000, 0x38),  # ACC 3, fetch-protected
    KeySetting(0x32000, 0x50),  # ACC 5
    KeySetting(0x33000, 0x30),
)
LAYOUT = Layout(areas=AREAS, keys=KEYS)
NOTIFICATIONS = 200_000
THREADS = 3
ROUND_TRIPS = 30_000


@pytest.fixture
def rig_available() -> None:
    require_qemu()


@pytest.fixture
async def guest(rig_available: None) -> AsyncIterator[AirqGuest]:
    async with AirqGuest(LAYOUT) as g:
        yield g


# ---------------------------------------------------------- host notifier


def or_byte(mem: GuestMemory, gaddr: int, mask: int) -> bool:
    """OR ``mask`` into the byte with a CAS loop; True if the bits were clear."""
    old = mem.load(gaddr, 1)
    while True:
        ok, seen = mem.cas(gaddr, 1, old, old | mask)
        if ok:
            return not old & mask
        old = seen


def notify(mem: GuestMemory, area: Area, vector: int) -> bool:
    """Set the DSCI bit, then the summary (the order QEMU and KVM use)."""
    fresh = or_byte(mem, *area.dsci_bit(vector))
    or_byte(mem, area.summary_gaddr, area.summary_mask)
    return fresh


def hammer(mem: GuestMemory, n: int, seed: int, fresh: list[int], merged: list[int]) -> None:
    """``n`` notifications, half of them on each area's vector 0 (so some merge)."""
    rng = random.Random(seed)
    local = [0] * len(fresh)
    merges = 0
    for _ in range(n):
        area = AREAS[rng.randrange(len(AREAS))]
        vector = 0 if rng.random() < 0.5 else rng.randrange(area.n_vectors)
        if notify(mem, area, vector):
            local[area.counter_base + vector] += 1
        else:
            merges += 1
    with _lock:
        for i, c in enumerate(local):
            fresh[i] += c
        merged[0] += merges


def round_trips(
    guest: AirqGuest,
    n: int,
    seed: int,
    owned: int,
    fresh: list[int],
    stranded: list[int],
) -> None:
    """``n`` notifications on vectors ``v % THREADS == owned``, each waited for.

    Other threads never touch these bits (they do share bytes, doublewords and
    summaries), so the bit must be clear again once the guest has finished a
    round that began after the notification: three heartbeats are enough.  A
    bit still set then is stranded.
    """
    rng = random.Random(seed)
    mem = guest.memory
    choices = [(a, v) for a in AREAS for v in range(a.n_vectors) if v % THREADS == owned]
    local = [0] * len(fresh)
    strands = 0
    for _ in range(n):
        area, vector = rng.choice(choices)
        gaddr, mask = area.dsci_bit(vector)
        was_clear = notify(mem, area, vector)
        local[area.counter_base + vector] += was_clear
        beat = guest.rounds()
        deadline = time.monotonic() + ROUND_TRIP_TIMEOUT
        while True:
            # Heartbeat before bit: a thread switch between the two reads
            # must not turn an old "set" into a strand.
            done = guest.rounds() >= beat + 3
            if not mem.load(gaddr, 1) & mask:
                break
            if done or time.monotonic() > deadline:  # a dead guest: a strand, not a hang
                strands += 1
                break
            time.sleep(0)  # let the other threads notify meanwhile
    with _lock:
        for i, c in enumerate(local):
            fresh[i] += c
        stranded[0] += strands


_lock = threading.Lock()
#: Only ends a hang (a guest that stopped making rounds): a round takes microseconds.
ROUND_TRIP_TIMEOUT = 10.0


async def run_threads(*threads: threading.Thread) -> float:
    """Start, join (off the event loop) and time the threads."""
    t0 = time.monotonic()
    for t in threads:
        t.start()

    def join() -> None:
        for t in threads:
            t.join()

    await asyncio.to_thread(join)
    return time.monotonic() - t0


def indicator_bytes(mem: GuestMemory) -> bytes:
    """Every summary and DSCI byte of :data:`AREAS`."""
    out = bytearray()
    for a in AREAS:
        first, _ = a.dsci_bit(0)
        last, _ = a.dsci_bit(a.n_vectors - 1)
        out += mem.read(a.summary_gaddr, 1) + mem.read(first, last - first + 1)
    return bytes(out)


# ------------------------------------------------------------ unit tests


def test_layout_encodes_documented_offsets() -> None:
    block = LAYOUT.encode()
    assert len(block) == PAGE_SIZE
    assert block[:8] == MAGIC
    assert int.from_bytes(block[0x0C:0x10], "big") == len(AREAS)
    assert int.from_bytes(block[0x14:0x18], "big") == 198
    area1 = block[OFF_AREAS + 32 : OFF_AREAS + 64]
    assert int.from_bytes(area1[0x00:0x08], "big") == 0x30010
    assert int.from_bytes(area1[0x08:0x10], "big") == 0x32000
    assert int.from_bytes(area1[0x10:0x14], "big") == 5
    assert int.from_bytes(area1[0x14:0x18], "big") == 70
    assert int.from_bytes(area1[0x18:0x1C], "big") == 8
    assert area1[0x1C] == 0x80
    assert block[OFF_KEYS + 16 : OFF_KEYS + 25] == (0x31000).to_bytes(8, "big") + b"\x38"


def test_area_dsci_bit_is_msb0() -> None:
    assert AREAS[1].dsci_bit(0) == (0x32000, 0x04)
    assert AREAS[1].dsci_bit(3) == (0x32001, 0x80)


@pytest.mark.parametrize(
    ("area", "message"),
    [
        (Area(summary_gaddr=0x2000, dsci_gaddr=0x31000, n_vectors=1, counter_base=0), "summary"),
        (Area(summary_gaddr=0x30000, dsci_gaddr=0x31000, n_vectors=0, counter_base=0), "bits"),
        (Area(0x30000, 0x31000, 1, 0, summary_mask=0), "mask"),
        (
            Area(summary_gaddr=0x30000, dsci_gaddr=0x31000, n_vectors=9, counter_base=14330),
            "exceed",
        ),
    ],
)
def test_layout_check_rejects(area: Area, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Layout(areas=(area,)).check(32 << 20)


def test_parse_skeys() -> None:
    text = (
        "page=000: key(0) => ACC=0, FP=0, REF=0, ch=0, reserved=0\n"
        "page=031: key(62) => ACC=3, FP=8, REF=4, ch=2, reserved=0\n"
    )
    keys = parse_skeys(text)
    k = keys[0x31000]
    assert (k.acc, k.fetch, k.ref, k.change) == (3, True, True, True)
    assert keys[0].key == 0


def test_skip_reason_names_binaries_and_packages(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    reason = skip_reason()
    assert reason is not None
    assert "qemu-system-s390x" in reason and "s390x-linux-gnu-as" in reason
    assert "apt-get install -y binutils-s390x-linux-gnu qemu-system-misc" in reason


# ------------------------------------------------------------ QEMU tests


@pytest.mark.qemu
async def test_boots_and_heartbeat_moves(guest: AirqGuest) -> None:
    assert guest.boot_seconds is not None  # reported; how long is a benchmark's business
    assert guest.state() == GuestState.RUNNING
    # QEMU loaded the ELF over the RAM file and left the block alone.
    assert guest.memory.read(PARAM_GADDR, PAGE_SIZE)[:0x20] == LAYOUT.encode()[:0x20]
    before = guest.rounds()
    after = await guest.wait_rounds(1000)
    assert after >= before + 1000
    assert guest.program_check() is None


@pytest.mark.qemu
async def test_park_holds_the_guest_still(guest: AirqGuest) -> None:
    for _ in range(3):
        counts = await guest.park()
        assert guest.state() == GuestState.PARKED
        rounds = guest.rounds()
        await asyncio.sleep(0.02)
        assert guest.rounds() == rounds
        assert counts == [0] * LAYOUT.n_counters
        await guest.resume()
        assert guest.state() == GuestState.RUNNING
        await guest.wait_rounds(10)


@pytest.mark.qemu
async def test_every_fresh_set_is_counted_once(guest: AirqGuest) -> None:
    fresh = [0] * LAYOUT.n_counters
    merged = [0]
    shares = [NOTIFICATIONS // THREADS + (i < NOTIFICATIONS % THREADS) for i in range(THREADS)]
    elapsed = await run_threads(
        *(
            threading.Thread(target=hammer, args=(guest.memory, n, seed, fresh, merged))
            for seed, n in enumerate(shares)
        )
    )
    # A full round that starts after the last host store clears every bit.
    await guest.wait_rounds(3)
    counts = await guest.park()
    stats = guest.stats()

    assert indicator_bytes(guest.memory) == bytes(len(indicator_bytes(guest.memory)))
    assert sum(fresh) + merged[0] == NOTIFICATIONS
    assert counts == fresh
    assert stats.cleared == sum(counts)
    print(
        f"\n{NOTIFICATIONS} notifications from {THREADS} threads in {elapsed:.2f} s "
        f"({NOTIFICATIONS / elapsed:,.0f}/s): {merged[0]} merged, "
        f"{stats.cleared} cleared ({stats.rescan_cleared} by the rescan), "
        f"{stats.summary_hits} summary hits in {stats.rounds:,} rounds"
    )


@pytest.mark.qemu
async def test_no_notification_is_stranded(guest: AirqGuest) -> None:
    fresh = [0] * LAYOUT.n_counters
    stranded = [0]
    n = ROUND_TRIPS // THREADS
    elapsed = await run_threads(
        *(
            threading.Thread(target=round_trips, args=(guest, n, seed, seed, fresh, stranded))
            for seed in range(THREADS)
        )
    )
    await guest.wait_rounds(3)
    counts = await guest.park()
    assert stranded[0] == 0
    assert counts == fresh
    assert sum(fresh) == n * THREADS  # waited for each: none merged
    print(f"\n{n * THREADS} round trips in {elapsed:.2f} s ({n * THREADS / elapsed:,.0f}/s)")


@pytest.mark.qemu
async def test_a_bit_set_after_the_summary_is_not_seen(guest: AirqGuest) -> None:
    """Why the host order matters: the guest never scans without a summary."""
    mem = guest.memory
    area = AREAS[1]
    or_byte(mem, area.summary_gaddr, area.summary_mask)  # summary first: wrong
    await guest.wait_rounds(3)
    assert not mem.load(area.summary_gaddr, 1) & area.summary_mask, "summary not consumed"
    gaddr, mask = area.dsci_bit(9)
    assert or_byte(mem, gaddr, mask)
    await guest.wait_rounds(100)
    assert mem.load(gaddr, 1) & mask, "a set DSCI bit without a summary was scanned"
    counts = await guest.park()
    assert counts[area.counter_base + 9] == 0
    await guest.resume()

    assert notify(mem, area, 10)  # the right order picks up the stranded bit too
    await guest.wait_rounds(3)
    counts = await guest.park()
    assert counts[area.counter_base + 9 : area.counter_base + 11] == [1, 1]
    assert not mem.load(gaddr, 1) & mask


@pytest.mark.qemu
async def test_guest_set_storage_keys_show_in_dump_skeys(guest: AirqGuest) -> None:
    keys = await guest.storage_keys()
    for setting in KEYS:
        got = keys[setting.page_gaddr]
        # R and C follow the guest's own accesses; ACC and F are what SSKE set.
        assert got.key & 0xF8 == setting.key & 0xF8, f"page {setting.page_gaddr:#x}: {got}"
    assert keys[0x34000].acc == 0


@pytest.mark.qemu
async def test_program_check_is_reported(guest: AirqGuest) -> None:
    report = await guest.fault()
    assert report.code == 0x0001  # operation exception
    assert report.ilc == 2
    assert guest.memory.read(report.instruction_gaddr, 2) == b"\x00\x00"
    assert guest.state() == GuestState.PROGRAM_CHECK
    status = await guest.qmp.execute("query-status")
    assert isinstance(status, dict) and status["status"] == "guest-panicked"
    with pytest.raises(GuestProgramCheck) as info:
        await guest.park(timeout=1)
    assert info.value.report == report


@pytest.mark.qemu
async def test_stop_shuts_qemu_down(guest: AirqGuest) -> None:
    assert await guest.stop() == 0
    assert guest.state() == GuestState.STOPPED


class _ZeroBlock(Layout):
    def encode(self) -> bytes:
        return bytes(PAGE_SIZE)


@pytest.mark.qemu
async def test_bad_parameter_block_is_reported(rig_available: None) -> None:
    with pytest.raises(BadParametersError) as info:
        async with AirqGuest(_ZeroBlock(areas=AREAS)):
            pass
    assert info.value.reason == ParamError.MAGIC


@pytest.mark.qemu
async def test_teardown_after_an_exception(rig_available: None, tmp_path: Path) -> None:
    g = AirqGuest(LAYOUT, workdir=tmp_path)
    with pytest.raises(KeyError):
        async with g:
            pid = g.pid
            assert len(list(tmp_path.iterdir())) == 1
            raise KeyError("boom")
    assert not os.path.exists(f"/proc/{pid}")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RigError):
        g.memory  # noqa: B018
