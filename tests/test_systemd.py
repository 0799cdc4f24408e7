"""systemd integration: sd_notify, the watchdog, JSON log lines; the unit and tmpfiles entry.

The unit and the tmpfiles entry are checked with the ``systemd`` package's
own tools where they are installed (CI installs them, scripts/system-deps.sh):
``systemd-analyze verify`` and ``security --offline``, ``systemd-tmpfiles
--create --root``.  Without systemd as PID 1 nothing here starts the unit.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import daemon_config, indicators_command, qmp_client, write_config
from qemu.qmp import ExecuteError

from indicators.config import VmmConfig
from indicators.daemon.vmm import VmmLink, parse_skeys


def datagrams(sock: socket.socket, until: str, timeout: float = 10.0) -> list[str]:
    """Receive sd_notify datagrams until one contains ``until``."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while not any(until in message for message in seen):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        seen.append(sock.recv(4096).decode())
    return seen


def test_ready_watchdog_stopping_and_json_failure_logs(tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    raw = daemon_config(tmp_path / "control.sock")
    config = write_config(tmp_path / "c.toml", raw)
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000"}
    log = tmp_path / "log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            indicators_command("run", "--config", str(config), "--log-json"),
            env=env, stdout=sink, stderr=sink,
        )  # fmt: skip
    try:
        ready = datagrams(listener, "READY=1")
        assert "STATUS=serving 4 devices" in ready[-1]
        pings = datagrams(listener, "WATCHDOG=1") + datagrams(listener, "WATCHDOG=1")
        assert sum("WATCHDOG=1" in message for message in pings) >= 2

        async def fail_one() -> None:
            async with qmp_client(str(tmp_path / "control.sock")) as client:
                try:
                    await client.execute("notify", {"device": "locked", "vector": 1})
                except ExecuteError:
                    return
                raise AssertionError("the keyed notify should fail with protection")

        asyncio.run(fail_one())
        process.send_signal(signal.SIGTERM)
        assert any("STOPPING=1" in m for m in datagrams(listener, "STOPPING=1"))
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        listener.close()
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    failure = next(e for e in entries if e["message"].startswith("notify failed"))
    assert failure["level"] == "warning" and failure["code"] == "4"
    assert failure["device"] == "locked" and failure["vector"] == 1 and failure["key"] == 5
    # the summary (same page, same key) is checked before the dsci is written
    assert failure["adapter"] == "virtio-ccw/4" and failure["gaddr"] == 0x20000
    assert failure["where"] == "summary" and failure["size"] == 1


class Hooks:
    """Records what the VMM link asks of the daemon."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def hold(self, reason: str) -> None:
        self.calls.append(("hold", reason))

    def release(self, reason: str) -> None:
        self.calls.append(("release", reason))

    def unavailable(self, reason: str) -> None:
        self.calls.append(("unavailable", reason))

    def available(self) -> None:
        self.calls.append(("available", None))

    async def attached(self) -> None:
        self.calls.append(("attached", None))

    def reset(self) -> None:
        self.calls.append(("reset", None))

    def vmm_state(self, status: str, data: dict[str, Any]) -> None:
        self.calls.append(("state", status))


def test_migration_holds_shared_ram_writes_until_it_ends() -> None:
    hooks = Hooks()
    link = VmmLink(VmmConfig(qmp_socket="/nonexistent"), hooks)
    for status in ("setup", "active", "completed", "active", "failed", "cancelled"):
        link._on_event("MIGRATION", {"status": status})
    holds = [call for call in hooks.calls if call[0] in ("hold", "release")]
    assert holds == [
        ("hold", "migration"), ("hold", "migration"), ("release", "migration"),
        ("hold", "migration"), ("release", "migration"), ("release", "migration"),
    ]  # fmt: skip
    hooks.calls.clear()
    link._on_event("STOP", {})
    link._on_event("RESUME", {})
    link._on_event("RESET", {"guest": True})
    assert hooks.calls == [
        ("hold", "stopped"), ("state", "paused"), ("release", "stopped"), ("state", "running"),
        ("reset", None), ("state", "reset"),
    ]  # fmt: skip


def test_dump_skeys_format_is_parsed() -> None:
    text = (
        "  page=080: key(54) => ACC=3, FP=0, REF=4, ch=2, reserved=0\n"
        "  page=0a1: key(56) => ACC=3, FP=8, REF=0, ch=0, reserved=0\n"
    )
    assert parse_skeys(text) == {0x80: 54, 0xA1: 56}
    try:
        parse_skeys("page=zz: key(1)")
    except ValueError as exc:
        assert "line 1" in str(exc)
    else:
        raise AssertionError("a bad line must be refused")


# ------------------------------------------------------- the unit, checked

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "indicators@.service"
DROP_INS = ("metrics.conf", "ptrace.conf", "user-qemu.conf")
MAX_EXPOSURE = 2.0


def systemd_tool(name: str) -> str:
    """The path of a systemd tool; skip without it, fail instead with CI set."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (Debian package systemd)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must check the unit: {reason}")
        pytest.skip(reason)
    return path


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, values of repeated keys in order."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def with_drop_in(name: str) -> str:
    """The unit's text as systemd sees it with drop-in ``name`` (its [Service] lines added)."""
    unit = UNIT.read_text()
    lines = [line for line in (DEPLOY / name).read_text().splitlines()
             if line and not line.startswith(("#", "["))]  # fmt: skip
    return unit.replace("\n[Install]\n", "\n" + "\n".join(lines) + "\n\n[Install]\n")


