"""Devices that come and go: device-add / device-del / guest-reset through the real socket.

The daemon runs in this process on a real unix socket with the emulated
backend; clients are qemu.qmp clients (or, for other uids, separate
processes under setpriv).
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from attack_helpers import NOBODY, foreign_client
from daemon_helpers import (
    MEMORY,
    NET_DSCI,
    TIMEOUT,
    Client,
    bit_of,
    daemon_config,
    memory_of,
    qmp_client,
    start_service,
    wait_until,
    writable,
    write_config,
)
from qemu.qmp import ExecuteError

from indicators.config import ConfigError, parse_config
from indicators.daemon.service import Service
from indicators.memop import MemopBackend
from indicators.memop.base import TransientError

#: Where the runtime devices of these tests put their bits (free in daemon_config's layout).
NEW_SUMMARY, NEW_DSCI = 0x30000, 0x30100


def new_device(name: str = "vnet1", **fields: Any) -> dict[str, Any]:
    """A virtio-ccw device as a config entry, on ISC 3 (net0's adapter)."""
    return {
        "name": name,
        "kind": "virtio-ccw",
        "summary_indicator": NEW_SUMMARY,
        "device_indicator": NEW_DSCI,
        "vectors": 8,
        "isc": 3,
        **fields,
    }


def is_set(service: Service, gaddr: int, number: int) -> bool:
    byte, mask = bit_of(gaddr, number)
    return bool(memory_of(service).load(byte, 1) & mask)


def lifetimes(adapters: Any) -> dict[str, str]:
    return {d["name"]: d["lifetime"] for a in adapters for d in a["devices"]}


async def refused(client: Client, command: str, arguments: dict[str, Any] | None = None) -> str:
    with pytest.raises(ExecuteError) as caught:
        await client.execute(command, arguments)
    assert caught.value.error_class == "GenericError"
    return str(caught.value)


async def event(listener: Any, name: str) -> dict[str, Any]:
    while True:
        got = await asyncio.wait_for(listener.get(), TIMEOUT)
        if got["event"] == name:
            return dict(got.get("data", {}))


# ----------------------------------------------------------- add and delete


async def test_a_device_added_at_run_time_is_notified_listed_and_deleted(
    service: Service, client: Client
) -> None:
    with client.listener() as listener:
        reply = await client.execute("device-add", new_device())
        assert reply == {"name": "vnet1", "lifetime": "guest"}
        assert await event(listener, "DEVICE_ADDED") == {
            "name": "vnet1", "kind": "virtio-ccw", "lifetime": "guest"
        }  # fmt: skip
        assert await client.execute("notify", {"device": "vnet1", "vector": [0, 7]}) == {
            "applied": 2
        }
        assert is_set(service, NEW_DSCI, 0) and is_set(service, NEW_DSCI, 7)
        assert memory_of(service).load(NEW_SUMMARY, 1) == 0x01
        listed = lifetimes(await client.execute("query-adapters"))
        assert listed["vnet1"] == "guest" and listed["net0"] == "persistent"

        byte, mask = bit_of(NEW_DSCI, 3)
        assert writable(service, byte, mask)
        assert await client.execute("device-del", {"name": "vnet1"}) == {}
        assert await event(listener, "DEVICE_DELETED") == {"name": "vnet1", "reason": "device-del"}
    # Gone: later notifications fail as an unknown device, its bits are closed.
    assert "unknown device 'vnet1'" in await refused(
        client, "notify", {"device": "vnet1", "vector": 0}
    )
    assert not writable(service, byte, mask)
    assert "vnet1" not in lifetimes(await client.execute("query-adapters"))
    # The config's devices never stopped.
    assert await client.execute("notify", {"device": "net0", "vector": 1}) == {"applied": 1}
    assert "no such device" in await refused(client, "device-del", {"name": "vnet1"})


async def test_a_persistent_runtime_device_survives_a_guest_reset(
    service: Service, client: Client
) -> None:
    await client.execute("device-add", new_device("keep", lifetime="persistent"))
    await client.execute(
        "device-add",
        new_device("gone", summary_indicator=0x31000, device_indicator=0x31100),
    )
    with client.listener() as listener:
        assert await client.execute("guest-reset") == {"dropped": ["gone"]}
        assert await event(listener, "DEVICE_DELETED") == {"name": "gone", "reason": "guest-reset"}
    listed = lifetimes(await client.execute("query-adapters"))
    assert listed["keep"] == "persistent" and "gone" not in listed
    assert await client.execute("notify", {"device": "keep", "vector": 2}) == {"applied": 1}


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        # Overlaps net0's indicators: both devices named.
        ({"device_indicator": NET_DSCI + 1}, ["'vnet1'", "overlaps device 'net0'"]),
        # Past guest memory.
        ({"device_indicator": MEMORY}, ["'vnet1'.device_indicator", "past guest memory"]),
        # Same name as a config device.
        ({"name": "net0", "summary_indicator": 0x32000}, ["'net0'.name", "duplicate"]),
        # A kvm-route with route0's adapter id (0x40) but another isc: both named.
        (
            {
                "kind": "kvm-route",
                "summary_addr": NEW_SUMMARY,
                "ind_addr": NEW_DSCI,
                "adapter_id": 0x40,
                "isc": 6,
                "summary_indicator": None,
                "device_indicator": None,
            },
            ["'vnet1'.isc", "device 'route0'", "one adapter id has one isc"],
        ),
        # A field of the config's own model, with the value given.
        ({"vectors": 0}, ["'vnet1'.vectors", "greater than or equal to 1", "given 0"]),
        ({"colour": "red"}, ["'vnet1'.colour", "Extra inputs are not permitted"]),
        # The config check's words: a misspelled field or kind gets a "did you mean".
        ({"vectros": 8}, ["'vnet1'.vectros", "did you mean 'vectors'?"]),
        (
            {"kind": "virtio-cw"},
            ["device 'vnet1': kind 'virtio-cw' is not one of", "did you mean 'virtio-ccw'?"],
        ),
        # No kind at all: the field named, not an empty location and the whole dict.
        ({"kind": None}, ["device 'vnet1'.kind: Field required"]),
        # JSON's other types are not numbers: "8" is not 8, true is not isc 1.
        ({"vectors": "8"}, ["'vnet1'.vectors: Input should be a valid integer (given '8')"]),
        ({"isc": True}, ["'vnet1'.isc: Input should be a valid integer (given True)"]),
    ],
)
async def test_a_bad_device_is_refused_naming_what_is_wrong_and_nothing_changes(
    service: Service, client: Client, fields: dict[str, Any], words: list[str]
) -> None:
    spec = {k: v for k, v in new_device(**fields).items() if v is not None}
    before = await client.execute("query-adapters")
    message = await refused(client, "device-add", spec)
    for word in words:
        assert word in message, message
    assert await client.execute("query-adapters") == before
    assert memory_of(service).load(NEW_SUMMARY, 1) == 0


