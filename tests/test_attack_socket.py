"""Attacks on the control socket's file: a second uid racing the socket directory.

The old server bound the socket and then chmod-ed it by name; a user who
could write the directory swapped the socket for a symlink in between and
had a root-owned file's mode changed.  Now the socket is created with its
final mode, and a directory another user can write is refused at start.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from attack_helpers import NOBODY, PYTHON, as_uid, owned_dir
from daemon_helpers import TIMEOUT, daemon_config, indicators_command, write_config

from indicators.daemon.qmp_server import QmpServer, SocketDirError

# Swaps ``control.sock`` for a symlink to the victim as fast as it can.
_RACER = r"""
import os, sys
path, victim = sys.argv[1:3]
print("racing", flush=True)
while True:
    try:
        os.rename(path, path + ".old")
    except OSError:
        pass
    try:
        os.symlink(victim, path + ".tmp")
        os.rename(path + ".tmp", path)
    except OSError:
        pass
"""


@pytest.fixture
def victim(world: Path) -> Path:
    path = world / "victim"
    path.write_text("root's\n")
    path.chmod(0o600)
    return path


def server(path: Path) -> QmpServer:
    return QmpServer(str(path), mode=0o666, version=(1, 0, 0))


async def test_a_directory_others_can_write_is_refused_while_a_second_uid_races(
    world: Path, victim: Path
) -> None:
    shared = world / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by everyone, not sticky
    racer = subprocess.Popen(
        [*as_uid(NOBODY), PYTHON, "-c", _RACER, str(shared / "control.sock"), str(victim)],
        stdout=subprocess.PIPE,
    )
    try:
        assert racer.stdout is not None and racer.stdout.readline() == b"racing\n"
        for _ in range(20):
            qmp = server(shared / "control.sock")
            with pytest.raises(SocketDirError) as refused:
                await qmp.start()
            await qmp.stop()
    finally:
        racer.kill()
        racer.wait()
    assert refused.value.directory == str(shared)
    assert "writable by other users" in str(refused.value) and str(shared) in str(refused.value)
    assert (os.stat(victim).st_mode & 0o777, os.stat(victim).st_uid) == (0o600, 0)


async def test_a_directory_of_another_user_is_refused(world: Path) -> None:
    theirs = owned_dir(world, "theirs", NOBODY, 0o755)
    qmp = server(theirs / "control.sock")
    with pytest.raises(SocketDirError, match="belongs to another user"):
        await qmp.start()
    assert not (theirs / "control.sock").exists()


async def test_a_sticky_directory_is_fine_and_the_socket_cannot_be_swapped(
    world: Path, victim: Path
) -> None:
    sticky = world / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # /tmp-like: others may create, not rename or remove ours
    path = sticky / "control.sock"
    qmp = QmpServer(str(path), mode=0o600, version=(1, 0, 0))
    await qmp.start()
    try:
        swap = subprocess.run(
            [*as_uid(NOBODY), PYTHON, "-c", _RACER.replace("while True:", "for _ in range(50):"),
             str(path), str(victim)],
            capture_output=True, timeout=30,
        )  # fmt: skip
        assert swap.returncode == 0
        assert path.is_socket() and not path.is_symlink()
        assert os.stat(path).st_mode & 0o777 == 0o600
    finally:
        await qmp.stop()
    assert os.stat(victim).st_mode & 0o777 == 0o600


async def test_the_socket_is_born_with_its_mode_and_never_chmod_ed_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_chmod_by_name(path: object, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"chmod by name of {path}: a swapped name would be followed")

    monkeypatch.setattr(os, "chmod", no_chmod_by_name)
    old = os.umask(0)  # the socket's mode must not depend on the caller's umask
    try:
        qmp = QmpServer(str(tmp_path / "control.sock"), mode=0o640, version=(1, 0, 0))
        await qmp.start()
        assert os.umask(0) == 0, "the server restores the umask"
        assert os.lstat(tmp_path / "control.sock").st_mode & 0o777 == 0o640
        await qmp.stop()
    finally:
        os.umask(old)


def test_indicators_run_names_the_directory_and_shows_no_traceback(world: Path) -> None:
    shared = world / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    config = write_config(world / "daemon.toml", daemon_config(shared / "control.sock"))
    result = subprocess.run(
        indicators_command("run", "--config", str(config)),
        capture_output=True, text=True, timeout=3 * TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"control socket directory {shared} (owner uid 0, mode 0777) is writable by " in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (shared / "control.sock").exists()