def runnable_copy(text: str, directory: Path, name: str) -> Path:
    """The unit under ``name`` in ``directory``, ExecStart pointing at this checkout's command."""
    command = shutil.which("indicators") or str(Path(sys.executable).parent / "indicators")
    path = directory / name
    path.write_text(text.replace("/usr/bin/indicators", command))
    return path


def exposure(unit: Path) -> float:
    result = subprocess.run(
        [systemd_tool("systemd-analyze"), "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@pytest.mark.parametrize("drop_in", [None, *DROP_INS])
def test_the_unit_verifies_and_rates_at_most_2(tmp_path: Path, drop_in: str | None) -> None:
    text = UNIT.read_text() if drop_in is None else with_drop_in(drop_in)
    for instance in ("indicators@.service", "indicators@my\\x20guest.service"):
        unit = runnable_copy(text, tmp_path, instance)
        result = subprocess.run(
            [systemd_tool("systemd-analyze"), "verify", "--man=no", str(unit)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr
    score = exposure(unit)
    assert score <= MAX_EXPOSURE, f"systemd-analyze security rates it {score}"
    if drop_in is None:
        documented = re.search(r"Rated (\d+\.\d+) by `systemd-analyze security`", UNIT.read_text())
        assert documented and float(documented.group(1)) == score, "the unit quotes its rating"
        readme = (DEPLOY.parent / "README.md").read_text()
        assert f"rates the unit {score}" in readme, "the README quotes the rating"


def test_the_unit_grants_what_the_deployment_needs() -> None:
    unit = unit_settings(UNIT.read_text())
    paths = " ".join(unit["ReadWritePaths"]).split()
    assert all(path.startswith("-") for path in paths), "optional paths: absent ones are fine"
    assert "-/var/lib/libvirt/qemu/ram" in paths, "libvirt's RAM files"
    assert unit["User"] == ["libvirt-qemu"] and "Group" not in unit
    assert unit["ExecStart"] == ['/usr/bin/indicators run --config "/etc/indicators/%I.toml" '
                                 "--log-json"]  # fmt: skip
    allowed = unit["SystemCallFilter"][0].split()
    assert allowed[0] == "@system-service" and "pidfd_getfd" in allowed
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX"] and unit["PrivateNetwork"] == ["yes"]
    metrics = unit_settings(with_drop_in("metrics.conf"))
    assert set(metrics["RestrictAddressFamilies"][-1].split()) >= {"AF_INET", "AF_INET6"}
    assert metrics["PrivateNetwork"][-1] == "no" and metrics["IPAddressAllow"] == ["localhost"]
    ptrace = unit_settings(with_drop_in("ptrace.conf"))
    assert ptrace["AmbientCapabilities"][-1] == "CAP_SYS_PTRACE"
    assert unit_settings(with_drop_in("user-qemu.conf"))["User"][-1] == "qemu"


def syscall_group(name: str) -> set[str]:
    """The system calls of a ``systemd-analyze syscall-filter`` group, nested groups expanded."""
    listing = subprocess.run(
        [systemd_tool("systemd-analyze"), "syscall-filter", "--no-pager", name],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    calls: set[str] = set()
    for line in listing.stdout.splitlines():
        item = line.strip()
        if not line.startswith("    ") or item.startswith("#"):
            continue
        calls |= syscall_group(item) if item.startswith("@") else {item}
    return calls


def unit_syscalls() -> set[str]:
    """What the unit's SystemCallFilter= lines let through: allowed less denied."""
    allowed: set[str] = set()
    denied: set[str] = set()
    for value in unit_settings(UNIT.read_text())["SystemCallFilter"]:
        target = denied if value.startswith("~") else allowed
        for item in value.lstrip("~").split():
            target |= syscall_group(item) if item.startswith("@") else {item}
    return allowed - denied


def test_pidfd_getfd_is_outside_the_system_service_group() -> None:
    # Why the unit names it: without it, vm_fd = "pid:N" / "libvirt" fails with EPERM.
    service = syscall_group("@system-service")
    assert "pidfd_getfd" not in service and "pidfd_open" in service and "ioctl" in service
    assert "pidfd_getfd" in syscall_group("@debug")
    assert {"pidfd_getfd", "pidfd_open", "ioctl", "mmap"} <= unit_syscalls()


_TRACED = re.compile(r"^\d+\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()")


def test_the_daemon_needs_no_system_call_the_unit_filters_out(tmp_path: Path) -> None:
    # The filter cannot be applied here without systemd as PID 1; strace lists
    # every system call a daemon makes from exec to exit instead.
    strace = shutil.which("strace")
    if strace is None:
        if os.environ.get("CI"):
            pytest.fail("CI must trace the daemon: strace is not installed")
        pytest.skip("strace is not installed (Debian package strace)")
    effective = unit_syscalls()
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(1 << 20))
    socket_path = tmp_path / "control.sock"
    config = write_config(tmp_path / "c.toml", daemon_config(socket_path, ram=ram))
    notify_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    trace = tmp_path / "trace"
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000"}
    with open(tmp_path / "log", "wb") as sink:
        process = subprocess.Popen(
            [strace, "-f", "-qq", "-o", str(trace), "--",
             *indicators_command("run", "--config", str(config), "--log-json")],
            env=env, stdout=sink, stderr=sink,
        )  # fmt: skip
    try:
        datagrams(listener, "READY=1", timeout=60)

        async def exercise() -> None:
            async with qmp_client(str(socket_path)) as client:
                assert await client.execute("notify", {"device": "net0", "vector": [1, 2]})
                await client.execute("query-adapters")
                await client.execute("query-stats")

        asyncio.run(exercise())
        (daemon,) = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        os.kill(int(daemon), signal.SIGHUP)  # to the daemon: strace keeps its signals
        datagrams(listener, "WATCHDOG=1")
        os.kill(int(daemon), signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        listener.close()
    used: set[str] = set()
    for line in trace.read_text().splitlines():
        match = _TRACED.match(line)
        if match:
            used.add(match.group(1) or match.group(2))
    assert {"mmap", "ioctl", "accept4", "execve"} <= used, sorted(used)  # the trace is real
    assert sorted(used - effective) == [], "the unit's SystemCallFilter= would refuse these"


def test_tmpfiles_creates_the_socket_directory_for_qemus_user(tmp_path: Path) -> None:
    tool = systemd_tool("systemd-tmpfiles")
    (tmp_path / "usr/lib/tmpfiles.d").mkdir(parents=True)
    shutil.copy(
        DEPLOY / "indicators.tmpfiles.conf", tmp_path / "usr/lib/tmpfiles.d/indicators.conf"
    )
    command = [tool, "--create", f"--root={tmp_path}", "indicators.conf"]
    missing = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "libvirt-qemu" in missing.stderr, "the user must exist"
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(
        "libvirt-qemu:x:64055:64055::/var/lib/libvirt:/bin/false\n"
    )
    (tmp_path / "etc/group").write_text("libvirt-qemu:x:64055:\nroot:x:0:\n")
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    made = (tmp_path / "run/indicators").stat()
    assert (made.st_uid, made.st_mode & 0o7777) == (64055, 0o750)
