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

The hook on its own is tested in tests/test_libvirt_hook.py, the name
resolution and the snippet in tests/test_libvirt_config.py.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
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
from libvirt_rig import PrivateLibvirt, accepts, processes_with, setup_problem, wait_for

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
        # /run/indicators belongs to QEMU's user (the tmpfiles entry), and a daemon refuses
        # a socket directory another user owns: this rig's root daemon serves from /run.
        "control": {"socket": f"/run/{name}.sock"},
        "vmm": {"libvirt": name},
        # No run_as: the daemon must run as QEMU's user (it reaches QEMU's monitor and
        # RAM with that user's rights only), and this rig's qemu.conf runs QEMU as root.
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
    control = run / f"{name}.sock"
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
        wait_for(lambda: accepts(control), "the daemon's control socket")
        wait_for(pid_file.exists, "the hook's pid file")
        daemons = processes_with(daemon_marker)
        assert len(daemons) == 1, daemons
        qemu_user = pwd.getpwnam("libvirt-qemu").pw_uid
        assert (run / "indicators").stat().st_uid == qemu_user, "the tmpfiles entry's owner"
        # vm_fd = "libvirt" reads QEMU's pid where libvirt keeps it (the namespace's numbering).
        (qemu,) = processes_with(f"guest={name},")
        status = Path(f"/proc/{qemu}/status").read_text()
        ns_pid = int(status.split("NSpid:")[1].split("\n")[0].split()[-1])
        assert int((run / "libvirt" / "qemu" / f"{name}.pid").read_text()) == ns_pid
        qemu_uid = status.split("Uid:")[1].split()[0]
        uids = Path(f"/proc/{daemons[0]}/status").read_text().split("Uid:")[1].split()[:4]
        assert uids == [qemu_uid] * 4, "the daemon runs as QEMU's user"
        rams = glob.glob(str(directory / "var-lib/libvirt/qemu/ram/*/s390.ram"))
        assert len(rams) == 1, rams
        ram_files.append(rams[0])
        # ram = "auto": the daemon asked QEMU and mapped libvirt's s390.ram (ns paths).
        suffix = rams[0].split("/var-lib", 1)[1]
        maps = Path(f"/proc/{daemons[0]}/maps").read_text()
        assert f"/var/lib{suffix}" in maps, "the daemon maps the RAM file libvirt made"
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
            wait_for(lambda: accepts(directory / "run" / f"{name}.sock"), "the daemon")
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
