"""A greedy allowed client against everyone else: every resource it can take is capped.

Each test plays one greedy client (stored fds, fds sent with other
messages, connections of one uid, connections in all, connections that
never negotiate or go idle, a notify with a huge vector list, a flood of
refused connections) and checks that the cap holds, the daemon's fds come
back, nothing outside the guest's RAM changed, and another client is served.
"""

from __future__ import annotations

import array
import asyncio
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from attack_helpers import NOBODY, daemon, foreign_client, open_fds, owned_dir
from daemon_helpers import (
    LOCKED_PAGE,
    NET_DSCI,
    TIMEOUT,
    RawClient,
    daemon_config,
    qmp_client,
    wait_until,
)
from qemu.qmp import ExecuteError

from indicators.config import parse_config
from indicators.daemon import qmp_server
from indicators.daemon.loglimit import LogLimiter
from indicators.daemon.service import Service


async def served(path: str) -> None:
    """Another client gets a full round trip."""
    async with qmp_client(path, "bystander") as client:
        stats = await asyncio.wait_for(client.execute("query-stats"), TIMEOUT)
        assert "notifications" in stats


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])


# ----------------------------------------------------------------- fds


async def test_stored_fds_are_capped_per_client(tmp_path: Path) -> None:
    async with daemon(tmp_path / "c.sock", max_fds_per_client=4) as service:
        efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(10)]
        baseline = open_fds()
        try:
            async with qmp_client(service.socket_path, "greedy") as greedy:
                refused = []
                for number, efd in enumerate(efds):
                    greedy.send_fd_scm(efd)
                    try:
                        await greedy.execute("getfd", {"fdname": f"f{number}"})
                    except ExecuteError as exc:
                        refused.append(str(exc))
                assert len(refused) == 6
                assert "at most 4 fds" in refused[0]
                # The daemon keeps 4 of them, no more (+2: both ends of the connection).
                assert open_fds() == baseline + 2 + 4
                await served(service.socket_path)
            await wait_until(lambda: open_fds() == baseline)
        finally:
            for efd in efds:
                os.close(efd)


async def test_an_fd_belongs_to_the_message_that_carried_it(tmp_path: Path) -> None:
    async with daemon(tmp_path / "c.sock") as service:
        efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
        baseline = open_fds()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect(service.socket_path)
        client = RawClient(*await asyncio.open_unix_connection(sock=sock))
        assert "QMP" in await client.recv()
        assert await client.execute("qmp_capabilities") == {"return": {}}
        try:
            # Three fds with a command that takes none: closed once it is answered.
            send_with_fds(sock, b'{"execute": "query-stats", "id": 1}\n', efds)
            assert (await client.reply())["id"] == 1
            assert open_fds() == baseline + 2  # only the connection's two ends
            # So they cannot shift onto a later getfd that came without an fd.
            reply = await client.execute("getfd", arguments={"fdname": "late"})
            assert reply["error"]["desc"] == "No file descriptor supplied via SCM_RIGHTS"
            # An fd sent with its own getfd is the one stored.
            send_with_fds(sock, b'{"execute": "getfd", "arguments": {"fdname": "mine"}}\n',
                          efds[:1])  # fmt: skip
            assert (await client.reply()) == {"return": {}}
            assert open_fds() == baseline + 2 + 1
            await served(service.socket_path)
        finally:
            await client.close()
            for efd in efds:
                os.close(efd)
        await wait_until(lambda: open_fds() == baseline - len(efds))


# ------------------------------------------------------------- sessions


async def refused_connection(path: str) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        first = json.loads(await asyncio.wait_for(reader.readline(), TIMEOUT))
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"", "hung up at once"
        return first  # type: ignore[no-any-return]
    finally:
        writer.close()


async def test_connections_of_one_uid_are_capped_and_other_uids_still_served(
    world: Path,
) -> None:
    control = owned_dir(world, "control", 0, 0o711)
    async with daemon(
        control / "c.sock", mode=0o666, allowed_uids=[0, NOBODY], max_clients_per_uid=3
    ) as service:
        greedy = [await RawClient.connect(service.socket_path) for _ in range(3)]
        try:
            first = await refused_connection(service.socket_path)
            assert first["error"]["desc"] == "too many clients of uid 0: at most 3 at once"
            replies = await foreign_client(service.socket_path, NOBODY, [["query-stats"]])
            assert "QMP" in replies[0] and "return" in replies[1], replies
            assert service.server is not None and service.server.refused_over_cap == 1
        finally:
            for client in greedy:
                await client.close()
        await served(service.socket_path)  # a closed connection frees its place


async def test_connections_in_all_are_capped(world: Path) -> None:
    control = owned_dir(world, "control", 0, 0o711)
    async with daemon(
        control / "c.sock", mode=0o666, allowed_uids=[0, NOBODY], max_clients=3
    ) as service:
        greedy = [await RawClient.connect(service.socket_path) for _ in range(3)]
        try:
            replies = await foreign_client(service.socket_path, NOBODY, [["query-stats"]])
            assert [r["error"]["desc"] for r in replies] == ["too many clients: at most 3 at once"]
        finally:
            await greedy[0].close()
        await served(service.socket_path)
        for client in greedy[1:]:
            await client.close()


