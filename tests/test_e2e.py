"""End to end: the daemon sets indicators that a real s390x guest (QEMU TCG) clears.

Every QEMU test here runs on the ``indicators`` pytest plugin's fixtures
(the same ones outside projects get, see tests/e2e_outside/): QEMU with the
airq guest, an ``indicators`` daemon in this process on the emulated
backend over the guest's RAM file, its VMM link on a second QMP monitor of
that QEMU.  The guest counts, per (device, vector), every DSCI bit it
clears.  Delivery is judged from the caller's side only
(:mod:`indicators.testing.oracle` via :mod:`indicators.testing.delivery`):
every acknowledged notification had its bit in guest memory at
acknowledgement, or the guest's own counter for it moved after it was sent.
The engine's own counts are never the oracle.

Tests marked ``qemu`` skip without qemu-system-s390x and the s390x
binutils, and fail instead when CI is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from fake_qemu import UnixListener
from qemu.qmp import ExecuteError, QMPClient, QMPError

from indicators.config import parse_config
from indicators.engine import Engine, NotifyError
from indicators.testing.delivery import notify, notify_engine
from indicators.testing.guest import FREE_GADDR, PAGE_SIZE, GuestState, Layout, ParamError
from indicators.testing.layout import derived_storage_keys, guest_layout
from indicators.testing.oracle import DeliveryOracle
from indicators.testing.plugin import require_qemu
from indicators.testing.qemu import AirqGuest, BadParametersError
from indicators.testing.rig import IndicatorsRig

HERE = Path(__file__).parent

# 64 vectors of five devices on three adapters, every corner of the layout:
# two virtio-ccw devices behind one summary bit with DSCI bits in one
# doubleword; two zPCI functions with summary bits in one byte and DSCI runs
# that start mid-byte and share a byte; a KVM route with a mid-byte summary.
# Every device uses access key 3 and the guest gives the pages ACC 3.
DEVICES: list[dict[str, Any]] = [
    {
        "name": "net0",
        "kind": "virtio-ccw",
        "summary_indicator": 0x30000,
        "device_indicator": 0x31000,
        "vectors": 16,
        "isc": 3,
        "key": 3,
    },
    {
        "name": "blk0",
        "kind": "virtio-ccw",
        "summary_indicator": 0x30000,
        "device_indicator": 0x31000,
        "ind_bit": 16,
        "vectors": 8,
        "isc": 3,
        "key": 3,
    },
    {
        "name": "pci0",
        "kind": "zpci",
        "aisb": 0x30010,
        "aisbo": 0,
        "aibv": 0x32000,
        "aibvo": 3,
        "noi": 16,
        "isc": 2,
        "key": 3,
    },
    {
        "name": "pci1",
        "kind": "zpci",
        "aisb": 0x30010,
        "aisbo": 1,
        "aibv": 0x32000,
        "aibvo": 19,
        "noi": 16,
        "isc": 2,
        "key": 3,
    },
    {
        "name": "route0",
        "kind": "kvm-route",
        "summary_addr": 0x30020,
        "summary_offset": 5,
        "ind_addr": 0x33000,
        "vectors": 8,
        "adapter_id": 0x40,
        "isc": 5,
        "key": 3,
    },
]


def _vectors(device: dict[str, Any]) -> int:
    return int(device.get("vectors", device.get("noi", 1)))


TARGETS = [(d["name"], v) for d in DEVICES for v in range(_vectors(d))]
INDICATOR_PAGES = (0x30000, 0x31000, 0x32000, 0x33000)

#: The big run: this many notifications, this many through the control socket.
MILLION = 1_000_000
THROUGH_SOCKET = 100_000

TIMEOUT = 10.0


# ----------------------------------------------------------------- helpers


@pytest.fixture
def needs_qemu() -> None:
    """Skip (fail with CI set) without QEMU, for tests that start a rig themselves."""
    require_qemu()


class Load:
    """Tasks that notify random targets through the engine until stopped.

    ``applied`` counts acknowledged notifications, ``failures`` the failed
    ones by code; ``errors`` keeps the first few for their messages.  Each
    item is told to ``oracle`` (judge with ``oracle.verdict()``).
    """

    def __init__(
        self,
        engine: Callable[[], Engine],
        oracle: DeliveryOracle,
        *,
        tasks: int = 4,
        batch: int = 16,
    ) -> None:
        self.engine = engine
        self.oracle = oracle
        self.batch = batch
        self.applied = 0
        self.failures: Counter[str] = Counter()
        self.errors: list[NotifyError] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(seed)) for seed in range(tasks)]

    async def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self._stop.is_set():
            items = [TARGETS[rng.randrange(len(TARGETS))] for _ in range(self.batch)]
            tokens = self.oracle.submit_many(items)
            for token, error in zip(tokens, await self.engine().notify_many(items), strict=True):
                if error is None:
                    self.oracle.acknowledged(token)
                    self.applied += 1
                else:
                    self.oracle.failed(token, error.code)
                    self.failures[error.code] += 1
                    if len(self.errors) < 5:
                        self.errors.append(error)
            await asyncio.sleep(0)  # refusals return at once: let the loop breathe

    async def stop(self) -> None:
        """Stop and wait for every task's last batch."""
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self._tasks), TIMEOUT)


