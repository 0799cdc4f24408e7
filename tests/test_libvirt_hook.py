"""The libvirt QEMU hook on its own: escaping, systemctl calls, the detached daemon.

``deploy/libvirt-qemu-hook`` is run as libvirt runs it (arguments, the
domain XML on standard input, pipes it waits for), with its directories and
the daemon command set through the environment a wrapper would set.  Under
systemd it is tested against a ``systemctl`` that records its calls; the
no-systemd mode runs a real daemon.  tests/test_libvirt.py runs it under a
real libvirtd.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import write_config
from libvirt_rig import accepts, processes_with, wait_for

ROOT = Path(__file__).resolve().parent.parent
HOOK = ROOT / "deploy" / "libvirt-qemu-hook"
TIMEOUT = 30.0


def _load_hook() -> Any:
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("libvirt_qemu_hook", str(HOOK))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


NAMES = ["my guest", "plain", "a-b", ".hidden", "caf\u00e9", "back\\slash", "x.y:z_1", "tab\there"]


@pytest.mark.parametrize("name", NAMES)
def test_instance_names_are_escaped_as_systemd_escape_does(name: str) -> None:
    import shutil

    hook = _load_hook()
    tool = shutil.which("systemd-escape")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have systemd-escape (package systemd)")
        pytest.skip("systemd-escape is not installed (package systemd)")
    expected = subprocess.run([tool, "--", name], capture_output=True, text=True, check=True)
    assert hook.escape_unit_name(name) == expected.stdout.strip()  # the fallback's own rules
    assert hook.systemd_escape(name) == expected.stdout.strip()


def test_the_fallback_escaping_by_example() -> None:
    hook = _load_hook()
    assert hook.escape_unit_name("my guest") == "my\\x20guest"
    assert hook.escape_unit_name("a-b/c") == "a\\x2db-c"
    assert hook.escape_unit_name(".x.y") == "\\x2ex.y"
    assert hook.escape_unit_name("\u00e9") == "\\xc3\\xa9"


def _run_hook(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HOOK), *args], input="<domain/>", capture_output=True, text=True,
        env={**os.environ, **env}, timeout=TIMEOUT,
    )  # fmt: skip


@pytest.fixture
def fake_systemctl(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A ``systemctl`` on PATH that records its arguments and fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    script = bin_dir / "systemctl"
    script.write_text(f'#!/bin/sh\nprintf "%s|" "$@" >> {calls}\necho >> {calls}\nexit 1\n')
    script.chmod(0o755)
    (tmp_path / "config").mkdir()
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "INDICATORS_HOOK_SYSTEMD": "1",
        "INDICATORS_CONFIG_DIR": str(tmp_path / "config"),
        "INDICATORS_RUN_DIR": str(tmp_path / "run"),
    }
    return env, calls


def test_under_systemd_the_hook_asks_systemctl_without_blocking(
    tmp_path: Path, fake_systemctl: tuple[dict[str, str], Path]
) -> None:
    env, calls = fake_systemctl
    (tmp_path / "config" / "my guest.toml").write_text("")
    for operation in ("prepare", "start", "started", "reconnect", "stopped", "release", "migrate"):
        result = _run_hook(env, "my guest", operation, "begin", "-")
        assert result.returncode == 0, result.stderr  # systemctl failed: the guest starts anyway
    unit = "indicators@my\\x20guest.service"
    assert calls.read_text().splitlines() == [
        f"--no-block|start|{unit}|", f"--no-block|start|{unit}|", f"--no-block|stop|{unit}|",
    ]  # fmt: skip
    assert "systemctl start" in _run_hook(env, "my guest", "started", "begin", "-").stderr


def test_guests_without_a_config_are_left_alone(
    tmp_path: Path, fake_systemctl: tuple[dict[str, str], Path]
) -> None:
    env, calls = fake_systemctl
    for name in ("other", "../config/x", ""):
        for operation in ("started", "stopped", "release", "reconnect"):
            assert _run_hook(env, name, operation, "begin", "-").returncode == 0
    assert _run_hook(env).returncode == 0  # no arguments at all
    assert not calls.exists()


def test_without_systemd_the_hook_runs_the_daemon_detached(tmp_path: Path) -> None:
    from daemon_helpers import daemon_config

    name = "hooked guest"
    (tmp_path / "config").mkdir()
    socket = tmp_path / "control.sock"
    config = write_config(tmp_path / "config" / f"{name}.toml", daemon_config(socket))
    run, logs = tmp_path / "run", tmp_path / "logs"
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {
        "INDICATORS_HOOK_SYSTEMD": "0",
        "INDICATORS_CONFIG_DIR": str(tmp_path / "config"),
        "INDICATORS_RUN_DIR": str(run),
        "INDICATORS_LOG_DIR": str(logs),
        "INDICATORS_COMMAND": f"{sys.executable} -m indicators.cli",
        "PYTHONPATH": python_path,
    }
    marker = f"--config {config}"
    pid_file = run / f"{name}.pid"
    try:
        # The hook returns while the daemon runs on: libvirt's pipes must not be held.
        started = _run_hook(env, name, "started", "begin", "-")  # waits for the pipes' EOF
        assert started.returncode == 0 and started.stdout == "" and started.stderr == ""
        # The hook returns once the pid file is written: a "stopped" right after works.
        assert pid_file.exists()
        assert _run_hook(env, name, "stopped", "end", "-").returncode == 0
        wait_for(lambda: not processes_with(marker), "the daemon to exit")
        wait_for(lambda: not pid_file.exists(), "the pid file to go")
        assert _run_hook(env, name, "started", "begin", "-").returncode == 0
        wait_for(lambda: accepts(socket), "the daemon's control socket")
        daemons = processes_with(marker)
        assert len(daemons) == 1 and int(pid_file.read_text()) == daemons[0]
        assert os.getsid(daemons[0]) != os.getsid(0), "a session of its own"
        assert _run_hook(env, name, "reconnect", "begin", "-").returncode == 0
        assert processes_with(marker) == daemons, "reconnect keeps the one daemon"
        assert _run_hook(env, name, "stopped", "end", "-").returncode == 0
        wait_for(lambda: not processes_with(marker), "the daemon to exit")
        wait_for(lambda: not pid_file.exists(), "the pid file to go")
        assert not socket.exists()
        assert _run_hook(env, name, "release", "end", "-").returncode == 0
        log = (logs / f"{name}.log").read_text()
        assert f"daemon pid {daemons[0]} exited with 0" in log, log
        assert "stopping (SIGTERM)" in log, log
    finally:
        for pid in processes_with(marker):
            os.kill(pid, 9)


def test_a_daemon_that_cannot_start_never_fails_the_guest(tmp_path: Path) -> None:
    name = "broken"
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / f"{name}.toml").write_text("")
    env = {
        "INDICATORS_HOOK_SYSTEMD": "0",
        "INDICATORS_CONFIG_DIR": str(tmp_path / "config"),
        "INDICATORS_RUN_DIR": str(tmp_path / "run"),
        "INDICATORS_LOG_DIR": str(tmp_path / "logs"),
        "INDICATORS_COMMAND": str(tmp_path / "no-such-program"),
    }
    assert _run_hook(env, name, "started", "begin", "-").returncode == 0
    log = tmp_path / "logs" / f"{name}.log"
    wait_for(lambda: log.exists() and "cannot run the daemon" in log.read_text(), "the log")
    assert "no-such-program" in log.read_text()
    assert not (tmp_path / "run" / f"{name}.pid").exists()