async def test_connections_that_never_negotiate_are_dropped(tmp_path: Path) -> None:
    async with daemon(tmp_path / "c.sock", negotiation_timeout=0.2) as service:
        baseline = open_fds()
        idle = [await RawClient.connect(service.socket_path, negotiate=False) for _ in range(40)]
        await served(service.socket_path)  # meanwhile, others are served
        for client in idle:
            message = await client.recv()
            assert message["error"]["desc"].startswith("Capabilities negotiation timed out")
            assert await client.at_eof()
            await client.close()
        await wait_until(lambda: open_fds() == baseline)


async def test_a_client_has_30_s_to_negotiate_by_default(tmp_path: Path) -> None:
    """Without ``negotiation_timeout`` in the config, the cap still holds."""
    raw = daemon_config(tmp_path / "c.sock")
    raw.get("control", {}).pop("negotiation_timeout", None)
    config = parse_config(raw, "<attack>")
    assert config.control is not None and config.control.negotiation_timeout == 30.0
    async with daemon(tmp_path / "d.sock") as service:
        assert service.server is not None and service.server.negotiation_timeout == 30.0


async def test_an_idle_client_is_dropped_when_configured(tmp_path: Path) -> None:
    async with daemon(tmp_path / "c.sock", idle_timeout=0.2) as service:
        client = await RawClient.connect(service.socket_path)
        assert await client.at_eof()
        await client.close()
        await served(service.socket_path)


# --------------------------------------------------------------- notify


async def test_a_huge_failing_vector_list_gets_one_short_answer_and_one_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="indicators")
    async with daemon(tmp_path / "c.sock", max_message=1 << 20) as service:
        memory = service.wiring.backend.memory  # type: ignore[union-attr]
        before = memory.snapshot()
        huge = [0, 1, 2, 3] * 8175  # 32,700 entries on the protected device
        async with qmp_client(service.socket_path, "greedy") as greedy, qmp_client(
            service.socket_path, "watcher"
        ) as watcher:
            with watcher.listener(names=("NOTIFY_FAILED",)) as listener:
                for _ in range(20):
                    with pytest.raises(ExecuteError) as failed:
                        await greedy.execute("notify", {"device": "locked", "vector": huge})
                    await watcher.execute("query-stats")  # events of the batch came before
                events = []
                while not listener.empty():
                    events.append(await listener.get())
        desc = str(failed.value)
        assert len(desc) < 2000, len(desc)
        assert desc.startswith("device 'locked': 0 of 4 applied, 4 failed (code 4: 4);")
        assert len(events) == 20, "one NOTIFY_FAILED per batch"
        assert events[0]["data"]["count"] == 4 and events[0]["data"]["codes"] == {"4": 4}
        assert memory.snapshot() == before  # nothing changed anywhere
        lines = [r for r in caplog.records if r.getMessage().startswith("notify failed")]
        assert 1 <= len(lines) <= 10, len(lines)
        assert service.engine.stats.failures == {"4": 80}
        await served(service.socket_path)


async def test_a_batch_with_many_failures_is_summed_up_not_listed(tmp_path: Path) -> None:
    raw = daemon_config(tmp_path / "c.sock", control={"max_message": 1 << 20})
    raw["backend"]["faults"] = {"protected": [[NET_DSCI, 8]]}  # every net0 store faults
    service = Service(parse_config(raw, "<attack>"))
    await service.start()
    try:
        async with qmp_client(service.socket_path) as client:
            with pytest.raises(ExecuteError) as failed:
                await client.execute("notify", {"device": "net0", "vector": list(range(64)) * 100})
        desc = str(failed.value)
        assert desc.startswith("device 'net0': 0 of 64 applied, 64 failed (code 4: 64); ")
        assert desc.endswith("; and 59 more")
        assert desc.count("vector ") == 5 and len(desc) < 2000
    finally:
        await service.stop(grace=1.0)


async def test_a_huge_vector_list_counts_each_vector_once(tmp_path: Path) -> None:
    async with daemon(tmp_path / "c.sock", max_message=1 << 20) as service:
        async with qmp_client(service.socket_path) as client:
            huge = list(range(64)) * 500
            assert await client.execute("notify", {"device": "net0", "vector": huge}) == {
                "applied": 64
            }
        memory = service.wiring.backend.memory  # type: ignore[union-attr]
        assert memory.read(NET_DSCI, 8) == b"\xff" * 8
        assert service.engine.stats.notifications == 64
        assert memory.read(LOCKED_PAGE, 0x200) == bytes(0x200)


# ----------------------------------------------------------- refusals


async def test_a_flood_of_refused_peers_logs_a_few_lines(
    world: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qmp_server, "_LIMITER", LogLimiter(burst=5, period=60.0))
    caplog.set_level(logging.WARNING, logger="indicators")
    control = owned_dir(world, "control", 0, 0o711)
    async with daemon(control / "c.sock", mode=0o666, allowed_uids=[0]) as service:
        for _ in range(12):
            replies = await foreign_client(service.socket_path, NOBODY, [])
            assert [r["error"]["desc"] for r in replies] == [f"Permission denied for uid {NOBODY}"]
        await served(service.socket_path)
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 5, lines
    assert all(f"uid {NOBODY}" in line for line in lines)
