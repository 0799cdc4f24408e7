"""What keeps notify latency short: a frozen start-up, no work for absent listeners, one send."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import (
    TIMEOUT,
    RawClient,
    daemon_config,
    qmp_client,
    wait_until,
    write_config,
)

from indicators.config import load_config
from indicators.daemon import qmp_server
from indicators.daemon.qmp_server import QmpServer, QmpSession
from indicators.daemon.service import Service


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Leave the test process's collector as it was found."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def _frozen(thing: object) -> bool:
    """Whether ``thing`` sits in the permanent generation (no collection walks it)."""
    assert gc.is_tracked(thing)
    return not any(
        candidate is thing for generation in (0, 1, 2) for candidate in gc.get_objects(generation)
    )


async def test_a_running_daemon_keeps_its_long_lived_objects_out_of_collections(
    tmp_path: Path, unfrozen: None
) -> None:
    path = write_config(tmp_path / "daemon.toml", daemon_config(tmp_path / "control.sock"))
    service = Service(load_config(str(path)), config_path=str(path))
    running = asyncio.create_task(service.run())
    try:
        await wait_until(lambda: os.path.exists(service.socket_path))
        await wait_until(lambda: gc.get_freeze_count() > 0)
        # Made at start-up: frozen, a full collection does not walk them.
        assert _frozen(service.model) and _frozen(service.engine)
        # A reload is a diff of the live set: the engine stays, frozen; a device the
        # new config drops is freed once its bits are closed: nothing (engine caches,
        # registry, adapter) keeps it, so the freeze cannot pin it either.
        engine = service.engine
        dropped = weakref.ref(service.model.devices["pci0"])
        raw = daemon_config(tmp_path / "control.sock")
        raw["devices"] = [d for d in raw["devices"] if d["name"] != "pci0"]
        write_config(path, raw)
        assert service.reload() == "reloaded"
        assert service.engine is engine and _frozen(service.model) and _frozen(service.engine)
        # its bits close once the batch running at removal is done (a loop pass later)
        await wait_until(lambda: not service.registry._tasks)
        gc.collect()
        assert dropped() is None, "the dropped device stayed pinned"
        async with qmp_client(service.socket_path) as client:
            notified = await client.execute("notify", {"device": "net0", "vector": 0})
            assert notified == {"applied": 1}
            assert await client.execute("quit") == {}
        await asyncio.wait_for(running, TIMEOUT)
    finally:
        if not running.done():
            service.request_stop("test over")
            await asyncio.wait_for(running, TIMEOUT)


async def test_a_service_started_in_process_freezes_nothing(tmp_path: Path, unfrozen: None) -> None:
    # Tests and embedders start a Service in their own process: their objects
    # are not the daemon's to pin.
    path = write_config(tmp_path / "daemon.toml", daemon_config(tmp_path / "control.sock"))
    service = Service(load_config(str(path)), config_path=str(path))
    await service.start()
    try:
        assert service.reload() == "reloaded"
        assert gc.get_freeze_count() == 0
    finally:
        await service.stop()


async def test_an_event_nobody_can_receive_is_not_encoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded: list[object] = []
    real_encode = qmp_server.encode

    def counting(message: dict[str, object]) -> bytes:
        if "event" in message:
            encoded.append(message)
        return real_encode(message)

    monkeypatch.setattr(qmp_server, "encode", counting)
    server = QmpServer(str(tmp_path / "s.sock"), version=(9, 2, 0), package="test")
    async with server:
        assert server.broadcast_event("ADAPTER_INTERRUPT", {"adapter": 3, "isc": 3}) == 0
        assert encoded == []
        async with qmp_client(str(tmp_path / "s.sock")) as client:
            await client.execute("query-version")
            assert server.broadcast_event("ADAPTER_INTERRUPT", {"adapter": 3, "isc": 3}) == 1
            assert len(encoded) == 1


class _CountingSocket:
    """A session's real socket, counting the sends (a probe around it, not a fake)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sends: list[bytes] = []

    def send(self, data: bytes) -> int:
        sent = self._sock.send(data)
        self.sends.append(bytes(data[:sent]))
        return sent

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