async def next_event(events: Any, name: str, **data: Any) -> dict[str, Any]:
    """The next event called ``name`` whose data contains ``data`` (others are skipped)."""

    async def find() -> dict[str, Any]:
        async for event in events:
            if event["event"] == name and data.items() <= event.get("data", {}).items():
                return dict(event)
        raise AssertionError(f"no {name} event")

    return await asyncio.wait_for(find(), TIMEOUT)


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``condition`` until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def fill_free_memory(rig: IndicatorsRig, seed: int = 1) -> None:
    """Random bytes in the guest's free memory, but zeros in the indicator pages
    (so that a stray OR there shows)."""
    rng = random.Random(seed)
    memory = rig.guest.memory
    size = rig.memory_size - FREE_GADDR
    memory.write(FREE_GADDR, rng.randbytes(size))
    for page in INDICATOR_PAGES:
        memory.write(page, bytes(PAGE_SIZE))


# --------------------------------------------------- layout (no QEMU needed)


def _config(devices: list[dict[str, Any]]) -> Any:
    return parse_config({"backend": {"kind": "emulated", "memory_size": "32M"}, "devices": devices})


def test_devices_sharing_a_summary_bit_form_one_group() -> None:
    layout = guest_layout(_config(DEVICES).devices, {}, 32 << 20).layout
    groups = [[a.counter_base for a in group] for group in layout.groups()]
    # net0 + blk0 share 0x30000/0x01; pci0 and pci1 share a byte, not a bit.
    assert groups == [[0, 16], [24], [40], [56]]
    block = layout.encode()
    assert [block[0x100 + 32 * i + 0x1D] for i in range(5)] == [2, 1, 1, 1, 1]


def test_areas_are_grouped_even_when_listed_apart() -> None:
    devices = [DEVICES[0], DEVICES[2], DEVICES[1]]
    layout = guest_layout(_config(devices).devices, {}, 32 << 20)
    # Counters follow the config order (net0, pci0, blk0), the areas the groups.
    assert [a.counter_base for a in layout.layout.areas] == [0, 32, 16]
    assert layout.counter[("blk0", 0)] == 32


def test_layout_maps_each_device_to_its_bits() -> None:
    layout = guest_layout(_config(DEVICES).devices, {}, 32 << 20)
    pci1 = layout.areas["pci1"]
    assert (pci1.summary_gaddr, pci1.summary_mask) == (0x30010, 0x40)
    assert pci1.dsci_bit(0) == (0x32002, 0x10)  # aibvo 19: byte 2, bit 3
    route = layout.areas["route0"]
    assert (route.summary_gaddr, route.summary_mask) == (0x30020, 0x04)
    assert layout.counter[("route0", 7)] == 63


def test_derived_storage_keys_give_each_keyed_page_its_device_key() -> None:
    keys = derived_storage_keys(_config(DEVICES).devices)
    assert keys == {page: 0x30 for page in INDICATOR_PAGES}


