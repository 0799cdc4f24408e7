"""Deployment under a real libvirtd: the hook, ``[vmm] libvirt = NAME``, the domain snippet.

The end-to-end test runs a private libvirtd (:mod:`libvirt_rig`: its own
mount and pid namespaces, the project's hook installed) with a domain that
runs the project's s390x test guest, defined from a plain domain XML with
``indicators libvirt-snippet NAME --domain FILE``.  It follows one guest
(whose name has a space) through start, suspend/resume, a libvirtd restart
and destroy, and starts it a second time (a new DOMID, a new RAM file) to
kill its QEMU outright.

The test guest reads its parameter block from RAM before it scans, so the
domain is started ``--paused``, the block written into the RAM file libvirt
made, and the guest resumed: libvirt's own ``started`` hook call and the
daemon's hold while the guest is paused are part of what is tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
from daemon_helpers import indicators_command, qmp_client, write_config
from libvirt_rig import PrivateLibvirt, setup_problem

from indicators.config import parse_config
from indicators.daemon.libvirt import merge_into
from indicators.guestmem import GuestMemory
from indicators.testing.build import QEMU, build_guest
from indicators.testing.guest import PARAM_GADDR, GuestState
from indicators.testing.layout import GuestLayout, guest_layout
from indicators.testing.plugin import require_qemu
from indicators.testing.qemu import DEFAULT_MEMORY, AirqGuest
from indicators.testing.rig import DEFAULT_DEVICES

ROOT = Path(__file__).resolve().parent.parent
HOOK = ROOT / "deploy" / "libvirt-qemu-hook"
TIMEOUT = 30.0
ROUNDS = 3


def require_libvirt() -> None:
    """Skip without what a private libvirtd needs; fail instead with CI set."""
    require_qemu()
    reason = setup_problem()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the libvirt test: {reason}")
        pytest.skip(reason)


def wait_for(condition: Any, what: str, timeout: float = TIMEOUT) -> None:
    """Poll until ``condition()`` holds; the timeout only ends a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def plain_domain(name: str, kernel: Path) -> str:
    """A domain as an operator would have it before adding what the daemon needs."""
    size = DEFAULT_MEMORY >> 20
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{size}</memory><currentMemory unit='MiB'>{size}</currentMemory>
  <vcpu placement='static' current='1'>2</vcpu>
  <os><type arch='s390x' machine='s390-ccw-virtio'>hvm</type><kernel>{kernel}</kernel></os>
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices><emulator>{Path(QEMU) if os.path.isabs(QEMU) else _which(QEMU)}</emulator>
    <memballoon model='none'/></devices>
</domain>
"""


def _which(tool: str) -> str:
    import shutil

    path = shutil.which(tool)
    assert path is not None, tool
    return path


def processes_with(text: str) -> list[int]:
    """Host pids whose command line contains ``text``."""
    found = []
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" "):
                found.append(int(entry))
    return found


def _accepts(path: Path) -> bool:
    """Whether a unix socket at ``path`` accepts connections (it exists a moment before)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class DomainGuest(AirqGuest):
    """The airq guest in a QEMU that libvirt started: its RAM file, no process of ours."""

    def __init__(self, layout: GuestLayout, ram: str) -> None:
        super().__init__(layout.layout, memory_size=DEFAULT_MEMORY)
        self._memory = GuestMemory(DEFAULT_MEMORY, ram)

    def write_parameters(self) -> None:
        """What the rig writes before boot: here, while libvirt holds the guest paused."""
        self.memory.write(PARAM_GADDR, self.layout.encode())

    def _check_alive(self, doing: str) -> None:
        pass  # libvirt owns QEMU; a dead one shows as a timeout

    def close_memory(self) -> None:
        """Unmap the RAM file."""
        self.memory.close()


def _wrapper(directory: Path) -> str:
    """The hook as installed: libvirt hands hooks little of its environment, so a
    wrapper says where the configs and logs are and how to run the daemon."""
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    (directory / "logs").mkdir(exist_ok=True)
    return (
        "#!/bin/sh\n"
        f"env > '{directory / 'hook.env'}'\n"
        f"export INDICATORS_CONFIG_DIR='{directory / 'config'}'\n"
        f"export INDICATORS_LOG_DIR='{directory / 'logs'}'\n"
        f"export INDICATORS_COMMAND='{sys.executable} -m indicators.cli'\n"
        f"export PYTHONPATH='{python_path}'\n"
        f"exec '{HOOK}' \"$@\"\n"
    )


