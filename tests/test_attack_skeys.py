"""Attacks through the storage-key dump: QEMU replaces the file it was told to write.

``dump-skeys`` makes QEMU write a file the daemon then reads.  A fake QEMU
answers by replacing that file with a symlink to a secret, a FIFO or a
symlink to ``/dev/zero``, or (under another uid, unable to replace it) by
writing far more than a dump can be.  The daemon (``indicators run``, a
separate process, refreshing every 0.1 s) must read none of that into its
logs, keep serving its clients, keep refreshing, and stop on SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
from attack_helpers import NOBODY, FakeQemu, owned_dir, wait_for
from daemon_helpers import MEMORY, TIMEOUT, daemon_config, qmp_client, running_daemon

from indicators.config import parse_config
from indicators.daemon.hostfiles import SkeysDump
from indicators.daemon.service import Service
from indicators.daemon.vmm import parse_skeys

SECRET = "TOPSECRET-SKEYS-LINE"


@pytest.mark.parametrize(
    ("uid", "answer", "logged"),
    [
        (None, "symlink:{secret}", None),
        (None, "fifo", None),
        (None, "symlink:/dev/zero", None),
        (NOBODY, "junk:2000000", "over the cap"),
        (None, "fail", "dump failed on purpose"),  # an error of a kind not expected
    ],
)
def test_a_replaced_dump_is_not_read_and_the_refresh_goes_on(
    world: Path, tmp_path: Path, uid: int | None, answer: str, logged: str | None
) -> None:
    secret = world / "secret"
    secret.write_text(f"{SECRET} page=000: key(99)\n")
    secret.chmod(0o600)
    home = owned_dir(world, "qemu", NOBODY if uid else 0, 0o755)
    control = owned_dir(world, "control", 0, 0o711)
    skeys = answer.format(secret=secret)
    with FakeQemu(home, size=MEMORY, uid=uid, skeys=skeys) as qemu:
        raw = daemon_config(
            control / "control.sock",
            ram="auto",
            vmm={"qmp_socket": str(qemu.socket), "skeys_refresh": 0.1},
        )
        with running_daemon(tmp_path, raw) as daemon:
            wait_for(lambda: qemu.dumps() >= 3, "three dump-skeys refreshes")

            async def served() -> object:
                async with qmp_client(daemon.socket) as client:
                    return await asyncio.wait_for(client.execute("query-stats"), TIMEOUT)

            assert "notifications" in asyncio.run(served())  # type: ignore[operator]
            daemon.signal(signal.SIGTERM)
            assert daemon.wait() == 0
            logs = daemon.logs()
    assert SECRET not in logs
    assert "Traceback" not in logs
    if logged is not None:
        assert logged in logs
    assert secret.read_text().startswith(SECRET)
    assert os.stat(secret).st_mode & 0o777 == 0o600


def test_the_dump_is_read_through_the_daemons_own_file(world: Path) -> None:
    dump = SkeysDump(str(world), pages=16)
    try:
        with open(dump.path, "w") as qemu_writes:  # what QEMU's fopen("wb") gets
            qemu_writes.write("page=001: key(48)\n")
        os.unlink(dump.path)
        os.symlink("/dev/zero", dump.path)  # replaced afterwards: not what is read
        assert dump.read() == "page=001: key(48)\n"
    finally:
        dump.close()
    assert not os.path.lexists(dump.path)
    assert not os.path.exists(os.path.dirname(dump.path))


def test_a_bad_dump_is_refused_without_quoting_it() -> None:
    with pytest.raises(ValueError) as refused:
        parse_skeys(f"page=000: key(48)\n{SECRET} whatever\n")
    assert "line 2" in str(refused.value)
    assert SECRET not in str(refused.value)


async def test_a_dump_that_never_comes_times_out_and_is_tried_again(
    world: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = owned_dir(world, "qemu", 0, 0o755)
    control = owned_dir(world, "control", 0, 0o711)
    with FakeQemu(home, size=MEMORY, skeys="hang") as qemu:
        raw = daemon_config(
            control / "control.sock",
            ram="auto",
            vmm={"qmp_socket": str(qemu.socket), "skeys_refresh": 0.05},
        )
        service = Service(parse_config(raw, "<attack>"))
        await service.start()
        try:
            assert service.vmm is not None
            service.vmm.skeys_timeout = 0.2
            loop = asyncio.get_running_loop()
            deadline = loop.time() + TIMEOUT
            while qemu.dumps() < 3:  # asked again and again, never answered
                assert loop.time() < deadline, "the refresh stopped"
                await asyncio.sleep(0.02)
            async with qmp_client(service.socket_path) as client:
                assert "notifications" in await client.execute("query-stats")
        finally:
            await asyncio.wait_for(service.stop(grace=1.0), TIMEOUT)
    assert f"dump-skeys through {qemu.socket} took over 0.2 s" in caplog.text
