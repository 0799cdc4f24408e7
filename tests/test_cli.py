"""The ``indicators`` command line, run as a subprocess like a user would."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import (
    MEMORY,
    TIMEOUT,
    Daemon,
    daemon_config,
    devices,
    indicators_command,
    running_daemon,
    write_config,
)


def indicators(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        indicators_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("cli")
    with running_daemon(directory, daemon_config(directory / "control.sock")) as daemon:
        yield daemon


# ------------------------------------------------------------------ config


def test_config_check_accepts_a_good_file(tmp_path: Path) -> None:
    path = write_config(tmp_path / "good.toml", daemon_config(tmp_path / "c.sock"))
    result = indicators("config", "check", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: ok, backend emulated, 4 devices on 4 adapters"
    assert "  adapter 3 (virtio-ccw, isc 3): net0" in lines
    assert "  adapter 10 (zpci, isc 2): pci0" in lines
    assert "  adapter 64 (kvm-route, isc 5): route0" in lines


def _with_device_change(name: str, **change: Any) -> dict[str, Any]:
    raw = daemon_config("/tmp/unused.sock")
    raw["devices"] = [
        {**device, **change} if device["name"] == name else device for device in devices()
    ]
    return raw


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        (_with_device_change("net0", isc=9), ["device 'net0'.isc", "less than or equal to 7"]),
        (_with_device_change("pci0", noi=0), ["device 'pci0'.noi"]),
        (_with_device_change("route0", colour="red"), ["device 'route0'.colour", "not permitted"]),
        (
            _with_device_change("pci0", aibv=0x10100),
            ["device 'pci0'.aibv", "overlaps device 'net0'"],
        ),
        (
            _with_device_change("net0", device_indicator=0x200000),
            ["device 'net0'.device_indicator", "past guest memory"],
        ),
        (_with_device_change("locked", key=16), ["device 'locked'.key"]),
        (
            {**daemon_config("/tmp/unused.sock"), "backend": {"kind": "emulated"}},
            ["backend.memory_size", "Field required"],
        ),
    ],
)
def test_config_check_names_device_and_field(
    tmp_path: Path, raw: dict[str, Any], named: list[str]
) -> None:
    path = write_config(tmp_path / "bad.toml", raw)
    result = indicators("config", "check", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"indicators: config error: {path}:")
    for text in named:
        assert text in result.stderr


@pytest.mark.parametrize(
    ("content", "named"),
    [(None, "(file)"), ("[backend\n", "(toml)")],
)
def test_config_check_unreadable_files(tmp_path: Path, content: str | None, named: str) -> None:
    path = tmp_path / "broken.toml"
    if content is not None:
        path.write_text(content)
    result = indicators("config", "check", str(path))
    assert result.returncode == 2
    assert named in result.stderr


def test_config_schema_is_json_schema() -> None:
    result = indicators("config", "schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["title"] == "Config"
    assert {"backend", "devices", "retry", "control", "vmm"} <= set(schema["properties"])
    assert schema["required"] == ["backend"]
    kinds = json.dumps(schema["$defs"])
    for kind in ("virtio-ccw", "zpci", "kvm-route", "emulated", "kvm"):
        assert f'"{kind}"' in kinds


# ------------------------------------------------------ against a daemon


def test_notify_and_status_against_a_running_daemon(daemon: Daemon) -> None:
    result = indicators("notify", "--socket", daemon.socket, "net0", "3", "4", "60")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"applied": 3}
    result = indicators("notify", "--socket", daemon.socket, "pci0", "0")
    assert json.loads(result.stdout) == {"applied": 1}

    result = indicators("status", "--socket", daemon.socket)
    assert result.returncode == 0, result.stderr
    table, _, counters = result.stdout.partition("\n\n")
    rows = {line.split()[3]: line.split() for line in table.splitlines()[1:]}
    # adapter isc kind device key vectors set summary suppr
    assert rows["net0"] == ["3", "3", "virtio-ccw", "net0", "-", "64", "3", "set", "-"]
    assert rows["pci0"] == ["10", "2", "zpci", "pci0", "-", "32", "1", "set", "-"]
    assert rows["route0"][6:8] == ["0", "clear"]
    assert rows["locked"][4] == "5"
    fields = dict(line.strip().split(": ", 1) for line in counters.splitlines())
    assert int(fields["notifications"]) >= 4
    assert fields["failures"] == "none"
    assert fields["vmm"] == "no link"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["nope", "1"], "unknown device 'nope'"),
        (["net0", "64"], "vector 64 is not one"),
        (["locked", "0"], "program exception 4 (protection) (code 4)"),
    ],
)
def test_notify_failures_exit_1_with_the_reason(
    daemon: Daemon, args: list[str], named: str
) -> None:
    result = indicators("notify", "--socket", daemon.socket, *args)
    assert result.returncode == 1
    assert result.stdout == ""
    assert named in result.stderr


@pytest.mark.parametrize("command", [["status"], ["notify"]], ids=["status", "notify"])
def test_a_missing_daemon_socket_is_named(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "nobody.sock"
    extra = ["net0", "1"] if command == ["notify"] else []
    result = indicators(*command, "--socket", str(path), *extra)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"indicators: cannot reach the daemon socket {path}: No such file or directory\n"
    )


def test_a_daemon_socket_that_never_greets_times_out(tmp_path: Path) -> None:
    # A listener that accepts and says nothing (not ours, or a hung daemon).
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(8)
        for command in (["status"], ["notify", "net0", "1"]):
            started = time.monotonic()
            result = indicators(
                command[0], "--socket", str(path), "--connect-timeout", "0.5", *command[1:]
            )
            assert time.monotonic() - started < TIMEOUT * 2
            assert result.returncode == 1, result.stderr
            assert result.stderr == (
                f"indicators: cannot reach the daemon socket {path}: no QMP greeting within 0.5 s\n"
            )


def test_a_socket_that_does_not_speak_qmp_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "http.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(8)

        def answer() -> None:
            peer, _ = listener.accept()
            with peer:
                peer.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello\n")
                peer.recv(1)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        result = indicators("status", "--socket", str(path), timeout=TIMEOUT * 3)
        thread.join(TIMEOUT)
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"indicators: cannot reach the daemon socket {path}: it does not speak QMP"
    )
    assert result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("value", ["0", "-1", "nan", "x"])
def test_a_nonsense_connect_timeout_is_refused(value: str) -> None:
    result = indicators("status", "--socket", "/nonexistent.sock", "--connect-timeout", value)
    assert result.returncode == 2
    assert "argument --connect-timeout" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_log_level_is_a_usage_error(tmp_path: Path) -> None:
    path = write_config(tmp_path / "good.toml", daemon_config(tmp_path / "c.sock"))
    result = indicators("run", "--config", str(path), "--log-level", "bogus", timeout=TIMEOUT)
    assert result.returncode == 2
    assert "argument --log-level: invalid choice: 'bogus'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "c.sock").exists()


def test_run_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    path = write_config(tmp_path / "bad.toml", _with_device_change("net0", vectors=0))
    result = indicators("run", "--config", str(path), timeout=TIMEOUT)
    assert result.returncode == 2
    assert "device 'net0'.vectors" in result.stderr


# ------------------------------------------------------------------- demo


def test_demo_runs_and_reports_success() -> None:
    result = indicators("demo", "--seconds", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.rstrip().splitlines()[-1]
    assert last.startswith("every acknowledged notification reached the guest: yes (")
    assert "acknowledged" in result.stdout and "interrupts-injected" in result.stdout


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--batch", "0"], "argument --batch: must be above 0, got 0"),
        (["--seconds", "-1"], "argument --seconds: must be above 0, got -1"),
        (["--batch", "many"], "argument --batch: 'many' is not a int"),
        (["--seconds", "nan"], "argument --seconds: must be a finite number above 0, got nan"),
        (["--seconds", "inf"], "argument --seconds: must be a finite number above 0, got inf"),
    ],
)
def test_demo_refuses_nonsense_arguments(args: list[str], named: str) -> None:
    result = indicators("demo", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    assert named in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------- run: failures at start


def _run_refused(tmp_path: Path, raw: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """``indicators run`` on ``raw``, expected to fail at start; nothing may be left behind."""
    config = write_config(tmp_path / "run.toml", raw)
    before = sorted(path.name for path in tmp_path.iterdir())
    result = indicators("run", "--config", str(config), timeout=TIMEOUT * 3)
    assert "Traceback" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == before, "a failed start left files"
    return result


def test_a_metrics_address_that_cannot_be_bound_is_named(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface of this host: EADDRNOTAVAIL.  The
    # RAM file does not exist yet: the backend creates it, the failed start removes it.
    raw = daemon_config(
        tmp_path / "control.sock", ram=tmp_path / "guest.ram", metrics={"address": "192.0.2.1"}
    )
    result = _run_refused(tmp_path, raw)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "indicators: cannot bind the metrics endpoint 192.0.2.1:9464: "
        "Cannot assign requested address"
    )


def test_a_control_socket_that_cannot_be_created_is_named(tmp_path: Path) -> None:
    socket_path = tmp_path / "missing-dir" / "control.sock"
    result = _run_refused(tmp_path, daemon_config(socket_path, ram=tmp_path / "guest.ram"))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"indicators: cannot create the control socket {socket_path}: No such file or directory"
    )


def test_a_ram_file_that_cannot_be_created_is_named(tmp_path: Path) -> None:
    ram = tmp_path / "missing-dir" / "guest.ram"
    result = _run_refused(tmp_path, daemon_config(tmp_path / "control.sock", ram=ram))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"indicators: cannot map the RAM file {ram}: No such file or directory"
    )


def test_an_existing_ram_file_survives_a_failed_start(tmp_path: Path) -> None:
    ram = tmp_path / "guest.ram"
    ram.write_bytes(b"\x5a" * MEMORY)
    raw = daemon_config(tmp_path / "control.sock", ram=ram, metrics={"address": "192.0.2.1"})
    result = _run_refused(tmp_path, raw)  # asserts the file is still there
    assert result.returncode == 1
    assert ram.read_bytes() == b"\x5a" * MEMORY


def test_guest_memory_this_host_cannot_address_is_named(tmp_path: Path) -> None:
    # Within the 64-bit guest address space (the config is fine), beyond what a
    # process can map: a runtime failure naming the memory, not an OverflowError.
    raw = daemon_config(tmp_path / "control.sock")
    raw["backend"] = {**raw["backend"], "memory_size": 1 << 63}
    result = _run_refused(tmp_path, raw)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(
        "indicators: cannot map the RAM file (anonymous): "
    )
    ram = tmp_path / "guest.ram"  # created for the start, removed when it fails
    raw["backend"] = {**raw["backend"], "ram": str(ram)}
    result = _run_refused(tmp_path, raw)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith(f"indicators: cannot map the RAM file {ram}: ")


@pytest.mark.skipif(
    platform.machine() == "s390x" and os.path.exists("/dev/kvm"),
    reason="this host has s390x KVM: the refusal under test cannot happen here",
)
def test_a_kvm_backend_without_s390x_kvm_is_refused_before_any_fd(tmp_path: Path) -> None:
    backend = {"kind": "kvm", "memory_size": "4G", "vm_fd": "pid:1", "flic_fd": "pid:1"}
    raw = {**daemon_config(tmp_path / "control.sock"), "backend": backend}
    result = _run_refused(tmp_path, raw)
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith("indicators: the KVM backend needs ")
    assert "use the emulated backend" in last or "/dev/kvm" in last
    assert "pid:1" not in last  # the host is refused before the VM fd is looked for