def test_derived_storage_keys_refuse_two_keys_on_one_page() -> None:
    other = {**DEVICES[1], "key": 5}
    expected = r"page 0x30000 holds bits of 'net0' \(key 3\) and of 'blk0'"
    with pytest.raises(ValueError, match=expected):
        derived_storage_keys(_config([DEVICES[0], other]).devices)


def test_bits_in_the_guests_own_memory_are_refused_by_device() -> None:
    low = {**DEVICES[0], "summary_indicator": 0x10000}
    with pytest.raises(ValueError, match=r"device 'net0': summary 0x10000"):
        guest_layout(_config([low]).devices, {}, 32 << 20)


def test_summary_masks_must_be_equal_or_disjoint() -> None:
    a = guest_layout(_config(DEVICES[:1]).devices, {}, 32 << 20).layout.areas[0]
    b = type(a)(a.summary_gaddr, 0x31100, 4, 16, summary_mask=0x03)
    with pytest.raises(ValueError, match="overlap without being equal"):
        Layout(areas=(a, b)).check(32 << 20)


# -------------------------------------------------------------- the guest


class _BadGroup(Layout):
    def encode(self) -> bytes:
        block = bytearray(super().encode())
        block[0x100 + 0x1D] = 3  # a group of 3 with 2 areas left
        return bytes(block)


@pytest.mark.qemu
async def test_guest_refuses_a_group_past_the_last_area(needs_qemu: None) -> None:
    layout = guest_layout(_config(DEVICES).devices, {}, 32 << 20).layout
    with pytest.raises(BadParametersError) as info:
        async with AirqGuest(_BadGroup(areas=layout.areas[:2])):
            pass
    assert (info.value.reason, info.value.area) == (ParamError.GROUP, 0)


@pytest.mark.qemu
@pytest.mark.indicators_layout(DEVICES[:2])
async def test_devices_sharing_a_summary_are_all_scanned(indicators_rig: IndicatorsRig) -> None:
    """Both DSCI bits set behind one summary: clearing it after one device's
    scan would strand the other's bit (a guest that does so fails here)."""
    rig = indicators_rig
    await rig.park()
    oracle = rig.oracle()
    assert not await notify_engine(rig.engine, oracle, [("net0", 5), ("blk0", 2)])
    verdict = oracle.verdict()
    assert verdict.seen_in_memory == 2, verdict  # parked: both bits stay set
    await rig.resume()
    await rig.settle()
    assert await rig.park() == {("net0", 5): 1, ("blk0", 2): 1}
    assert rig.indicators() == bytes(len(rig.indicators()))


# ---------------------------------------------------------- a million


async def _through_socket(
    client: QMPClient, oracle: DeliveryOracle, n: int, seed: int, batch: int
) -> None:
    rng = random.Random(seed)
    sent = 0
    while sent < n:
        device = DEVICES[rng.randrange(len(DEVICES))]
        # Distinct vectors: a notify counts a repeated vector once.
        count = min(batch, n - sent, _vectors(device))
        vectors = rng.sample(range(_vectors(device)), count)
        await notify(client, oracle, device["name"], vectors)
        sent += len(vectors)
        client.events.clear()  # ADAPTER_INTERRUPT events: the history is unbounded


async def _through_engine(
    engine: Engine, oracle: DeliveryOracle, n: int, seed: int, batch: int
) -> None:
    rng = random.Random(seed)
    sent = 0
    while sent < n:
        items = [TARGETS[rng.randrange(len(TARGETS))] for _ in range(min(batch, n - sent))]
        await notify_engine(engine, oracle, items)
        sent += len(items)