async def test_a_bad_lifetime_is_refused(client: Client) -> None:
    message = await refused(client, "device-add", {**new_device(), "lifetime": "forever"})
    assert "lifetime" in message


async def test_device_ranges_confine_runtime_devices(tmp_path: Path) -> None:
    service = await start_service(tmp_path, control={"device_ranges": [[0x30000, 0x30200]]})
    try:
        async with qmp_client(service.socket_path) as client:
            message = await refused(client, "device-add", new_device(device_indicator=0x30200))
            assert "'vnet1'.device_indicator" in message
            assert "[0x30000, 0x30200)" in message
            assert await client.execute("device-add", new_device()) == {
                "name": "vnet1", "lifetime": "guest"
            }  # fmt: skip
    finally:
        await service.stop(grace=1.0)


# ---------------------------------------------------- the live model


async def test_removal_is_not_refused_while_notifications_are_pending(
    service: Service, client: Client
) -> None:
    """Queued notifications of a removed device fail with code REMOVED and change
    nothing; those of the other devices are applied when the hold ends."""
    await client.execute("device-add", new_device())
    service.holds.hold("test")
    try:
        gone = asyncio.create_task(client.execute("notify", {"device": "vnet1", "vector": 4}))
        async with qmp_client(service.socket_path) as other:
            kept = asyncio.create_task(other.execute("notify", {"device": "net0", "vector": 9}))
            await wait_until(lambda: service.engine.pending == 2)
            async with qmp_client(service.socket_path) as manager:
                assert await manager.execute("device-del", {"name": "vnet1"}) == {}
            with pytest.raises(ExecuteError) as caught:
                await asyncio.wait_for(gone, TIMEOUT)
            assert "code REMOVED: 1" in str(caught.value)
            assert service.engine.pending == 1
            service.holds.release("test")
            assert await asyncio.wait_for(kept, TIMEOUT) == {"applied": 1}
    finally:
        service.holds.release("test")
    assert not is_set(service, NEW_DSCI, 4) and memory_of(service).load(NEW_SUMMARY, 1) == 0
    assert is_set(service, NET_DSCI, 9)
    stats = await client.execute("query-stats")
    assert stats["failures"] == {"REMOVED": 1} and stats["applied"] >= 1


