"""A guest that reboots: its devices are dropped before the guest runs again.

The VMM side is a QMP server on a real unix socket: a small scripted QEMU
in this process (for the order of events and commands under
``manage_reboot``), and the attack helpers' fake QEMU process (a QEMU
replaced by another process behind the same socket).  The daemon is the
real service on its real control socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from attack_helpers import FakeQemu
from daemon_helpers import TIMEOUT, bit_of, daemon_config, qmp_client, wait_until, writable
from qemu.qmp import ExecuteError, QMPClient

from indicators.config import parse_config
from indicators.daemon.service import Service
from indicators.testing.guest import GuestState
from indicators.testing.rig import IndicatorsRig

SUMMARY, DSCI = 0x30000, 0x30100
GUEST_DEVICE = {
    "name": "vnet1",
    "kind": "virtio-ccw",
    "summary_indicator": SUMMARY,
    "device_indicator": DSCI,
    "vectors": 8,
    "isc": 3,
}


class ScriptedQemu:
    """A QMP server that answers like QEMU and records every command it is sent.

    ``on[command]`` runs when the command arrives, before it is answered (it
    may :meth:`emit` events, as QEMU's system_reset emits RESET); a command
    in ``refuse`` is answered with that error.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.on: dict[str, Callable[[], None]] = {}
        #: Commands answered with a GenericError of this text.
        self.refuse: dict[str, str] = {}
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        message = {"event": event, "data": data or {}, "timestamp": {"seconds": 0,
                   "microseconds": 0}}  # fmt: skip
        for writer in self._writers:
            writer.write(json.dumps(message).encode() + b"\r\n")

    def hang_up(self) -> None:
        """Close every client connection (the server keeps listening)."""
        for writer in self._writers:
            writer.close()

    def names(self) -> list[str]:
        return [name for name, _ in self.commands]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        greeting = {"QMP": {"version": {"qemu": {"major": 8, "minor": 2, "micro": 0},
                    "package": "scripted"}, "capabilities": []}}  # fmt: skip
        writer.write(json.dumps(greeting).encode() + b"\r\n")
        decoder, buffer = json.JSONDecoder(), ""
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                buffer += data.decode()  # a JSON stream: QEMU needs no newlines
                while buffer.strip():
                    try:
                        request, end = decoder.raw_decode(buffer.lstrip())
                    except ValueError:
                        break  # incomplete: read on
                    buffer = buffer.lstrip()[end:]
                    self._answer(request, writer)
                await writer.drain()
        self._writers.remove(writer)

    def _answer(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        name, args = request["execute"], request.get("arguments", {})
        self.commands.append((name, args))
        if name in self.on and name not in self.refuse:
            self.on[name]()
        result: Any = {}
        if name == "query-status":
            result = {"status": "running", "running": True}
        reply: dict[str, Any] = {"return": result}
        if name in self.refuse:
            reply = {"error": {"class": "GenericError", "desc": self.refuse[name]}}
        if "id" in request:
            reply["id"] = request["id"]
        writer.write(json.dumps(reply).encode() + b"\r\n")


@pytest.fixture
async def qemu(tmp_path: Path) -> AsyncIterator[ScriptedQemu]:
    qemu = ScriptedQemu(tmp_path / "qmp.sock")
    await qemu.start()
    yield qemu
    await qemu.stop()


async def start_service(tmp_path: Path, qmp: Path, **vmm: Any) -> Service:
    raw = daemon_config(tmp_path / "control.sock", vmm={"qmp_socket": str(qmp), **vmm})
    service = Service(parse_config(raw, "<test>"))
    await service.start()
    return service


async def test_a_managed_guest_reboot_drops_its_devices_before_the_vm_is_reset(
    tmp_path: Path, qemu: ScriptedQemu
) -> None:
    service = await start_service(tmp_path, qemu.path, manage_reboot=True)
    byte, mask = bit_of(DSCI, 2)
    at_reset: dict[str, Any] = {}

    def system_reset() -> None:  # what the daemon still allows when it resets the VM
        at_reset["devices"] = set(service.model.devices)
        at_reset["writable"] = writable(service, byte, mask)
        # As QEMU: the reset happens after the reply, and cont is refused until then.
        qemu.refuse["cont"] = "Resetting the Virtual Machine is required"
        asyncio.get_running_loop().call_later(0.2, reset_done)

    def reset_done() -> None:
        qemu.refuse.pop("cont")
        qemu.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    qemu.on["system_reset"] = system_reset
    qemu.on["cont"] = lambda: qemu.emit("RESUME")
    try:
        await wait_until(lambda: "set-action" in qemu.names())
        assert ("set-action", {"reboot": "shutdown", "shutdown": "pause"}) in qemu.commands
        async with qmp_client(service.socket_path) as client:
            await client.execute("device-add", GUEST_DEVICE)
            await client.execute("device-add", {**GUEST_DEVICE, "name": "disk0",
                                 "summary_indicator": 0x31000, "device_indicator": 0x31100,
                                 "lifetime": "persistent"})  # fmt: skip
            assert await client.execute("notify", {"device": "vnet1", "vector": 1}) == {
                "applied": 1
            }
            assert writable(service, byte, mask)
            with client.listener(names=("DEVICE_DELETED",)) as listener:
                # The guest reboots; QEMU (set-action) pauses it and says why.
                qemu.emit("STOP")
                qemu.emit("SHUTDOWN", {"guest": True, "reason": "guest-reset"})
                deleted = await asyncio.wait_for(listener.get(), TIMEOUT)
                assert dict(deleted["data"]) == {"name": "vnet1", "reason": "guest-reset"}
            await wait_until(lambda: "cont" in qemu.names())
            # The reset action is put back for the daemon's own reset only.
            assert qemu.commands[-4:] == [
                ("set-action", {"reboot": "reset"}),
                ("system_reset", {}),
                ("set-action", {"reboot": "shutdown"}),
                ("cont", {}),
            ]
            # When QEMU was told to reset the VM, the guest's device was gone and its
            # bits closed; the persistent one stays.
            assert at_reset == {"devices": {"net0", "pci0", "route0", "locked", "disk0"},
                                "writable": False}  # fmt: skip
            await wait_until(lambda: not service.engine.paused)
            assert await client.execute("notify", {"device": "disk0", "vector": 0}) == {
                "applied": 1
            }
    finally:
        await service.stop(grace=1.0)


async def test_without_manage_reboot_the_reset_event_drops_the_guest_devices(
    tmp_path: Path, qemu: ScriptedQemu
) -> None:
    service = await start_service(tmp_path, qemu.path)
    try:
        await wait_until(lambda: "query-status" in qemu.names())
        assert "set-action" not in qemu.names()
        async with qmp_client(service.socket_path) as client:
            await client.execute("device-add", GUEST_DEVICE)
            with client.listener(names=("DEVICE_DELETED",)) as listener:
                qemu.emit("SHUTDOWN", {"guest": True, "reason": "guest-reset"})
                qemu.emit("RESET", {"guest": True, "reason": "guest-reset"})
                deleted = await asyncio.wait_for(listener.get(), TIMEOUT)
            assert dict(deleted["data"]) == {"name": "vnet1", "reason": "guest-reset"}
        assert "system_reset" not in qemu.names()  # QEMU owns the reboot here
    finally:
        await service.stop(grace=1.0)


async def test_the_guest_reset_command_drops_then_resets_and_continues_the_vm(
    tmp_path: Path, qemu: ScriptedQemu
) -> None:
    service = await start_service(tmp_path, qemu.path)
    seen: list[bool] = []

    def system_reset() -> None:
        seen.append("vnet1" in service.model.devices)
        qemu.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    qemu.on["system_reset"] = system_reset
    try:
        await wait_until(lambda: "query-status" in qemu.names())
        async with qmp_client(service.socket_path) as client:
            await client.execute("device-add", GUEST_DEVICE)
            assert await client.execute("guest-reset") == {"dropped": ["vnet1"]}
        assert seen == [False]
        assert qemu.names()[-2:] == ["system_reset", "cont"]
    finally:
        await service.stop(grace=1.0)


async def test_a_new_qemu_behind_the_socket_drops_the_guest_devices(tmp_path: Path) -> None:
    home = tmp_path / "qemu"
    home.mkdir()
    first = FakeQemu(home, size=1 << 20).start()
    service = await start_service(tmp_path, first.socket, disconnect_grace=30.0)
    second: FakeQemu | None = None
    try:
        await wait_until(lambda: service.vmm is not None and service.vmm.status == "running")
        async with qmp_client(service.socket_path) as client:
            await client.execute("device-add", GUEST_DEVICE)
            await client.execute("device-add", {**GUEST_DEVICE, "name": "disk0",
                                 "summary_indicator": 0x31000, "device_indicator": 0x31100,
                                 "lifetime": "persistent"})  # fmt: skip
            with client.listener(names=("DEVICE_DELETED",)) as listener:
                first.stop()
                await wait_until(lambda: service.vmm is not None and service.vmm.connects == 1
                                 and service.vmm.status == "disconnected")  # fmt: skip
                assert "vnet1" in service.model.devices  # a lost link alone drops nothing
                second = FakeQemu(home, size=1 << 20).start()
                deleted = await asyncio.wait_for(listener.get(), TIMEOUT)
            assert dict(deleted["data"]) == {"name": "vnet1", "reason": "qemu-replaced"}
            assert "disk0" in service.model.devices
    finally:
        await service.stop(grace=1.0)
        first.stop()
        if second is not None:
            second.stop()


# ------------------------------------------------------------- a real QEMU

RUNTIME_DEVICE = {**GUEST_DEVICE, "name": "vnet9", "summary_indicator": 0x38000,
                  "device_indicator": 0x38100}  # fmt: skip


@pytest.mark.qemu
@pytest.mark.indicators_layout(config={"vmm": {"manage_reboot": True}})
async def test_a_real_qemu_hands_its_reboot_over_and_the_guest_reset_command_resets_it(
    indicators_rig: IndicatorsRig, indicators_qmp: QMPClient
) -> None:
    rig = indicators_rig
    stats = await indicators_qmp.execute("query-stats")
    assert stats["owns-reboot"] is True  # QEMU accepted set-action
    await indicators_qmp.execute("device-add", RUNTIME_DEVICE)
    assert await indicators_qmp.execute("notify", {"device": "vnet9", "vector": 0}) == {
        "applied": 1
    }
    rounds = rig.guest.rounds()
    with indicators_qmp.listener(names=("VMM_STATE", "DEVICE_DELETED")) as events:
        assert await indicators_qmp.execute("guest-reset") == {"dropped": ["vnet9"]}
        seen = []
        while "reset" not in seen:
            event = await asyncio.wait_for(events.get(), TIMEOUT)
            seen.append(event["data"].get("status") or event["event"])
    # Dropped first, then QEMU reset the VM (and the daemon continued it).
    assert seen.index("DEVICE_DELETED") < seen.index("reset")
    assert (await indicators_qmp.execute("query-stats"))["owns-reboot"] is True
    await rig.guest.wait_rounds(100)
    assert rig.guest.state() == GuestState.RUNNING and rig.guest.rounds() > rounds
    await indicators_qmp.execute("notify", {"device": "net0", "vector": 3})
    await rig.settle()
    # The guest counts its layout's devices (vnet9 is none of them).
    assert await rig.park() == {("net0", 3): 1}
    assert (await indicators_qmp.execute("query-stats"))["applied"] == 2


@pytest.mark.qemu
@pytest.mark.indicators_layout(config={"vmm": {"manage_reboot": True}})
async def test_a_real_qemu_pauses_a_reset_request_and_the_daemon_resets_the_vm_itself(
    indicators_rig: IndicatorsRig, indicators_qmp: QMPClient
) -> None:
    """Owning the reboot, QEMU turns a reset request into a paused shutdown (the same
    path a guest reboot takes, reason host-qmp-system-reset here); the daemon drops the
    guest's devices, resets the VM and continues it."""
    rig = indicators_rig
    await indicators_qmp.execute("device-add", RUNTIME_DEVICE)
    rounds = rig.guest.rounds()
    with indicators_qmp.listener(names=("VMM_STATE", "DEVICE_DELETED")) as events:
        await rig.guest.qmp.execute("system_reset")  # QEMU's own monitor, not the daemon
        seen: list[str] = []
        while "running" not in seen:
            event = await asyncio.wait_for(events.get(), TIMEOUT)
            seen.append(event["data"].get("status") or event["event"])
    assert seen.index("shutdown") < seen.index("DEVICE_DELETED") < seen.index("reset")
    assert seen.index("reset") < seen.index("running")
    assert "vnet9" not in rig.service.model.devices
    # The next reset request is handed over again (the reboot action was put back).
    with indicators_qmp.listener(names=("VMM_STATE",)) as events:
        await rig.guest.qmp.execute("system_reset")
        again: list[str] = []
        while "running" not in again:
            event = await asyncio.wait_for(events.get(), TIMEOUT)
            again.append(event["data"]["status"])
    assert again.index("shutdown") < again.index("reset") < again.index("running")
    await rig.guest.wait_rounds(100)
    assert rig.guest.state() == GuestState.RUNNING and rig.guest.rounds() > rounds
    await indicators_qmp.execute("notify", {"device": "blk0", "vector": 1})
    await rig.settle()
    assert await rig.park() == {("blk0", 1): 1}
    assert (await indicators_qmp.execute("query-stats"))["owns-reboot"] is True


async def test_a_guest_reset_qemu_refuses_says_the_devices_are_dropped_anyway(
    tmp_path: Path, qemu: ScriptedQemu
) -> None:
    service = await start_service(tmp_path, qemu.path)
    qemu.refuse["system_reset"] = "no reset today"
    try:
        await wait_until(lambda: "query-status" in qemu.names())
        async with qmp_client(service.socket_path) as client:
            await client.execute("device-add", GUEST_DEVICE)
            with pytest.raises(ExecuteError) as caught:
                await client.execute("guest-reset")
        message = str(caught.value)
        assert "devices were dropped" in message and "no reset today" in message, message
        assert "vnet1" not in service.model.devices
        assert not service.engine.paused  # the reset's hold is released
    finally:
        await service.stop(grace=1.0)


async def test_owning_the_reboot_a_guest_poweroff_still_ends_qemu(
    tmp_path: Path, qemu: ScriptedQemu
) -> None:
    """shutdown: "pause" is set for the reboots only: a guest poweroff is finished with quit."""
    service = await start_service(tmp_path, qemu.path, manage_reboot=True)
    try:
        await wait_until(lambda: "set-action" in qemu.names())
        qemu.emit("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
        await wait_until(lambda: "quit" in qemu.names())
        assert "system_reset" not in qemu.names()
    finally:
        await service.stop(grace=1.0)


async def test_the_same_qemu_connected_again_drops_the_guest_devices_too(
    tmp_path: Path, qemu: ScriptedQemu
) -> None:
    """A RESET sent while the link was down is lost: a reconnect cannot trust the guest's
    registrations, even to the same QEMU."""
    service = await start_service(tmp_path, qemu.path, disconnect_grace=30.0)
    try:
        await wait_until(lambda: service.vmm is not None and service.vmm.connects == 1)
        async with qmp_client(service.socket_path) as client:
            await client.execute("device-add", GUEST_DEVICE)
            with client.listener(names=("DEVICE_DELETED",)) as listener:
                qemu.hang_up()
                deleted = await asyncio.wait_for(listener.get(), TIMEOUT)
            assert dict(deleted["data"]) == {"name": "vnet1", "reason": "vmm-reconnected"}
        assert service.vmm is not None and service.vmm.connects == 2
    finally:
        await service.stop(grace=1.0)