@pytest.mark.qemu
@pytest.mark.indicators_layout(DEVICES)
async def test_a_million_notifications_are_all_consumed(indicators_rig: IndicatorsRig) -> None:
    """1,000,000 notifications over 64 vectors while the guest clears concurrently.

    :data:`THROUGH_SOCKET` of them go through the control socket (two
    ``QMPClient``\\ s, ``notify`` with 50 vectors per command); the rest go
    straight to the daemon's engine (``notify_many``, four tasks of 64):
    the socket path costs about 60 us per notification in this process,
    the engine about 7, and 1M through the socket alone would take a minute.
    """
    rig = indicators_rig
    fill_free_memory(rig)
    before = rig.snapshot()
    clients = [await rig.client(f"load{i}") for i in range(2)]
    per_client = THROUGH_SOCKET // len(clients)
    per_task = (MILLION - THROUGH_SOCKET) // 4
    oracle = rig.oracle()
    t0 = time.monotonic()
    await asyncio.gather(
        *(_through_socket(c, oracle, per_client, seed, 50) for seed, c in enumerate(clients)),
        *(_through_engine(rig.engine, oracle, per_task, 10 + seed, 64) for seed in range(4)),
    )
    elapsed = time.monotonic() - t0
    await rig.settle()
    counts = await rig.park()
    stats, guest = rig.engine.stats, rig.guest.stats()
    verdict = oracle.verdict()

    assert verdict.ok and verdict.acknowledged == MILLION and not verdict.failed, verdict
    assert stats.applied == MILLION and not stats.failures
    assert set(counts) == set(TARGETS)
    assert guest.cleared == sum(counts.values())
    assert rig.indicators() == bytes(len(rig.indicators())), "a bit was left set"
    assert rig.changes_outside_indicators(before, rig.snapshot()) == {}
    print(
        f"\n{MILLION:,} notifications in {elapsed:.1f} s ({MILLION / elapsed:,.0f}/s, "
        f"{THROUGH_SOCKET:,} through the socket): {sum(counts.values()):,} found their bit "
        f"clear and were consumed, {MILLION - sum(counts.values()):,} merged; "
        f"{stats.cmpxchg:,} cmpxchg ({stats.no_xchg:,} no-exchange); guest: "
        f"{guest.summary_hits:,} summary hits, {guest.rescan_cleared:,} bits cleared by a "
        f"rescan, {guest.rounds:,} rounds"
    )


# --------------------------------------------------------- storage keys

KEY_DEVICE = {**DEVICES[0], "key": 3}


@pytest.mark.qemu
@pytest.mark.indicators_layout(storage_keys={0x30000: 0x30, 0x31000: 0x38})
@pytest.mark.parametrize(
    ("indicators_devices", "lands"),
    [([{**KEY_DEVICE, "key": key}], key != 5) for key in (3, 0, 5)],
    ids=["key3", "key0", "key5"],
)
async def test_storage_keys(
    indicators_rig: IndicatorsRig, indicators_qmp: QMPClient, lands: bool
) -> None:
    """The guest gives the indicator pages ACC 3 (fetch-protected DSCI page);
    the daemon learned that from dump-skeys (nothing in its config says so)."""
    rig = indicators_rig
    assert rig.config.backend.storage_keys == {}
    keys = await rig.storage_keys()
    assert (keys[0x30000].acc, keys[0x31000].acc, keys[0x31000].fetch) == (3, 3, True)
    backend = rig.service.wiring.backend  # type: ignore[union-attr]
    assert backend.get_storage_key(0x31000) & 0xF8 == 0x38  # type: ignore[attr-defined]

    before = rig.indicators()
    items = [("net0", v % 16) for v in range(2_000)]
    oracle = rig.oracle()
    failures = await notify_engine(rig.engine, oracle, items)
    if lands:
        assert not failures
        assert await notify(indicators_qmp, oracle, "net0", [1, 2])
        await rig.settle()
        verdict = oracle.verdict()
        assert verdict.ok and verdict.acknowledged == len(items) + 2, verdict
        assert len(await rig.park()) == 16
        return
    assert failures == {"4": len(items)}
    errors = await rig.engine.notify_many(items[:2])
    assert None not in errors and {e.code for e in errors if e} == {"4"}
    assert "protection" in str(errors[0]) and "key 5" in str(errors[0])
    with pytest.raises(ExecuteError, match=r"0 of 2 applied.*\(code 4\)"):
        await indicators_qmp.execute("notify", {"device": "net0", "vector": [1, 2]})
    await rig.guest.wait_rounds(3)
    assert rig.indicators() == before
    assert await rig.park() == {}
    assert rig.engine.stats.failures == {"4": len(items) + 4}