async def test_a_removed_devices_eventfds_are_detached_and_closed(
    service: Service, client: Client
) -> None:
    await client.execute("device-add", new_device())
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        client.send_fd_scm(fd)
        await client.execute("getfd", {"fdname": "e"})
        await client.execute("attach-eventfd", {"device": "vnet1", "vector": 5, "fdname": "e"})
        daemons = _fds_on(fd)
        assert daemons, "the daemon holds a copy of the eventfd"
        await client.execute("device-del", {"name": "vnet1"})
        assert (await client.execute("query-stats"))["eventfds"] == []
        assert not (_fds_on(fd) & daemons), "the daemon's copy is closed"
        os.eventfd_write(fd, 1)  # nobody reads it now: nothing is written
        await client.execute("query-stats")
        assert not is_set(service, NEW_DSCI, 5)
    finally:
        os.close(fd)


def _fds_on(fd: int) -> set[int]:
    """This process's other fds on the same open file as ``fd``."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    inode = os.fstat(fd).st_ino
    found = set()
    for name in os.listdir("/proc/self/fd"):
        number = int(name)
        if number == fd:
            continue
        try:
            if os.readlink(f"/proc/self/fd/{name}") == target and os.fstat(number).st_ino == inode:
                found.add(number)
        except OSError:
            continue
    return found


async def test_the_reset_hook_drops_guest_devices_before_the_next_notification(
    service: Service, client: Client
) -> None:
    await client.execute("device-add", new_device())
    service.hooks.reset()  # what the VMM link calls on QEMU's RESET event
    with pytest.raises(ValueError, match="unknown device 'vnet1'"):
        service.engine.notify_nowait((("vnet1", 0),))
    assert "vnet1" not in service.model.devices


async def test_reload_is_a_diff_and_is_not_refused_while_notifications_are_pending(
    tmp_path: Path,
) -> None:
    raw = daemon_config(tmp_path / "control.sock")
    path = write_config(tmp_path / "daemon.toml", raw)
    service = Service(parse_config(raw, "<test>"), config_path=str(path))
    await service.start()
    try:
        async with qmp_client(service.socket_path) as client:
            await client.execute("device-add", new_device())
            await client.execute("set-ais-mode", {"isc": 2, "mode": "single"})
            service.holds.hold("test")
            pending = asyncio.create_task(client.execute("notify", {"device": "net0", "vector": 3}))
            await wait_until(lambda: service.engine.pending == 1)
            devices = [d for d in raw["devices"] if d["name"] != "pci0"]
            write_config(path, {**raw, "devices": devices})
            assert service.reload() == "reloaded"
            # The hold, the suppression state and the listeners are the same after it.
            assert service.engine.paused and list(service.holds) == ["test"]
            assert service.engine.suppression.state(2) == (True, False)
            service.holds.release("test")
            assert await asyncio.wait_for(pending, TIMEOUT) == {"applied": 1}
            listed = lifetimes(await client.execute("query-adapters"))
            assert "pci0" not in listed and listed["vnet1"] == "guest"
            with client.listener(names=("ADAPTER_INTERRUPT",)) as listener:
                await client.execute("notify", {"device": "vnet1", "vector": 4})
                assert (await asyncio.wait_for(listener.get(), TIMEOUT))["data"]["isc"] == 3
            # A config device that collides with a runtime one: refused, nothing changes.
            write_config(path, {**raw, "devices": [*devices, new_device("clash")]})
            assert service.reload().startswith("refused: ")
            assert "clash" not in lifetimes(await client.execute("query-adapters"))
    finally:
        service.holds.release("test")
        await service.stop(grace=1.0)


# ------------------------------------------------------- who may manage


async def test_only_managers_may_add_delete_and_reset(world: Path) -> None:
    """A peer allowed on the socket but not a manager is refused the management commands;
    the same uid named in manager_uids may use them."""
    control = {"allowed_uids": [0, NOBODY], "mode": 0o666}
    service = await start_service(world, control=control)
    try:
        os.chmod(world, os.stat(world).st_mode | stat.S_IXOTH)
        add = ["device-add", new_device()]
        replies = await foreign_client(
            service.socket_path, NOBODY,
            [add, ["device-del", {"name": "net0"}], ["guest-reset"], ["query-stats"]],
        )  # fmt: skip
        errors = [r.get("error", {}).get("desc", "") for r in replies[1:]]
        for desc in errors[:3]:
            assert f"uid {NOBODY}" in desc and "not manage" in desc, desc
        assert "return" in replies[-1]
        assert "vnet1" not in service.model.devices and "net0" in service.model.devices
    finally:
        await service.stop(grace=1.0)

    (world / "control.sock").unlink(missing_ok=True)
    service = await start_service(world, control={**control, "manager_uids": [NOBODY]})
    try:
        replies = await foreign_client(service.socket_path, NOBODY, [add])
        assert replies[-1] == {"return": {"name": "vnet1", "lifetime": "guest"}}
        assert service.registry.lifetimes["vnet1"] == "guest"
    finally:
        await service.stop(grace=1.0)


async def test_manager_gids_admit_a_group(world: Path) -> None:
    control = {"allowed_uids": [0, NOBODY], "mode": 0o666, "manager_gids": [NOBODY]}
    service = await start_service(world, control=control)
    try:
        replies = await foreign_client(service.socket_path, NOBODY, [["guest-reset"]])
        assert replies[-1] == {"return": {"dropped": []}}
    finally:
        await service.stop(grace=1.0)


class _Stalling(MemopBackend):
    """``inner``, except that a cmpxchg on ``window`` answers -EAGAIN until ``go`` is set
    (the batch then waits in its back-off, half applied, as a busy kernel makes it)."""

    def __init__(self, inner: MemopBackend, window: int) -> None:
        self.inner, self.window = inner, window
        self.go = False
        self.stalled = asyncio.Event()

    def cmpxchg(self, gaddr: int, size: int, old: int, new: int, key: int | None = None) -> Any:
        if gaddr & ~15 == self.window and not self.go:
            self.stalled.set()
            raise TransientError(gaddr=gaddr, size=size, key=key, old=old)
        return self.inner.cmpxchg(gaddr, size, old, new, key)

    def read(self, gaddr: int, size: int, key: int | None = None) -> bytes:
        return self.inner.read(gaddr, size, key)

    def write(self, gaddr: int, data: bytes, key: int | None = None) -> None:
        self.inner.write(gaddr, data, key)

    def check(self, gaddr: int, size: int, key: int | None = None, *, store: bool = True) -> None:
        self.inner.check(gaddr, size, key, store=store)


def allowed(service: Service, gaddr: int, mask: int) -> bool:
    """Whether the write guard's allowed bits include ``mask`` at ``gaddr``."""
    guard = service.registry.guard
    assert guard is not None
    return bool(guard.allowed.get(gaddr, 0) & mask)