def _path() -> str:
    """libvirtd's PATH: this interpreter's directory first."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin")])


def _hooked_config(name: str) -> dict[str, Any]:
    """A daemon config for domain ``name`` as an operator writes it."""
    return {
        "backend": {"kind": "emulated", "memory_size": DEFAULT_MEMORY, "ram": "auto"},
        "devices": [dict(device) for device in DEFAULT_DEVICES],
        "control": {"socket": f"/run/indicators/{name}.sock"},
        "vmm": {"libvirt": name},
    }


@dataclass
class Deployment:
    """The module's private libvirtd, its directory, the guest ELF, and timings."""

    rig: PrivateLibvirt
    directory: Path
    kernel: Path
    timings: dict[str, float]


@pytest.fixture(scope="module")
def libvirt() -> Iterator[Deployment]:
    """A private libvirtd with the project's hook; its directory; set-up timings."""
    require_libvirt()
    t0 = time.monotonic()
    kernel = build_guest()
    directory = Path(tempfile.mkdtemp(prefix="indicators-libvirt-"))
    (directory / "config").mkdir()
    rig = PrivateLibvirt(directory, _wrapper(directory), _path())
    try:
        rig.wait_answering()
        yield Deployment(rig, directory, kernel, {"setup": time.monotonic() - t0})
    finally:
        rig.close()
        import shutil

        if not os.environ.get("INDICATORS_LIBVIRT_KEEP"):  # =1 keeps the logs to read
            shutil.rmtree(directory, ignore_errors=True)


def test_the_hook_runs_a_daemon_through_a_domains_life(
    libvirt: Deployment,
    record_property: Any,
) -> None:
    rig, directory, timings = libvirt.rig, libvirt.directory, libvirt.timings
    name = f"indicators e2e {os.getpid()}"
    raw = _hooked_config(name)
    config = write_config(directory / "config" / f"{name}.toml", raw)
    layout = guest_layout(parse_config(raw).devices, {}, DEFAULT_MEMORY)
    run = directory / "run"
    control = run / "indicators" / f"{name}.sock"
    pid_file = run / "indicators" / f"{name}.pid"
    vmm_socket = run / "indicators" / f"{name}.vmm.sock"
    daemon_marker = f"--config {config}"

    plain = directory / "plain.xml"
    plain.write_text(plain_domain(name, libvirt.kernel))
    merged = subprocess.run(
        indicators_command("libvirt-snippet", name, "--domain", str(plain)),
        capture_output=True, text=True, check=True, timeout=TIMEOUT,
    ).stdout  # fmt: skip
    (directory / "domain.xml").write_text(merged)
    rig.virsh("define", str(directory / "domain.xml"))

    cycles: list[float] = []
    ram_files: list[str] = []
    for cycle in range(2):
        t0 = time.monotonic()
        rig.virsh("start", "--paused", name)
        # libvirt: QEMU's pid file, then "started" -> the hook -> one daemon serving.
        wait_for(lambda: _accepts(control), "the daemon's control socket")
        wait_for(pid_file.exists, "the hook's pid file")
        daemons = processes_with(daemon_marker)
        assert len(daemons) == 1, daemons
        # vm_fd = "libvirt" reads QEMU's pid where libvirt keeps it (the namespace's numbering).
        (qemu,) = processes_with(f"guest={name},")
        status = Path(f"/proc/{qemu}/status").read_text()
        ns_pid = int(status.split("NSpid:")[1].split("\n")[0].split()[-1])
        assert int((run / "libvirt" / "qemu" / f"{name}.pid").read_text()) == ns_pid
        rams = glob.glob(str(directory / "var-lib/libvirt/qemu/ram/*/s390.ram"))
        assert len(rams) == 1, rams
        ram_files.append(rams[0])
        guest = DomainGuest(layout, rams[0])
        try:
            asyncio.run(_exercise(rig, name, guest, control, layout, first=cycle == 0))
        finally:
            guest.close_memory()
        if cycle == 0:
            rig.virsh("destroy", name)
        else:  # a QEMU killed outright: libvirt calls the same stopped/release pair
            (qemu,) = processes_with(f"guest={name},")
            os.kill(qemu, signal.SIGKILL)
        # "stopped" and "release" -> the hook -> the daemon stops cleanly.
        wait_for(lambda: not processes_with(daemon_marker), "the daemon to exit")
        wait_for(lambda: not pid_file.exists(), "the pid file to go")
        assert not control.exists(), "the daemon left its control socket"
        # A SIGKILLed QEMU leaves its monitor socket: the hook removes it on "release".
        wait_for(lambda: not vmm_socket.exists(), "the monitor socket to go")
        wait_for(lambda: "shut off" in rig.virsh("domstate", name).stdout, "libvirt to notice")
        cycles.append(time.monotonic() - t0)
        log = (directory / "logs" / f"{name}.log").read_text()
        assert "exited with 0" in log.splitlines()[-1], log
    assert ram_files[0] != ram_files[1], "libvirt names the RAM file anew at every start"
    hook_env = (directory / "hook.env").read_text()
    assert "PATH=" in hook_env and "/set/for/libvirtd" not in hook_env, "hence the wrapper"
    rig.virsh("undefine", name)
    timings["first cycle (with a libvirtd restart)"] = cycles[0]
    timings["second cycle (QEMU killed)"] = cycles[1]
    for what, seconds in timings.items():
        record_property(what, round(seconds, 2))
    rounded = {what: round(seconds, 2) for what, seconds in timings.items()}
    print(f"\nlibvirt e2e timings: {rounded}")


