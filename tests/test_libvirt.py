"""Deployment under a real libvirtd: the hook, ``[vmm] libvirt = NAME``, the domain snippet.

The end-to-end test runs a private libvirtd (:mod:`libvirt_rig`: its own
mount and pid namespaces, the project's hook installed) with a domain that
runs the project's s390x test guest, defined from a plain domain XML with
``indicators libvirt-snippet NAME --domain FILE``.  It follows one guest
(whose name has a space) through start, suspend/resume, a libvirtd restart
and destroy, and starts it a second time (a new DOMID, a new RAM file).

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
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pytest
from daemon_helpers import indicators_command, qmp_client, write_config
from libvirt_rig import PrivateLibvirt, setup_problem

from indicators.config import parse_config
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


@pytest.fixture(scope="module")
def libvirt() -> Iterator[tuple[PrivateLibvirt, Path, dict[str, float]]]:
    """A private libvirtd with the project's hook; its directory; set-up timings."""
    require_libvirt()
    t0 = time.monotonic()
    kernel = build_guest()
    directory = Path(tempfile.mkdtemp(prefix="indicators-libvirt-"))
    for name in ("config", "logs"):
        (directory / name).mkdir()
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    command = f"{sys.executable} -m indicators.cli"
    # libvirt hands hooks little of its environment: a wrapper says where things are.
    wrapper = (
        "#!/bin/sh\n"
        f"export INDICATORS_CONFIG_DIR='{directory / 'config'}'\n"
        f"export INDICATORS_LOG_DIR='{directory / 'logs'}'\n"
        f"export INDICATORS_COMMAND='{command}'\n"
        f"export PYTHONPATH='{python_path}'\n"
        f"exec '{HOOK}' \"$@\"\n"
    )
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin")])
    rig = PrivateLibvirt(directory, wrapper, path)
    try:
        rig.wait_answering()
        rig.kernel = kernel  # type: ignore[attr-defined]
        timings = {"setup": time.monotonic() - t0}
        yield rig, directory, timings
    finally:
        rig.close()
        import shutil

        shutil.rmtree(directory, ignore_errors=True)


def test_the_hook_runs_a_daemon_through_a_domains_life(
    libvirt: tuple[PrivateLibvirt, Path, dict[str, float]],
    record_property: Any,
) -> None:
    rig, directory, timings = libvirt
    name = f"indicators e2e {os.getpid()}"
    raw: dict[str, Any] = {
        "backend": {"kind": "emulated", "memory_size": DEFAULT_MEMORY, "ram": "auto"},
        "devices": [dict(device) for device in DEFAULT_DEVICES],
        "control": {"socket": f"/run/indicators/{name}.sock"},
        "vmm": {"libvirt": name},
    }
    config = write_config(directory / "config" / f"{name}.toml", raw)
    layout = guest_layout(parse_config(raw).devices, {}, DEFAULT_MEMORY)
    run = directory / "run"
    control = run / "indicators" / f"{name}.sock"
    pid_file = run / "indicators" / f"{name}.pid"
    vmm_socket = run / "indicators" / f"{name}.vmm.sock"
    daemon_marker = f"--config {config}"

    plain = directory / "plain.xml"
    plain.write_text(plain_domain(name, rig.kernel))  # type: ignore[attr-defined]
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
        wait_for(control.exists, "the daemon's control socket")
        wait_for(pid_file.exists, "the hook's pid file")
        daemons = processes_with(daemon_marker)
        assert len(daemons) == 1, daemons
        rams = glob.glob(str(directory / "var-lib/libvirt/qemu/ram/*/s390.ram"))
        assert len(rams) == 1, rams
        ram_files.append(rams[0])
        guest = DomainGuest(layout, rams[0])
        try:
            asyncio.run(_exercise(rig, name, guest, control, layout, first=cycle == 0))
        finally:
            guest.close_memory()
        rig.virsh("destroy", name)
        # "stopped" and "release" -> the hook -> the daemon stops cleanly.
        wait_for(lambda: not processes_with(daemon_marker), "the daemon to exit")
        wait_for(lambda: not pid_file.exists(), "the pid file to go")
        assert not control.exists(), "the daemon left its control socket"
        assert not vmm_socket.exists(), "the second monitor's socket was left behind"
        cycles.append(time.monotonic() - t0)
        log = (directory / "logs" / f"{name}.log").read_text()
        assert "exited with 0" in log.splitlines()[-1], log
    assert ram_files[0] != ram_files[1], "libvirt names the RAM file anew at every start"
    rig.virsh("undefine", name)
    timings["first cycle (with a libvirtd restart)"] = cycles[0]
    timings["second cycle"] = cycles[1]
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
            rig.restart_libvirtd()
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
