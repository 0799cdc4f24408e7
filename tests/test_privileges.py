"""Least privilege: the daemon drops to a configured user; the unit grants nothing more."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from daemon_helpers import (
    daemon_config,
    indicators_command,
    qmp_client,
    running_daemon,
    write_config,
)

ROOT = Path(__file__).resolve().parent.parent

needs_root = pytest.mark.needs(os.geteuid() == 0, reason="dropping privileges needs root")


def _ids(pid: int) -> tuple[list[int], list[int]]:
    status = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    gids = re.search(r"^Gid:\s+(.*)$", status, re.M)
    assert uids and gids
    return [int(x) for x in uids.group(1).split()], [int(x) for x in gids.group(1).split()]


@needs_root
def test_run_as_drops_to_the_user_after_opening_the_ram_file(tmp_path: Path) -> None:
    # The pytest directories are root's 0700: the socket goes where nobody can reach.
    sockets = Path(tempfile.mkdtemp(prefix="indicators-run-as-"))
    sockets.chmod(0o755)
    os.chown(sockets, 65534, 65534)  # the run_as user's own directory (no one else writes it)
    ram = tmp_path / "ram"  # created by root, mode 0600: only the pre-drop open can map it
    raw = daemon_config(sockets / "control.sock", ram=ram, run_as={"user": "nobody"})
    with running_daemon(tmp_path, raw) as daemon:
        uids, gids = _ids(daemon.process.pid)
        assert uids == [65534] * 4 and gids == [65534] * 4, (uids, gids)
        assert os.stat(daemon.socket).st_uid == 65534
        assert oct(os.stat(ram).st_mode & 0o777) == "0o600"
        status = Path(f"/proc/{daemon.process.pid}/status").read_text()
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), "no new privileges once started"

        async def notify() -> object:
            async with qmp_client(daemon.socket) as client:  # root is always admitted
                return await client.execute("notify", {"device": "net0", "vector": 3})

        assert asyncio.run(notify()) == {"applied": 1}
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    shutil.rmtree(sockets)


def test_an_unknown_run_as_user_is_a_clear_error(tmp_path: Path) -> None:
    raw = daemon_config(tmp_path / "control.sock", run_as={"user": "no-such-user-here"})
    config = write_config(tmp_path / "c.toml", raw)
    result = subprocess.run(
        indicators_command("run", "--config", str(config)), capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert "run_as.user: no user named 'no-such-user-here'" in result.stderr


def _unit() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (ROOT / "deploy" / "indicators@.service").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_systemd_unit_grants_nothing_more() -> None:
    unit = _unit()
    assert unit["Type"] == ["notify"] and unit["WatchdogSec"]
    assert unit["ExecStart"][0].endswith('run --config "/etc/indicators/%I.toml" --log-json')
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["CapabilityBoundingSet"] == [""], "no capability by default"
    assert unit["AmbientCapabilities"] == [""]
    assert unit["User"] == ["libvirt-qemu"], "QEMU's user: RAM file and QMP socket, no ptrace cap"
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX"]
    for setting in ("PrivateTmp", "ProtectHome", "ProtectKernelTunables", "RestrictNamespaces"):
        assert unit[setting] == ["yes"], setting


def test_tmpfiles_and_hook_match_the_unit() -> None:
    tmpfiles = (ROOT / "deploy" / "indicators.tmpfiles.conf").read_text()
    assert re.search(r"^d /run/indicators 0750 libvirt-qemu ", tmpfiles, re.M)
    hook = ROOT / "deploy" / "libvirt-qemu-hook"
    assert os.access(hook, os.X_OK)
    text = hook.read_text()
    assert 'f"indicators@{systemd_escape(name)}.service"' in text and '"--no-block"' in text