async def _exercise(
    rig: PrivateLibvirt,
    name: str,
    guest: DomainGuest,
    control: Path,
    layout: GuestLayout,
    *,
    first: bool,
) -> None:
    expected: Counter[tuple[str, int]] = Counter()
    async with qmp_client(str(control)) as client:
        stats = await client.execute("query-stats")
        assert "stopped" in stats["holds"], stats  # started --paused: the daemon holds
        guest.write_parameters()
        rig.virsh("resume", name)
        await asyncio.wait_for(_beating(guest), TIMEOUT)
        await _rounds(client, guest, layout, expected)
        if first:
            # virsh suspend: the daemon holds what it accepts until virsh resume.
            rig.virsh("suspend", name)
            await _until(client, lambda s: "stopped" in s["holds"])
            held = asyncio.create_task(client.execute("notify", {"device": "net0", "vector": 5}))
            async with qmp_client(str(control)) as watcher:  # replies come in order per client
                await _until(watcher, lambda s: s["pending"] == 1)
            assert not held.done()
            assert guest.counts(require_parked=False)[layout.counter[("net0", 5)]] == ROUNDS
            rig.virsh("resume", name)
            assert await asyncio.wait_for(held, TIMEOUT) == {"applied": 1}
            expected[("net0", 5)] += 1
            await _consumed(guest, layout, expected)
            # libvirtd restarted under the running guest: "reconnect", still one daemon.
            daemons = processes_with(f"--config {rig.directory / 'config' / name}.toml")
            assert daemons
            # libvirt has handled QEMU's RESUME event (and saved the state) before it stops.
            wait_for(lambda: "unpaused" in rig.virsh("domstate", "--reason", name).stdout,
                     "libvirt to see the guest running")  # fmt: skip
            log = rig.directory / "logs" / f"{name}.log"
            reconnects = log.read_text().count("daemon already running")
            rig.restart_libvirtd()
            # libvirt calls "reconnect" last when it reattaches to a running guest.
            wait_for(lambda: log.read_text().count("daemon already running") > reconnects,
                     f"the reconnect hook call\n{rig.tail()}")  # fmt: skip
            assert "running" in rig.virsh("domstate", name).stdout
            assert processes_with(f"--config {rig.directory / 'config' / name}.toml") == daemons
            await _rounds(client, guest, layout, expected)
        counts = Counter(layout.by_target(await guest.park(timeout=TIMEOUT)))
        stats = await client.execute("query-stats")
    assert counts == expected
    assert stats["applied"] - stats["merged"] == sum(expected.values()), stats
    assert stats["failures"] == {}, stats
    assert stats["vmm"] == "running", stats


async def _beating(guest: DomainGuest) -> None:
    while guest.state() == GuestState.NOT_STARTED:
        await asyncio.sleep(0.005)
    first = guest.rounds()
    while guest.rounds() <= first:
        await asyncio.sleep(0.005)


async def _rounds(
    client: Any, guest: DomainGuest, layout: GuestLayout, expected: Counter[tuple[str, int]]
) -> None:
    """Notify every vector of every device ROUNDS times, each time once the guest consumed."""
    for _ in range(ROUNDS):
        for device in DEFAULT_DEVICES:
            vectors = int(device.get("vectors") or device.get("noi") or 0)
            reply = await client.execute(
                "notify", {"device": device["name"], "vector": list(range(vectors))}
            )
            assert reply == {"applied": vectors}
            for vector in range(vectors):
                expected[(str(device["name"]), vector)] += 1
        await _consumed(guest, layout, expected)