async def test_an_event_and_the_reply_of_the_command_that_raised_it_leave_in_one_send(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "s.sock")
    server = QmpServer(path, version=(9, 2, 0), package="test")

    async def ring(args: None, session: QmpSession) -> object:
        server.broadcast_event("ADAPTER_INTERRUPT", {"adapter": 3, "isc": 3})
        return {"rang": 1}

    server.register("ring", ring)
    async with server:
        client = await RawClient.connect(path)
        try:
            (session,) = server._sessions
            probe = _CountingSocket(session._outbox._sock)
            session._outbox._sock = probe  # type: ignore[assignment]
            client.send(b'{"execute": "ring"}\n')
            event = await asyncio.wait_for(client.recv(), TIMEOUT)
            reply = await asyncio.wait_for(client.recv(), TIMEOUT)
        finally:
            await client.close()
    assert event["event"] == "ADAPTER_INTERRUPT"
    assert reply == {"return": {"rang": 1}}
    assert len(probe.sends) == 1, f"{len(probe.sends)} sends: {probe.sends}"


async def test_an_event_outside_any_command_still_goes_out_in_the_same_loop_pass(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "s.sock")
    server = QmpServer(path, version=(9, 2, 0), package="test")
    async with server:
        client = await RawClient.connect(path)
        try:
            await wait_until(lambda: len(server._sessions) == 1)
            assert server.broadcast_event("ADAPTER_INTERRUPT", {"adapter": 3, "isc": 3}) == 1
            event = await asyncio.wait_for(client.recv(), TIMEOUT)
        finally:
            await client.close()
    assert event["event"] == "ADAPTER_INTERRUPT"


class _ManyKeys:
    """A VMM link whose guest has ``pages`` pages of storage keys (a fake of dump-skeys)."""

    def __init__(self, pages: int) -> None:
        self.pages = pages

    async def storage_keys(self, pages: int | None = None) -> dict[int, int]:
        return dict.fromkeys(range(self.pages), 0x10)

    async def stop(self) -> None:
        pass


async def test_a_big_storage_key_refresh_lets_the_loop_run_between_chunks(
    tmp_path: Path,
) -> None:
    raw = daemon_config(tmp_path / "control.sock")
    raw["backend"]["memory_size"] = 64 << 20  # 16,384 pages
    service = Service(load_config(str(write_config(tmp_path / "d.toml", raw))))
    await service.start()
    try:
        service.vmm = _ManyKeys(16384)  # type: ignore[assignment]
        backend = service.wiring.backend  # type: ignore[union-attr]
        last = 16383 << 12
        seen: list[int] = []
        # Other work of the loop (a notification, a reply) waits for the
        # refresh only until its first chunk is done, not for all of it.
        asyncio.get_running_loop().call_soon(lambda: seen.append(backend.get_storage_key(last)))
        assert await service.refresh_storage_keys() == 16384
        assert seen == [0], "the loop ran only after every key was set"
        assert backend.get_storage_key(last) == 0x10
    finally:
        await service.stop()


async def test_with_metrics_the_loop_takes_the_gil_back_from_a_scrape_sooner(
    tmp_path: Path, unfrozen: None
) -> None:
    raw = daemon_config(tmp_path / "control.sock", metrics={"port": 0})
    service = Service(load_config(str(write_config(tmp_path / "d.toml", raw))))
    default = sys.getswitchinterval()
    running = asyncio.create_task(service.run())
    try:
        await wait_until(lambda: service.metrics_port is not None and gc.get_freeze_count() > 0)
        assert sys.getswitchinterval() <= 0.0005 < default
    finally:
        service.request_stop("test over")
        await asyncio.wait_for(running, TIMEOUT)
    assert sys.getswitchinterval() == default
