"""What keeps the notify latency's tail short: a frozen start-up, no work for absent listeners."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import TIMEOUT, daemon_config, qmp_client, wait_until

from indicators.config import parse_config
from indicators.daemon import qmp_server
from indicators.daemon.qmp_server import QmpServer
from indicators.daemon.service import Service


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Leave the test process's collector as it was found."""
    gc.unfreeze()
    yield
    gc.unfreeze()


async def test_a_running_daemon_keeps_its_start_up_objects_out_of_collections(
    tmp_path: Path, unfrozen: None
) -> None:
    service = Service(parse_config(daemon_config(tmp_path / "control.sock"), "<test>"))
    running = asyncio.create_task(service.run())
    try:
        await wait_until(lambda: os.path.exists(service.socket_path))
        await wait_until(lambda: gc.get_freeze_count() > 0)
        # The engine and its model were made at start-up: frozen, a full
        # collection does not walk them.
        frozen = gc.get_freeze_count()
        assert frozen > 1000, f"only {frozen} objects frozen"
        async with qmp_client(service.socket_path) as client:
            assert await client.execute("notify", {"device": "net0", "vector": 0}) == {"applied": 1}
            assert await client.execute("quit") == {}
        await asyncio.wait_for(running, TIMEOUT)
    finally:
        if not running.done():
            service.request_stop("test over")
            await asyncio.wait_for(running, TIMEOUT)


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
