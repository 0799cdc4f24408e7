"""The daemon's own VMM paths, configured from a file: disconnect grace and key refresh.

``indicators run --config FILE`` with a ``[vmm]`` section pointing at a
stand-in QEMU monitor (tests/fake_qemu.py: real QMP on a real unix socket).
Nothing here sets attributes on the daemon or calls its refresh: what
happens is what the config asked for.  The daemon runs in a subprocess; the
test maps its RAM file to see the bits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import (
    LOCKED_PAGE,
    MEMORY,
    NET_DSCI,
    TIMEOUT,
    Client,
    Daemon,
    bit_of,
    daemon_config,
    qmp_client,
    running_daemon,
)
from fake_qemu import FakeQemu
from qemu.qmp import ExecuteError

from indicators.daemon.vmm import _Quiet
from indicators.guestmem import GuestMemory
from indicators.testing.delivery import error_code

LOCKED_DSCI = LOCKED_PAGE + 0x100  # the "locked" device: access key 5, config key 0x30 (ACC 3)


def make_ram(path: Path) -> Path:
    """A RAM file of the daemon's memory size."""
    with open(path, "wb") as ram:
        ram.truncate(MEMORY)
    return path


def is_set(ram: Path, gaddr: int, number: int) -> bool:
    byte, mask = bit_of(gaddr, number)
    with GuestMemory(MEMORY, str(ram)) as memory:
        return bool(memory.load(byte, 1) & mask)


@contextlib.asynccontextmanager
async def daemon_with_qemu(
    tmp_path: Path, qemu: FakeQemu, ram: str, **vmm: Any
) -> AsyncIterator[Daemon]:
    """The fake QEMU listening, then ``indicators run`` with ``[vmm]`` pointing at it.

    The daemon is started from a thread: with ``ram = "auto"`` it waits for
    QEMU's answers, which this event loop gives.
    """
    await qemu.start()
    raw = daemon_config(
        tmp_path / "control.sock",
        ram=ram,
        vmm={"qmp_socket": qemu.path, "reconnect_backoff_cap": 0.05, **vmm},
    )
    with contextlib.ExitStack() as stack:
        daemon = await asyncio.to_thread(stack.enter_context, running_daemon(tmp_path, raw))
        try:
            yield daemon
        finally:
            await qemu.cut()