# ----------------------------------------------------------- VMM events


@contextlib.asynccontextmanager
async def loaded(rig: IndicatorsRig, oracle: DeliveryOracle) -> AsyncIterator[Load]:
    """Notification load through the engine for the duration of the block."""
    load = Load(lambda: rig.engine, oracle)
    try:
        await asyncio.sleep(0.2)  # under way
        yield load
    finally:
        await load.stop()


@pytest.mark.qemu
@pytest.mark.indicators_layout(DEVICES)
@pytest.mark.parametrize(
    "indicators_config",
    [{}, {"vmm": {"hold_while_stopped": False}}],
    ids=["hold-while-stopped", "no-hold"],
)
async def test_stop_and_cont_under_load(
    indicators_rig: IndicatorsRig, indicators_qmp: QMPClient
) -> None:
    """Nothing is lost across stop/cont; held, nothing is written while stopped."""
    rig = indicators_rig
    hold = rig.config.vmm is not None and rig.config.vmm.hold_while_stopped
    qemu = rig.guest.qmp
    oracle = rig.oracle()
    with (
        qemu.listener(names=("STOP", "RESUME")) as qemu_events,
        indicators_qmp.listener(names=("VMM_STATE",)) as daemon_events,
    ):
        async with loaded(rig, oracle) as load:
            await qemu.execute("stop")
            await next_event(qemu_events, "STOP")
            await next_event(daemon_events, "VMM_STATE", status="paused")
            indicators, applied, rounds = rig.indicators(), load.applied, rig.guest.rounds()
            await asyncio.sleep(0.3)
            assert rig.guest.rounds() == rounds, "the guest ran while stopped"
            if hold:
                assert rig.indicators() == indicators, "written while the guest was stopped"
                assert load.applied == applied and rig.engine.pending > 0
            else:
                assert load.applied > applied
            await qemu.execute("cont")
            await next_event(qemu_events, "RESUME")
            await next_event(daemon_events, "VMM_STATE", status="running")
            await wait_until(lambda: load.applied > applied + 10_000, "load after cont")
    assert not load.failures, load.errors
    await rig.settle()
    verdict = oracle.verdict()
    assert verdict.ok and verdict.acknowledged == load.applied, verdict
    assert rig.engine.stats.applied == load.applied


ZPCI = {**DEVICES[2], "suppressible": True}


@pytest.mark.qemu
@pytest.mark.indicators_layout([ZPCI])
async def test_system_reset_clears_suppression(
    indicators_rig: IndicatorsRig, indicators_qmp: QMPClient
) -> None:
    rig = indicators_rig

    async def suppression() -> tuple[bool, bool]:
        (adapter,) = await indicators_qmp.execute("query-adapters")
        return adapter["simm"], adapter["nimm"]

    await indicators_qmp.execute("set-ais-mode", {"isc": 2, "mode": "single"})
    oracle = rig.oracle()
    assert await notify(indicators_qmp, oracle, "pci0", [1])
    assert await suppression() == (True, True)  # one interrupt, then suppressed
    await rig.settle()
    assert await rig.park() == {("pci0", 1): 1}
    rounds = rig.guest.rounds()

    with indicators_qmp.listener(names=("VMM_STATE",)) as events:
        await rig.guest.qmp.execute("system_reset")
        await next_event(events, "VMM_STATE", status="reset")
    assert await suppression() == (False, False)
    # QEMU re-IPLed the guest: it starts over (the counters survive) and runs.
    await rig.guest.wait_rounds(100)
    assert rig.guest.state() == GuestState.RUNNING and rig.guest.rounds() > rounds
    assert await notify(indicators_qmp, oracle, "pci0", [1, 2])
    await rig.settle()
    verdict = oracle.verdict()
    assert verdict.ok and verdict.acknowledged == 3, verdict
    assert await rig.park() == {("pci0", 1): 2, ("pci0", 2): 1}


