"""systemd integration of `indicators run`: sd_notify, the watchdog, JSON log lines."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

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