async def _consumed(
    guest: DomainGuest, layout: GuestLayout, expected: Counter[tuple[str, int]]
) -> None:
    async def done() -> None:
        while Counter(layout.by_target(guest.counts(require_parked=False))) != expected:
            await asyncio.sleep(0.005)

    await asyncio.wait_for(done(), TIMEOUT)


async def _until(client: Any, condition: Any) -> None:
    async def poll() -> None:
        while not condition(await client.execute("query-stats")):
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), TIMEOUT)


def test_closing_the_namespace_ends_every_process_in_it(tmp_path: Path) -> None:
    # What the fixture's teardown relies on when a test fails midway: a domain
    # left running, its daemon too, and the namespace's init ended.
    require_libvirt()
    directory = Path(tempfile.mkdtemp(prefix="indicators-libvirt-"))
    name = f"indicators left {os.getpid()}"
    try:
        (directory / "config").mkdir()
        write_config(directory / "config" / f"{name}.toml", _hooked_config(name))
        rig = PrivateLibvirt(directory, _wrapper(directory), _path())
        try:
            rig.wait_answering()
            domain = directory / "domain.xml"
            domain.write_text(merge_into(plain_domain(name, build_guest())))
            rig.virsh("define", str(domain))
            rig.virsh("start", "--paused", name)
            wait_for(lambda: _accepts(directory / "run/indicators" / f"{name}.sock"), "the daemon")
            assert processes_with(f"guest={name}"), "QEMU runs"
            assert processes_with(f"--config {directory / 'config'}"), "the daemon runs"
        finally:
            rig.close()
        # QEMU (-name guest=NAME), the daemon (its config) and the hook's supervisor.
        assert processes_with(name) == []
        assert processes_with(str(directory)) == []
    finally:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)


# ------------------------------------------------------- the hook on its own


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
        wait_for(lambda: _accepts(socket), "the daemon's control socket")
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


# ------------------------------------------- [vmm] libvirt and the domain XML


def _libvirt_config(vmm: dict[str, Any], backend: dict[str, Any] | None = None) -> Any:
    return parse_config(
        {"backend": backend or {"kind": "emulated", "memory_size": "1M"}, "vmm": vmm}
    )


def test_a_domain_name_stands_for_the_monitor_socket_the_snippet_declares(tmp_path: Path) -> None:
    from indicators.daemon.libvirt import domain_snippet, resolve

    vmm, _ = resolve(_libvirt_config({"libvirt": "my guest"}), run_dir=str(tmp_path))
    assert vmm is not None and vmm.qmp_socket == f"{tmp_path}/my guest.vmm.sock"
    assert f"path={tmp_path}/my guest.vmm.sock,server=on" in domain_snippet(
        "my guest", str(tmp_path)
    )
    explicit = _libvirt_config({"libvirt": "g", "qmp_socket": "/elsewhere.sock"})
    assert resolve(explicit)[0] == explicit.vmm, "an explicit qmp_socket wins"
    plain = _libvirt_config({"qmp_socket": "/q.sock"})
    assert resolve(plain) == (plain.vmm, plain.backend), "no libvirt: nothing changes"


def test_vm_fd_libvirt_is_the_pid_libvirt_wrote(tmp_path: Path) -> None:
    from indicators.daemon.libvirt import LibvirtError, resolve

    kvm = {"kind": "kvm", "memory_size": "1M", "vm_fd": "libvirt", "flic_fd": "libvirt"}
    config = _libvirt_config({"libvirt": "g1"}, kvm)
    with pytest.raises(LibvirtError) as missing:
        resolve(config, libvirt_run_dir=str(tmp_path))
    assert missing.value.domain == "g1" and missing.value.path == f"{tmp_path}/g1.pid"
    assert "not running" in str(missing.value)
    (tmp_path / "g1.pid").write_text("garbage\n")
    with pytest.raises(LibvirtError, match="'garbage', not a pid"):
        resolve(config, libvirt_run_dir=str(tmp_path))
    (tmp_path / "g1.pid").write_text(f"{os.getpid()}\n")
    _, backend = resolve(config, libvirt_run_dir=str(tmp_path))
    assert backend.vm_fd == backend.flic_fd == f"pid:{os.getpid()}"  # type: ignore[union-attr]
    orphan = _libvirt_config({"qmp_socket": "/q.sock"}, kvm)
    with pytest.raises(LibvirtError, match="needs \\[vmm\\] libvirt"):
        resolve(orphan)