async def test_a_notification_being_applied_completes_before_the_bits_close(
    tmp_path: Path,
) -> None:
    """device-del while its notification waits in the -EAGAIN back-off: the notification
    is acknowledged with its bit in memory, and only then do the device's bits close."""
    service = await start_service(
        tmp_path,
        retry={"eagain_attempts": 1000, "eagain_backoff_cap": 0.01},  # ~10 s of stalling at most
    )
    try:
        assert service.wiring is not None
        stalling = _Stalling(service.wiring.backend, NEW_DSCI & ~15)
        service.engine.backend = service.registry.confine(stalling)
        async with qmp_client(service.socket_path) as client:
            await client.execute("device-add", new_device())
            applying = asyncio.create_task(
                client.execute("notify", {"device": "vnet1", "vector": 6})
            )
            await asyncio.wait_for(stalling.stalled.wait(), TIMEOUT)
            async with qmp_client(service.socket_path) as manager:
                removing = asyncio.create_task(manager.execute("device-del", {"name": "vnet1"}))
                byte, mask = bit_of(NEW_DSCI, 6)
                await wait_until(lambda: "vnet1" not in service.model.devices)
                # Removed from the set, but its accepted notification is still running:
                # its bits stay writable until it is done.
                assert not removing.done()
                assert allowed(service, byte, mask)
                stalling.go = True
                assert await asyncio.wait_for(applying, TIMEOUT) == {"applied": 1}
                assert await asyncio.wait_for(removing, TIMEOUT) == {}
        assert is_set(service, NEW_DSCI, 6)
        assert not allowed(service, byte, mask) and not writable(service, byte, mask)
    finally:
        await service.stop(grace=1.0)