@pytest.mark.qemu
@pytest.mark.indicators_layout(
    DEVICES, vmm_grace=3.0, config={"vmm": {"reconnect_backoff_cap": 0.1}}
)
async def test_qemu_killed_under_load_then_a_new_qemu(
    indicators_rig: IndicatorsRig, indicators_qmp: QMPClient
) -> None:
    """Held for the grace period, then UNAVAILABLE; the daemon survives and
    attaches to a new QEMU behind the same QMP socket, mapping its new RAM."""
    rig = indicators_rig
    old_ram = rig.guest.ram_path
    oracle = rig.oracle()
    with indicators_qmp.listener(names=("VMM_STATE",)) as events:
        async with loaded(rig, oracle) as load:
            await rig.kill_qemu()
            await next_event(events, "VMM_STATE", status="disconnected")
            await asyncio.sleep(0.3)  # well inside the 3 s grace: a margin, not a measurement
            assert rig.engine.paused and rig.engine.unavailable is None  # held in the grace
            assert not load.failures
            await wait_until(lambda: load.failures["UNAVAILABLE"] > 0, "UNAVAILABLE")
            await asyncio.sleep(0.1)
        assert set(load.failures) == {"UNAVAILABLE"}
        assert "guest unavailable: VMM" in str(load.errors[0])
        with pytest.raises(ExecuteError, match=r"\(code UNAVAILABLE\)"):
            await indicators_qmp.execute("notify", {"device": "net0", "vector": 0})
        stats = await indicators_qmp.execute("query-stats")
        assert stats["unavailable"] and stats["vmm"] == "disconnected"
        assert rig.engine.pending == 0

        await rig.start_qemu()
        await next_event(events, "VMM_STATE", status="running")
    verdict = oracle.verdict()
    assert verdict.ok and set(verdict.failed) == {"UNAVAILABLE"}, verdict
    # Until the VMM link notices, the daemon still writes into the dead QEMU's RAM:
    # those acknowledgements come after the guest is gone and cannot be judged.
    assert verdict.unverifiable < verdict.acknowledged, verdict
    memory = rig.service.wiring.backend.memory  # type: ignore[union-attr]
    assert memory.path == rig.guest.ram_path != old_ram
    assert not os.path.exists(old_ram)
    oracle = rig.oracle()  # the new guest's memory and counters
    await _through_engine(rig.engine, oracle, 50_000, 7, 64)
    await rig.settle()
    verdict = oracle.verdict()
    assert verdict.ok and verdict.acknowledged == 50_000 and not verdict.failed, verdict
    assert len(await rig.park()) == len(TARGETS)
    assert (await rig.storage_keys())[0x31000].acc == 3


# ------------------------------------------------------------ teardown


@pytest.mark.qemu
async def test_teardown_after_a_failure_leaves_nothing(needs_qemu: None) -> None:
    rig = IndicatorsRig()
    with pytest.raises(KeyError):
        async with rig:
            pid, directory = rig.guest.pid, rig.directory
            assert (directory / "control.sock").exists()
            raise KeyError("boom")
    assert not os.path.exists(f"/proc/{pid}")
    assert not directory.exists()