def test_names_libvirt_or_a_socket_cannot_take_are_refused() -> None:
    from indicators.config import ConfigError
    from indicators.daemon.libvirt import LibvirtError, monitor_socket

    with pytest.raises(LibvirtError, match="unix socket path"):
        monitor_socket("x" * 120)
    with pytest.raises(ConfigError, match="has a '/'"):
        _libvirt_config({"libvirt": "a/b"})
    with pytest.raises(ConfigError, match=r"give qmp_socket .* or libvirt"):
        _libvirt_config({})


def test_the_snippet_merges_into_a_plain_domain_once(tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    from indicators.daemon.libvirt import QEMU_NS

    plain = tmp_path / "plain.xml"
    plain.write_text(
        "<domain type='kvm'><name>a,b &amp; c</name><memoryBacking><hugepages/>"
        "<source type='memfd'/></memoryBacking><qemu:commandline "
        f"xmlns:qemu='{QEMU_NS}'><qemu:arg value='-trace'/><qemu:arg value='x'/>"
        "</qemu:commandline></domain>"
    )
    first = subprocess.run(
        indicators_command("libvirt-snippet", "a,b & c", "--domain", str(plain)),
        capture_output=True, text=True, check=True, timeout=TIMEOUT,
    ).stdout  # fmt: skip
    merged = tmp_path / "merged.xml"
    merged.write_text(first)
    again = subprocess.run(
        indicators_command("libvirt-snippet", "a,b & c", "--domain", "-"),
        input=first, capture_output=True, text=True, check=True, timeout=TIMEOUT,
    ).stdout  # fmt: skip
    assert again == first, "merging twice changes nothing"
    root = ET.fromstring(first)
    backing = root.find("memoryBacking")
    assert backing is not None
    assert [child.tag for child in backing] == ["hugepages", "source", "access"]
    assert backing.find("source").get("type") == "file"  # type: ignore[union-attr]
    assert backing.find("access").get("mode") == "shared"  # type: ignore[union-attr]
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert args == [
        "-trace", "x", "-chardev",
        "socket,id=indicators,path=/run/indicators/a,,b & c.vmm.sock,server=on,wait=off",
        "-mon", "chardev=indicators,mode=control",
    ]  # fmt: skip


def test_the_snippet_command_explains_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    for text, message in (("<domain>", "does not parse"), ("<network/>", "not <domain>")):
        bad.write_text(text)
        result = subprocess.run(
            indicators_command("libvirt-snippet", "g", "--domain", str(bad)),
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
    result = subprocess.run(
        indicators_command("libvirt-snippet", "g", "--domain", str(tmp_path / "none.xml")),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 1 and "none.xml: No such file" in result.stderr
    result = subprocess.run(
        indicators_command("libvirt-snippet", "a/b"), capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 2 and "has no '/'" in result.stderr


def test_a_daemon_for_a_domain_that_is_not_running_says_so(tmp_path: Path) -> None:
    name = f"no such domain {os.getpid()}"
    raw = {
        "backend": {"kind": "kvm", "memory_size": "1M", "vm_fd": "libvirt"},
        "control": {"socket": str(tmp_path / "control.sock")},
        "vmm": {"libvirt": name},
    }
    config = write_config(tmp_path / "c.toml", raw)
    result = subprocess.run(
        indicators_command("run", "--config", str(config)), capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"libvirt domain {name!r}: /run/libvirt/qemu/{name}.pid" in result.stderr
    assert "the domain is not running" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "control.sock").exists()


def test_the_set_up_says_how_to_opt_in_before_it_changes_the_system(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import libvirt_rig

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(libvirt_rig.OPT_IN, raising=False)
    monkeypatch.setattr(libvirt_rig, "_missing_packages", lambda: ["libvirt-daemon"])
    monkeypatch.setattr(libvirt_rig.os, "geteuid", lambda: 0)
    reason = libvirt_rig.setup_problem()
    assert reason is not None and "INDICATORS_LIBVIRT_SETUP=1" in reason
    assert "apt-get install -y --no-install-recommends libvirt-daemon " in reason
    monkeypatch.setattr(libvirt_rig, "_missing_packages", lambda: [])
    monkeypatch.setattr(libvirt_rig, "_user_exists", lambda name: False)
    reason = libvirt_rig.setup_problem()
    assert reason is not None and "useradd -r -g libvirt-qemu" in reason
    assert "INDICATORS_LIBVIRT_SETUP=1" in reason
    monkeypatch.setattr(libvirt_rig.os, "geteuid", lambda: 1000)
    assert "needs root" in (libvirt_rig.setup_problem() or "")
