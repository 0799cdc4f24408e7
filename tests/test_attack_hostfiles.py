"""Attacks through files QEMU names: the guest RAM (``qom-get mem-path``).

A fake QEMU under another uid (nobody) answers ``qom-get`` with a symlink
to a root-owned file, a FIFO, a missing path or a root-owned file.  The
daemon (root, in this process) must refuse each with an error naming the
path, change nothing outside the guest's RAM, create nothing and read
nothing into its logs; a QEMU restarted with such an answer must not stop
the daemon serving its clients.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from attack_helpers import NOBODY, PYTHON, FakeQemu, owned_dir
from daemon_helpers import (
    MEMORY,
    NET_DSCI,
    TIMEOUT,
    daemon_config,
    indicators_command,
    qmp_client,
    write_config,
)

from indicators.config import parse_config
from indicators.daemon.hostfiles import HostFileError, open_guest_ram
from indicators.daemon.service import Service

SECRET = b"TOPSECRET-ROOT-ONLY\n"
START = 30.0  # generous: only ends a hang


@pytest.fixture
def victim(world: Path) -> Path:
    """A root-owned 0600 file of exactly the guest's size: what a root daemon could hurt."""
    path = world / "victim"
    path.write_bytes(SECRET + bytes(MEMORY - len(SECRET)))
    path.chmod(0o600)
    return path


def fingerprint(path: Path) -> tuple[int, int, int, bytes]:
    info = os.lstat(path)
    return info.st_mode, info.st_uid, info.st_size, path.read_bytes()


def config(world: Path, qmp: Path) -> Any:
    control = owned_dir(world, "control", 0, 0o711)
    raw = daemon_config(
        control / "control.sock",
        ram="auto",
        vmm={"qmp_socket": str(qmp), "disconnect_grace": 60.0},
    )
    return parse_config(raw, "<attack>")


def no_secret_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert SECRET.strip().decode() not in caplog.text


@pytest.mark.parametrize("answer", ["symlink", "fifo", "missing", "root-owned"])
async def test_qemu_naming_a_file_it_does_not_map_is_refused(
    world: Path, victim: Path, answer: str, caplog: pytest.LogCaptureFixture
) -> None:
    home = owned_dir(world, "qemu", NOBODY, 0o755)
    named = {
        "symlink": home / "link",
        "fifo": home / "fifo",
        "missing": home / "missing",
        "root-owned": victim,
    }[answer]
    if answer == "symlink":
        named.symlink_to(victim)
    elif answer == "fifo":
        os.mkfifo(named)
    before = fingerprint(victim)
    caplog.set_level(logging.DEBUG, logger="indicators")
    with FakeQemu(home, size=MEMORY, uid=NOBODY, mem_path=str(named)):
        service = Service(config(world, home / "qmp.sock"))
        try:
            with pytest.raises(HostFileError) as refused:
                await asyncio.wait_for(service.start(), START)
        finally:
            await service.stop(grace=1.0)
    assert refused.value.path == str(named)
    assert str(named) in str(refused.value)
    assert fingerprint(victim) == before  # not written, not chmod-ed
    if answer == "missing":
        assert not named.exists(), "the daemon must never create the RAM file"
    if answer == "fifo":
        assert stat.S_ISFIFO(os.lstat(named).st_mode)
    no_secret_logged(caplog)


async def test_the_ram_qemu_maps_is_what_the_daemon_writes(world: Path) -> None:
    home = owned_dir(world, "qemu", NOBODY, 0o755)
    with FakeQemu(home, size=MEMORY, uid=NOBODY) as qemu:
        service = Service(config(world, qemu.socket))
        try:
            await asyncio.wait_for(service.start(), START)
            async with qmp_client(service.socket_path) as client:
                assert await client.execute("notify", {"device": "net0", "vector": 3}) == {
                    "applied": 1
                }
            # The bit is in QEMU's own file (its uid's), seen through the file itself.
            assert qemu.ram.read_bytes()[NET_DSCI] == 0x80 >> 3
            assert os.stat(qemu.ram).st_uid == NOBODY
        finally:
            await service.stop(grace=1.0)


async def test_a_restarted_qemu_naming_a_symlink_is_refused_while_clients_are_served(
    world: Path, victim: Path, caplog: pytest.LogCaptureFixture
) -> None:
    home = owned_dir(world, "qemu", NOBODY, 0o755)
    link = home / "link"
    link.symlink_to(victim)
    before = fingerprint(victim)
    caplog.set_level(logging.INFO, logger="indicators")
    qmp = home / "qmp.sock"
    service = Service(config(world, qmp))
    try:
        with FakeQemu(home, size=MEMORY, uid=NOBODY):
            await asyncio.wait_for(service.start(), START)
        evil_home = owned_dir(world, "qemu2", NOBODY, 0o755)
        with FakeQemu(evil_home, size=MEMORY, uid=NOBODY, mem_path=str(link), socket_path=qmp):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + START
            while "attaching to QEMU at" not in caplog.text:
                assert loop.time() < deadline, "the link never tried the new QEMU"
                await asyncio.sleep(0.02)
            async with qmp_client(service.socket_path) as client:
                stats = await client.execute("query-stats")
                assert stats["vmm"] == "disconnected"
                assert stats["holds"] == ["disconnected"]
        assert str(link) in caplog.text
        assert fingerprint(victim) == before
        no_secret_logged(caplog)
    finally:
        await service.stop(grace=1.0)