def _pytest(directory: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


INTERRUPTED = textwrap.dedent(
    """
    import os, signal, pytest

    @pytest.mark.asyncio
    async def test_interrupted(indicators_rig):
        with open("left", "w") as out:
            out.write(f"{indicators_rig.guest.pid} {indicators_rig.directory}")
        os.kill(os.getpid(), signal.SIGINT)
    """
)


@pytest.mark.qemu
def test_an_interrupted_run_leaves_no_qemu_and_no_files(needs_qemu: None, tmp_path: Path) -> None:
    (tmp_path / "test_interrupted.py").write_text(INTERRUPTED)
    result = _pytest(tmp_path)
    assert "KeyboardInterrupt" in result.stdout + result.stderr, result.stdout
    pid, directory = (tmp_path / "left").read_text().split()
    assert not os.path.exists(f"/proc/{pid}"), "QEMU survived"
    assert not os.path.exists(directory), "the rig's files survived"


# ----------------------------------------------------- the outside user


@pytest.mark.qemu
def test_the_outside_test_file_passes_on_its_own(needs_qemu: None, tmp_path: Path) -> None:
    """A copy of tests/e2e_outside/test_outside.py, away from this repository's
    conftest and pyproject: only the installed plugin provides the fixtures."""
    shutil.copy(HERE / "e2e_outside" / "test_outside.py", tmp_path)
    result = _pytest(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


@pytest.mark.parametrize(("ci", "outcome"), [("", "3 skipped"), ("1", "3 errors")])
def test_without_qemu_outside_tests_skip_or_fail_in_ci(
    tmp_path: Path, ci: str, outcome: str
) -> None:
    shutil.copy(HERE / "e2e_outside" / "test_outside.py", tmp_path)
    env = {**os.environ, "PATH": str(tmp_path), "CI": ci}
    result = _pytest(tmp_path, "-rsf", env=env)
    assert outcome in result.stdout, result.stdout + result.stderr
    assert "apt-get install -y binutils-s390x-linux-gnu qemu-system-misc" in result.stdout
    if ci:
        assert "CI must run the QEMU tests" in result.stdout


# ------------------------------------------- the VMM link's faults (issue: hardening)


class UnixProxy(UnixListener):
    """A unix-socket proxy in front of QEMU's QMP monitor that can be cut and restored."""

    def __init__(self, path: str, target: str) -> None:
        super().__init__(path)
        self.target = target

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.target)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.mark.qemu
async def test_vmm_socket_dropping_under_load_loses_nothing(
    needs_qemu: None, tmp_path: Path
) -> None:
    """The daemon's QMP link to QEMU goes away and comes back while notifications
    flow: they are held meanwhile (within the grace period), nothing fails, and
    every acknowledged notification reaches the guest."""
    proxy_path = str(tmp_path / "vmm-proxy.sock")
    vmm = {"qmp_socket": proxy_path, "disconnect_grace": 30.0, "reconnect_backoff_cap": 0.05}
    rig = IndicatorsRig(DEVICES, config={"vmm": vmm})
    proxy = UnixProxy(proxy_path, rig.vmm_socket)
    await proxy.start()
    async with rig:
        oracle = rig.oracle()
        for _ in range(3):
            async with loaded(rig, oracle) as load:
                await proxy.cut()
                await wait_until(lambda: rig.engine.paused, "the daemon holds")
                held = load.applied
                await asyncio.sleep(0.3)
                assert load.applied == held, "applied while the VMM link was down"
                await proxy.start()
                await wait_until(lambda: not rig.engine.paused, "the daemon resumes")
                await wait_until(
                    lambda held=held: load.applied > held + 1000, "load after the link returned"
                )
            assert not load.failures, load.errors
        await rig.settle()
        verdict = oracle.verdict()
        assert verdict.ok and not verdict.failed, verdict
        assert rig.service.vmm is not None and rig.service.vmm.connects >= 4
    await proxy.cut()


@pytest.mark.qemu
@pytest.mark.indicators_layout(DEVICES, vmm_grace=0.5, config={"vmm": {"reconnect": False}})
async def test_quit_shuts_the_guest_down_and_the_daemon_keeps_serving(
    indicators_rig: IndicatorsRig, indicators_qmp: QMPClient
) -> None:
    rig = indicators_rig
    oracle = rig.oracle()
    assert await notify(indicators_qmp, oracle, "net0", [0, 1])
    await rig.settle()
    verdict = oracle.verdict()
    assert verdict.ok and verdict.acknowledged == 2, verdict
    assert await rig.park() == {("net0", 0): 1, ("net0", 1): 1}
    with indicators_qmp.listener(names=("VMM_STATE",)) as events:
        with contextlib.suppress(EOFError, QMPError):
            await rig.guest.qmp.execute("quit")
        await next_event(events, "VMM_STATE", status="shutdown")
        await next_event(events, "VMM_STATE", status="disconnected")
    await wait_until(lambda: rig.engine.unavailable is not None, "UNAVAILABLE after the grace")
    with pytest.raises(ExecuteError, match=r"code UNAVAILABLE"):
        await indicators_qmp.execute("notify", {"device": "net0", "vector": 0})
    stats = await indicators_qmp.execute("query-stats")
    assert stats["vmm"] == "disconnected" and stats["failures"] == {"UNAVAILABLE": 1}
