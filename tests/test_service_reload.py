"""What a config reload keeps, and every reason it refuses, on a Service made from a file.

The service is ``Service(load_config(FILE), config_path=FILE)``; a reload
re-reads FILE (``service.reload()`` is what SIGHUP calls; the signal itself
is tested on ``indicators run`` in test_daemon.py).  Kept: event listeners,
adapter-interruption suppression, holds; applied: the new retry policy.
Refused, with the reason and the old config still serving: no file, a
broken file, a changed [backend], [control] or [vmm] section, an eventfd on
a device or vector the new config drops, notifications pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import (
    NET_DSCI,
    PCI_AIBV,
    TIMEOUT,
    bit_of,
    daemon_config,
    qmp_client,
    wait_until,
    write_config,
)
from qemu.qmp import ExecuteError

from indicators.config import load_config, parse_config
from indicators.daemon.service import Service
from indicators.memop import EmulatedBackend

PCI_ADAPTER = 1 << 3 | 2


@contextlib.asynccontextmanager
async def service_from(tmp_path: Path, raw: dict[str, Any]) -> AsyncIterator[Service]:
    path = write_config(tmp_path / "daemon.toml", raw)
    service = Service(load_config(path), config_path=str(path))
    await service.start()
    try:
        yield service
    finally:
        await service.stop(grace=1.0)


def rewrite(tmp_path: Path, raw: dict[str, Any]) -> None:
    write_config(tmp_path / "daemon.toml", raw)


def is_set(service: Service, gaddr: int, number: int) -> bool:
    assert service.wiring is not None and isinstance(service.wiring.backend, EmulatedBackend)
    byte, mask = bit_of(gaddr, number)
    return bool(service.wiring.backend.memory.load(byte, 1) & mask)


def with_net1(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` plus a device net1 (a safe change)."""
    net1 = {**raw["devices"][0], "name": "net1", "device_indicator": NET_DSCI + 0x40}
    return {**raw, "devices": [*raw["devices"], net1]}


# -------------------------------------------------------------------- kept


async def test_reload_keeps_listeners_and_suppression(tmp_path: Path) -> None:
    raw = daemon_config(tmp_path / "control.sock")
    async with (
        service_from(tmp_path, raw) as service,
        qmp_client(service.socket_path) as client,
    ):
        await client.execute("set-ais-mode", {"isc": 2, "mode": "single"})
        with client.listener(names=("ADAPTER_INTERRUPT",)) as events:
            await client.execute("notify", {"device": "pci0", "vector": 1})
            event = await asyncio.wait_for(events.get(), TIMEOUT)
            assert event["data"]["adapter"] == PCI_ADAPTER

            rewrite(tmp_path, with_net1(raw))
            assert service.reload() == "reloaded"

            adapters = await client.execute("query-adapters")
            pci = next(a for a in adapters if a["id"] == PCI_ADAPTER)
            assert (pci["simm"], pci["nimm"]) == (True, True), "suppression lost"
            await client.execute("notify", {"device": "net1", "vector": 0})
            event = await asyncio.wait_for(events.get(), TIMEOUT)  # from the new engine
            assert event["data"]["adapter"] == 3
        stats = await client.execute("query-stats")
        assert stats["interrupts-injected"] == 2 and stats["notifications"] == 2


async def test_reload_applies_the_new_retry_policy(tmp_path: Path) -> None:
    """Every 1-byte cmpxchg fails with -EAGAIN (the emulation's fault injector): a notify
    fails after exactly ``eagain_attempts``, before and after a reload that changes it."""
    raw = daemon_config(
        tmp_path / "control.sock",
        backend={"faults": {"eagain_probability": 1.0}},
        retry={"eagain_attempts": 3, "eagain_backoff_base": 1e-6, "eagain_backoff_cap": 1e-5},
    )
    async with (
        service_from(tmp_path, raw) as service,
        qmp_client(service.socket_path) as client,
    ):

        async def eagain_per_failed_notify() -> int:
            before = (await client.execute("query-stats"))["eagain"]
            with pytest.raises(ExecuteError, match=r"code EAGAIN"):
                await client.execute("notify", {"device": "net0", "vector": 0})
            return int((await client.execute("query-stats"))["eagain"]) - int(before)

        assert await eagain_per_failed_notify() == 3
        rewrite(tmp_path, {**raw, "retry": {**raw["retry"], "eagain_attempts": 7}})
        assert service.reload() == "reloaded"
        assert await eagain_per_failed_notify() == 7


async def test_reload_keeps_holds(tmp_path: Path) -> None:
    """QEMU unreachable: notifications are held.  A reload does not release them."""
    vmm = {"qmp_socket": str(tmp_path / "no-qemu.sock"), "disconnect_grace": 3600}
    raw = daemon_config(tmp_path / "control.sock", vmm=vmm)
    async with (
        service_from(tmp_path, raw) as service,
        qmp_client(service.socket_path) as client,
    ):
        rewrite(tmp_path, with_net1(raw))
        assert service.reload() == "reloaded"
        stats = await client.execute("query-stats")
        assert stats["paused"] and stats["holds"] == ["disconnected"]
        held = asyncio.create_task(client.execute("notify", {"device": "net1", "vector": 2}))
        await wait_until(lambda: service.engine.pending == 1 or held.done())
        assert not held.done(), "applied although held"
        assert not is_set(service, NET_DSCI + 0x40, 2)
        stopping = asyncio.create_task(service.stop(grace=2.0))  # a stop applies what it held
        assert await asyncio.wait_for(held, TIMEOUT) == {"applied": 1}
        await stopping