def test_the_ram_is_opened_with_run_as_rights_only(world: Path, tmp_path: Path) -> None:
    """A root QEMU's root-only RAM: a daemon that drops to nobody must not map it."""
    home = owned_dir(world, "qemu", 0, 0o755)
    control = owned_dir(world, "control", NOBODY, 0o755)
    with FakeQemu(home, size=MEMORY) as qemu:  # root, its RAM file root's 0600
        qemu.socket.chmod(0o666)
        raw = daemon_config(
            control / "control.sock",
            ram="auto",
            vmm={"qmp_socket": str(qemu.socket)},
            run_as={"user": "nobody"},
        )
        config = write_config(tmp_path / "daemon.toml", raw)
        before = qemu.ram.read_bytes()
        result = subprocess.run(
            indicators_command("run", "--config", str(config)),
            capture_output=True, text=True, timeout=3 * TIMEOUT,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        assert f"{qemu.ram}: cannot open the guest RAM file: Permission denied" in result.stderr
        assert "Traceback" not in result.stderr
        assert qemu.ram.read_bytes() == before
        assert not (control / "control.sock").exists()


# ---------------------------------------------- without ptrace rights: by name


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        ("symlink", "is a symlink"),
        ("fifo", "is not a regular file"),
        ("missing", "No such file"),
        ("short", "has 0x1000 bytes; the guest's memory_size is 0x100000"),
        ("foreign", f"belongs to uid 0, not to QEMU's uid {NOBODY}"),
        ("directory", "Is a directory"),
    ],
)
def test_opening_by_name_refuses_what_qemu_could_redirect(
    world: Path, victim: Path, make: str, reason: str
) -> None:
    home = owned_dir(world, "qemu", NOBODY, 0o755)
    path = home / make
    if make == "symlink":
        path.symlink_to(victim)
    elif make == "fifo":
        os.mkfifo(path)
    elif make == "short":
        path.write_bytes(bytes(4096))
        os.chown(path, NOBODY, NOBODY)
    elif make == "foreign":
        path = victim
    elif make == "directory":
        path.mkdir()
        os.chown(path, NOBODY, NOBODY)
    before = fingerprint(victim)
    with pytest.raises(HostFileError) as refused:
        open_guest_ram(str(path), MEMORY, None, NOBODY)
    assert reason in str(refused.value)
    assert fingerprint(victim) == before
    if make == "missing":
        assert not path.exists()


def test_opening_by_name_takes_qemus_file(world: Path) -> None:
    home = owned_dir(world, "qemu", NOBODY, 0o755)
    path = home / "ram"
    path.write_bytes(bytes(MEMORY))
    os.chown(path, NOBODY, NOBODY)
    fd = open_guest_ram(str(path), MEMORY, None, NOBODY)
    with contextlib.closing(os.fdopen(fd, "rb")) as ram:
        assert os.fstat(ram.fileno()).st_ino == os.stat(path).st_ino
        assert os.get_inheritable(fd) is False


# QEMU (nobody) holds a read lease on the file it names: whoever opens it for
# writing breaks the lease and, unless the open is non-blocking, waits for the
# holder to give it up: up to fs.lease-break-time (45 s), the daemon's whole loop.
_LEASE_HOLDER = r"""
import fcntl, os, signal, sys
signal.signal(signal.SIGIO, signal.SIG_IGN)  # the break notice
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.fcntl(fd, getattr(fcntl, "F_SETLEASE", 1024), fcntl.F_RDLCK)
print("ready", flush=True)
sys.stdin.read()
"""


def test_opening_by_name_does_not_wait_for_a_lease_qemu_holds(world: Path) -> None:
    home = owned_dir(world, "qemu", NOBODY, 0o755)
    path = home / "ram"
    path.write_bytes(bytes(MEMORY))
    os.chown(path, NOBODY, NOBODY)
    holder = subprocess.Popen(
        [PYTHON, "-c", _LEASE_HOLDER, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, user=NOBODY,
    )  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
            opening = pool.submit(open_guest_ram, str(path), MEMORY, None, NOBODY)
            refused = opening.exception(timeout=5.0)  # TimeoutError: it waits for the lease
        finally:
            holder.kill()  # its lease goes with it: a blocked open returns
            holder.wait()
            with contextlib.suppress(Exception):
                os.close(opening.result(timeout=TIMEOUT))
    assert isinstance(refused, HostFileError) and refused.errno == errno.EAGAIN, refused
    assert "cannot open the guest RAM file" in str(refused)