async def vmm_status(client: Client, status: str) -> dict[str, Any]:
    """Wait until query-stats reports the VMM link ``status`` and no unavailability."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while True:
        stats: dict[str, Any] = await client.execute("query-stats")
        if stats["vmm"] == status and (status != "running" or stats["unavailable"] is None):
            return stats
        assert loop.time() < deadline, f"VMM link not {status}: {stats}"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------ disconnect grace


async def test_disconnect_grace_ends_in_unavailable_then_the_link_comes_back(
    tmp_path: Path,
) -> None:
    qemu = FakeQemu(str(tmp_path / "qemu.sock"), str(tmp_path / "ram"))
    ram = make_ram(tmp_path / "ram")
    async with (
        daemon_with_qemu(tmp_path, qemu, str(ram), disconnect_grace=0.2) as daemon,
        qmp_client(daemon.socket) as client,
    ):
        await vmm_status(client, "running")
        assert await client.execute("notify", {"device": "net0", "vector": 1}) == {"applied": 1}
        await qemu.cut()
        await vmm_status(client, "disconnected")
        # Held first, then refused once the configured grace is over (the timeout
        # only ends a hang: a grace timer that never fires keeps this pending).
        with pytest.raises(ExecuteError, match=r"code UNAVAILABLE"):
            await asyncio.wait_for(
                client.execute("notify", {"device": "net0", "vector": 2}), TIMEOUT
            )
        stats = await client.execute("query-stats")
        assert stats["unavailable"] and stats["failures"] == {"UNAVAILABLE": 1}
        await qemu.start()
        await vmm_status(client, "running")
        assert await client.execute("notify", {"device": "net0", "vector": 3}) == {"applied": 1}
    assert [is_set(ram, NET_DSCI, v) for v in (1, 2, 3)] == [True, False, True]


async def test_within_the_grace_notifications_are_held_and_applied_on_return(
    tmp_path: Path,
) -> None:
    qemu = FakeQemu(str(tmp_path / "qemu.sock"), str(tmp_path / "ram"))
    ram = make_ram(tmp_path / "ram")
    async with (
        daemon_with_qemu(tmp_path, qemu, str(ram), disconnect_grace=3600) as daemon,
        qmp_client(daemon.socket) as client,
        qmp_client(daemon.socket, "observer") as observer,
    ):
        await vmm_status(client, "running")
        await qemu.cut()
        stats = await vmm_status(observer, "disconnected")
        held = asyncio.create_task(client.execute("notify", {"device": "net0", "vector": 4}))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while (stats := await observer.execute("query-stats"))["pending"] != 1:
            assert not held.done(), f"applied while QEMU was gone: {held.result()}"
            assert loop.time() < deadline, stats
            await asyncio.sleep(0.01)
        assert stats["paused"] and stats["holds"] == ["disconnected"]
        assert not is_set(ram, NET_DSCI, 4)
        await qemu.start()
        assert await asyncio.wait_for(held, TIMEOUT) == {"applied": 1}
        assert (await observer.execute("query-stats"))["failures"] == {}
    assert is_set(ram, NET_DSCI, 4)


# ------------------------------------------------------------- storage keys


async def notify_locked(client: Client, vector: int) -> str:
    """Notify the keyed device; "applied" or the failure code."""
    try:
        await client.execute("notify", {"device": "locked", "vector": vector})
    except ExecuteError as exc:
        return error_code(exc)
    return "applied"


async def test_periodic_skeys_refresh_follows_the_guests_keys(tmp_path: Path) -> None:
    """The config gives the locked page ACC 3 (key 5 refused); the guest then gives it
    ACC 5, and the daemon's periodic dump-skeys makes key 5 work."""
    qemu = FakeQemu(str(tmp_path / "qemu.sock"), str(tmp_path / "ram"), {LOCKED_PAGE: 0x30})
    ram = make_ram(tmp_path / "ram")
    async with (
        daemon_with_qemu(tmp_path, qemu, str(ram), skeys_refresh=0.05) as daemon,
        qmp_client(daemon.socket) as client,
    ):
        await qemu.wait_dumps(1)
        assert await notify_locked(client, 0) == "4"
        qemu.skeys[LOCKED_PAGE] = 0x50
        await qemu.wait_dumps(qemu.dumps + 2)  # a whole refresh after the change
        assert await notify_locked(client, 1) == "applied"
        qemu.skeys[LOCKED_PAGE] = 0x30
        await qemu.wait_dumps(qemu.dumps + 2)
        assert await notify_locked(client, 2) == "4"
    assert [is_set(ram, LOCKED_DSCI, v) for v in range(3)] == [False, True, False]


async def test_a_new_qemu_gets_its_keys_loaded_on_reattach(tmp_path: Path) -> None:
    """``ram = "auto"``: a QEMU restarted behind the same socket has a new RAM file; the
    daemon maps it and loads the new guest's keys before accepting notifications, even
    though the periodic refresh (an hour) would not come for a long while."""
    first, second = make_ram(tmp_path / "ram1"), make_ram(tmp_path / "ram2")
    qemu = FakeQemu(str(tmp_path / "qemu.sock"), str(first), {LOCKED_PAGE: 0x50})
    async with (
        daemon_with_qemu(tmp_path, qemu, "auto", skeys_refresh=3600) as daemon,
        qmp_client(daemon.socket) as client,
    ):
        await qemu.wait_dumps(1)
        assert await notify_locked(client, 0) == "applied"
        await qemu.cut()
        await vmm_status(client, "disconnected")
        dumps = qemu.dumps
        qemu.ram_path = str(second)
        await qemu.start()
        await vmm_status(client, "running")
        assert qemu.dumps > dumps, "no dump-skeys when the new QEMU was attached"
        assert await notify_locked(client, 1) == "applied"
    assert is_set(first, LOCKED_DSCI, 0) and not is_set(first, LOCKED_DSCI, 1)
    assert is_set(second, LOCKED_DSCI, 1) and not is_set(second, LOCKED_DSCI, 0)


@pytest.mark.parametrize(("level", "shown"), [(logging.INFO, False), (logging.DEBUG, True)])
def test_qemu_qmps_failed_attempts_are_shown_only_at_debug_level(level: int, shown: bool) -> None:
    # qemu.qmp logs each failed connection attempt at ERROR; the link lowers them to
    # DEBUG, and at --log-level info a DEBUG line must not reach the log at all.
    logger = logging.getLogger("qemu.qmp.protocol.quiet-test")
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.propagate = False
    quiet = _Quiet()
    logger.addFilter(quiet)
    logger.setLevel(level)
    try:
        logger.error("Failed to establish connection: FileNotFoundError")
    finally:
        logger.removeFilter(quiet)
        logger.removeHandler(handler)
    assert [r.levelname for r in seen] == (["DEBUG"] if shown else [])