# ------------------------------------------------------------------ refused


async def test_a_config_not_from_a_file_cannot_be_reloaded(tmp_path: Path) -> None:
    service = Service(parse_config(daemon_config(tmp_path / "control.sock")))
    await service.start()
    try:
        assert service.reload() == "refused: the config did not come from a file"
    finally:
        await service.stop(grace=1.0)


def _changed(section: str, raw: dict[str, Any]) -> dict[str, Any]:
    if section == "backend":
        return {
            **raw,
            "backend": {**raw["backend"], "memory_size": 2 * raw["backend"]["memory_size"]},
        }
    if section == "control":
        return {**raw, "control": {**raw["control"], "max_pending": 3}}
    return {**raw, "vmm": {**raw["vmm"], "disconnect_grace": 7200}}


@pytest.mark.parametrize("section", ["backend", "control", "vmm"])
async def test_a_changed_daemon_section_is_refused(tmp_path: Path, section: str) -> None:
    vmm = {"qmp_socket": str(tmp_path / "no-qemu.sock"), "disconnect_grace": 3600}
    raw = daemon_config(tmp_path / "control.sock", vmm=vmm)
    async with service_from(tmp_path, raw) as service:
        rewrite(tmp_path, with_net1(_changed(section, raw)))
        reply = service.reload()
        assert reply == f"refused: the [{section}] section changed; restart instead"
        assert "net1" not in service.engine.model.devices, "half applied"


async def test_a_broken_file_is_refused_naming_the_problem(tmp_path: Path) -> None:
    raw = daemon_config(tmp_path / "control.sock")
    async with (
        service_from(tmp_path, raw) as service,
        qmp_client(service.socket_path) as client,
    ):
        broken = {**raw, "devices": [{**raw["devices"][0], "vectors": 0}]}
        rewrite(tmp_path, broken)
        reply = service.reload()
        assert reply.startswith("refused: ") and "vectors" in reply and "net0" in reply, reply
        assert await client.execute("notify", {"device": "net0", "vector": 63}) == {"applied": 1}


@pytest.mark.parametrize("change", ["drop", "shrink"])
async def test_a_reload_detaches_and_closes_the_eventfds_of_a_dropped_target(
    tmp_path: Path, change: str
) -> None:
    """A reload is a diff applied like device-del/device-add (issue 15): the device's
    eventfds go with it (detached, the daemon's copy closed) and its bits close."""
    raw = daemon_config(tmp_path / "control.sock")
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        async with (
            service_from(tmp_path, raw) as service,
            qmp_client(service.socket_path) as client,
        ):
            client.send_fd_scm(efd)
            await client.execute("getfd", {"fdname": "e"})
            args = {"device": "pci0", "vector": 5, "fdname": "e"}
            assert await client.execute("attach-eventfd", args) == {}
            devices = [d for d in raw["devices"] if d["name"] != "pci0"]
            if change == "shrink":
                devices.append({**raw["devices"][1], "noi": 4})
            rewrite(tmp_path, {**raw, "devices": devices})
            assert service.reload() == "reloaded"
            stats = await client.execute("query-stats")
            assert [(e["device"], e["vector"]) for e in stats["eventfds"]] == []
            os.eventfd_write(efd, 1)  # nobody listens any more: nothing is written
            await client.execute("query-version")  # a loop pass or two for a reader
            assert not is_set(service, PCI_AIBV, 5)
            if change == "shrink":  # the shrunk device serves its remaining vectors
                assert await client.execute("notify", {"device": "pci0", "vector": 3}) == {
                    "applied": 1
                }
    finally:
        os.close(efd)


async def test_pending_notifications_do_not_stop_a_reload(tmp_path: Path) -> None:
    """A reload never waits for, or is refused by, pending notifications (issue 15):
    the held one completes after it, on a device the reload kept."""
    vmm = {"qmp_socket": str(tmp_path / "no-qemu.sock"), "disconnect_grace": 3600}
    raw = daemon_config(tmp_path / "control.sock", vmm=vmm)
    async with (
        service_from(tmp_path, raw) as service,
        qmp_client(service.socket_path) as client,
    ):
        held = asyncio.create_task(client.execute("notify", {"device": "net0", "vector": 1}))
        await wait_until(lambda: service.engine.pending == 1 or held.done())
        rewrite(tmp_path, with_net1(raw))
        assert service.reload() == "reloaded"
        assert "net1" in service.engine.model.devices
        stopping = asyncio.create_task(service.stop(grace=2.0))
        assert await asyncio.wait_for(held, TIMEOUT) == {"applied": 1}
        await stopping