def test_an_empty_device_range_is_a_config_error(tmp_path: Path) -> None:
    raw = daemon_config(tmp_path / "control.sock", control={"device_ranges": [[0x2000, 0x1000]]})
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, "<test>")
    assert "control" in str(caught.value) and "[0x2000, 0x1000) is empty" in str(caught.value)
    defaults = parse_config(daemon_config(tmp_path / "c.sock"), "<test>").control
    assert defaults is not None
    assert (defaults.manager_uids, defaults.manager_gids, defaults.device_ranges) == ([], [], None)


async def test_a_device_whose_summary_byte_holds_anothers_indicators_is_named(
    client: Client,
) -> None:
    # net0's indicator bytes start at NET_DSCI: a summary byte there clashes with them.
    message = await refused(client, "device-add", new_device(summary_indicator=NET_DSCI))
    assert "adding 'vnet1' conflicts" in message and "'net0'" in message, message


def test_manage_reboot_is_refused_for_a_libvirt_domain(tmp_path: Path) -> None:
    raw = daemon_config(tmp_path / "c.sock", vmm={"libvirt": "guest1", "manage_reboot": True})
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, "<test>")
    assert "manage_reboot = true with libvirt = 'guest1'" in str(caught.value)


async def test_a_batch_across_devices_loses_only_the_removed_devices_part(
    service: Service, client: Client
) -> None:
    """One caller's batch over several devices (the engine's own API allows it): the
    removed device's notifications fail with REMOVED, the others get their own outcome
    (applied, or - for the keyed device on a page its key may not store to - code 4)."""
    await client.execute("device-add", new_device())
    engine = service.engine
    service.holds.hold("test")
    try:
        batch = asyncio.ensure_future(
            engine.notify_many([("vnet1", 2), ("net0", 5), ("vnet1", 3), ("locked", 1)])
        )
        await wait_until(lambda: engine.pending == 4)
        assert engine.remove_devices(["vnet1"], "test") == 2
        assert engine.pending == 2
    finally:
        service.holds.release("test")
    first, second, third, fourth = await asyncio.wait_for(batch, TIMEOUT)
    assert second is None and is_set(service, NET_DSCI, 5)
    assert fourth is not None and fourth.code == "4"
    assert first is not None and third is not None
    assert (first.code, third.code) == ("REMOVED", "REMOVED")
    assert not is_set(service, NEW_DSCI, 2) and not is_set(service, NEW_DSCI, 3)


async def test_a_managing_peer_of_another_uid_is_held_to_the_device_ranges(world: Path) -> None:
    control = {
        "allowed_uids": [0, NOBODY],
        "mode": 0o666,
        "manager_uids": [NOBODY],
        "device_ranges": [[0x30000, 0x30200]],
    }
    service = await start_service(world, control=control)
    try:
        outside = ["device-add", new_device("far", device_indicator=0x40000)]
        inside = ["device-add", new_device()]
        replies = await foreign_client(service.socket_path, NOBODY, [outside, inside])
        refusal = replies[1]["error"]["desc"]
        assert "'far'.device_indicator" in refusal and "device_ranges" in refusal, refusal
        assert replies[2] == {"return": {"name": "vnet1", "lifetime": "guest"}}
        assert "far" not in service.model.devices
    finally:
        await service.stop(grace=1.0)


async def test_a_config_device_deleted_at_run_time_comes_back_with_a_reload(
    service: Service, client: Client
) -> None:
    """device-del may remove a device of the config file too; a reload makes the
    file's devices true again (the file, not the last reload, is what it applies)."""
    await client.execute("device-del", {"name": "net0"})
    assert "net0" not in service.model.devices
    assert service.reload() == "reloaded"
    assert lifetimes(await client.execute("query-adapters"))["net0"] == "persistent"
    assert await client.execute("notify", {"device": "net0", "vector": 1}) == {"applied": 1}
