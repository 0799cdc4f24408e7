"""eventfds turned against the daemon: semaphore, blocking, someone else's.

A semaphore eventfd hands out one unit per read: with a large count the
daemon would keep reading (and notifying) long after its client left.  A
blocking eventfd would need its flags changed, and those flags belong to
the open file the client shares.  Limits and ownership follow the client's
uid, so a reconnect gains nothing and another uid cannot detach it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

import pytest
from attack_helpers import NOBODY, STRANGER, daemon, foreign_client, owned_dir
from daemon_helpers import NET_DSCI, TIMEOUT, qmp_client
from qemu.qmp import ExecuteError

from indicators.daemon import eventfds


async def attach_error(path: str, efd: int, vector: int) -> str:
    async with qmp_client(path) as client:
        client.send_fd_scm(efd)
        await client.execute("getfd", {"fdname": "ev"})
        with pytest.raises(ExecuteError) as refused:
            await client.execute(
                "attach-eventfd", {"device": "net0", "vector": vector, "fdname": "ev"}
            )
        assert (await client.execute("query-stats"))["eventfds"] == []
        return str(refused.value)


async def test_a_semaphore_eventfd_is_refused(tmp_path: Path) -> None:
    async with daemon(tmp_path / "c.sock") as service:
        efd = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_NONBLOCK)
        try:
            os.eventfd_write(efd, 1 << 40)  # a trillion single reads
            error = await attach_error(service.socket_path, efd, 5)
            assert "device 'net0' vector 5: a semaphore eventfd" in error
            await asyncio.sleep(0)  # had it been attached, its reads would run now
            assert service.eventfds.signals == 0
            assert service.engine.stats.notifications == 0
            assert os.eventfd_read(efd) == 1  # the client's count is untouched
        finally:
            os.close(efd)
        memory = service.wiring.backend.memory  # type: ignore[union-attr]
        assert memory.read(NET_DSCI, 8) == bytes(8)


async def test_a_blocking_eventfd_is_refused_and_its_flags_left_alone(tmp_path: Path) -> None:
    async with daemon(tmp_path / "c.sock") as service:
        efd = os.eventfd(0)  # blocking
        try:
            flags = fcntl.fcntl(efd, fcntl.F_GETFL)
            error = await attach_error(service.socket_path, efd, 6)
            assert "a blocking eventfd is refused" in error and "EFD_NONBLOCK" in error
            assert fcntl.fcntl(efd, fcntl.F_GETFL) == flags, "the shared file's flags changed"
            assert os.get_blocking(efd)
        finally:
            os.close(efd)


async def test_an_eventfd_is_detached_only_by_its_uid_or_a_manager(world: Path) -> None:
    control = owned_dir(world, "control", 0, 0o711)
    async with daemon(
        control / "c.sock", mode=0o666, allowed_uids=[0, NOBODY, STRANGER]
    ) as service:
        path = service.socket_path
        attach = [["getfd-eventfd", "ev"],
                  ["attach-eventfd", {"device": "net0", "vector": 1, "fdname": "ev"}]]  # fmt: skip
        replies = await foreign_client(path, NOBODY, attach)
        assert replies[-1] == {"return": {}}, replies
        detach = [["detach-eventfd", {"device": "net0", "vector": 1}]]
        replies = await foreign_client(path, STRANGER, detach)
        assert replies[-1]["error"]["desc"] == (
            f"device 'net0' vector 1: its eventfd belongs to uid {NOBODY}; "
            f"uid {STRANGER} may not detach it"
        )
        assert [e["vector"] for e in service.eventfds.describe()] == [1]
        replies = await foreign_client(path, NOBODY, detach)  # its owner, on a new connection
        assert replies[-1] == {"return": {}}
        assert service.eventfds.describe() == []
        # Root (a manager) may detach anyone's.
        assert (await foreign_client(path, NOBODY, attach))[-1] == {"return": {}}
        async with qmp_client(path) as root:
            assert await root.execute("detach-eventfd", {"device": "net0", "vector": 1}) == {}


async def test_reconnecting_does_not_raise_a_uids_eventfd_limit(world: Path) -> None:
    control = owned_dir(world, "control", 0, 0o711)
    async with daemon(
        control / "c.sock", mode=0o666, allowed_uids=[0, NOBODY], max_eventfds_per_client=2
    ) as service:
        path = service.socket_path
        for vector in range(3):
            replies = await asyncio.wait_for(
                foreign_client(path, NOBODY, [
                    ["getfd-eventfd", "ev"],
                    ["attach-eventfd", {"device": "net0", "vector": vector, "fdname": "ev"}],
                ]),
                TIMEOUT,
            )  # fmt: skip
            if vector < 2:
                assert replies[-1] == {"return": {}}, replies
        assert replies[-1]["error"]["desc"] == f"uid {NOBODY} may attach at most 2 eventfds"
        assert len(service.eventfds.describe()) == 2


async def test_without_fdinfo_a_semaphore_eventfd_is_caught_by_its_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernels without ``eventfd-semaphore`` in fdinfo: one-unit reads that leave the
    eventfd readable, again and again, unmask it and it is detached."""
    monkeypatch.setattr(eventfds, "eventfd_semaphore", lambda fd: None)
    async with daemon(tmp_path / "c.sock") as service:
        efd = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_NONBLOCK)
        try:
            os.eventfd_write(efd, 1 << 40)
            async with qmp_client(service.socket_path) as client:
                client.send_fd_scm(efd)
                await client.execute("getfd", {"fdname": "ev"})
                args = {"device": "net0", "vector": 5, "fdname": "ev"}
                assert await client.execute("attach-eventfd", args) == {}
                loop = asyncio.get_running_loop()
                deadline = loop.time() + TIMEOUT
                while service.eventfds.describe():
                    assert loop.time() < deadline, "still reading one unit at a time"
                    await asyncio.sleep(0.01)
                assert "notifications" in await client.execute("query-stats")
            assert service.eventfds.signals <= 2 * eventfds._SEMAPHORE_READS
        finally:
            os.close(efd)
