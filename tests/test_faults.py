"""The fault matrix without QEMU: each case checks that nothing acknowledged is lost.

"Acknowledged" means the daemon replied to ``notify`` with a return: the bit
was then in guest memory (a shared mapping of the RAM file, so it survives
the daemon).  Each test maps the RAM file afterwards and checks every
acknowledged bit.  No guest clears bits here, so set bits stay set.

The QEMU faults (the QMP socket dropping, QEMU killed) are in test_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import need
from daemon_helpers import (
    MEMORY,
    NET_DSCI,
    NET_SUMMARY,
    PCI_AIBV,
    Daemon,
    bit_of,
    daemon_config,
    indicators_command,
    qmp_client,
    running_daemon,
    write_config,
)
from qemu.qmp import ExecuteError, QMPError

from indicators.guestmem import GuestMemory

Acked = set[tuple[str, int]]
BASES = {"net0": NET_DSCI, "pci0": PCI_AIBV}
VECTORS = {"net0": 64, "pci0": 32}


async def load(path: str, seconds: float, clients: int = 4) -> tuple[Acked, list[str]]:
    """Notify random vectors from several clients; return what was acknowledged and failures."""
    acked: Acked = set()
    failures: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def one(seed: int) -> None:
        rng = random.Random(seed)
        with contextlib.suppress(EOFError, OSError, QMPError):
            async with qmp_client(path, f"load{seed}") as client:
                while loop.time() < deadline:
                    device = rng.choice(list(VECTORS))
                    vectors = [rng.randrange(VECTORS[device]) for _ in range(rng.randint(1, 8))]
                    try:
                        await client.execute("notify", {"device": device, "vector": vectors})
                    except ExecuteError as exc:
                        failures.append(str(exc))
                    else:
                        acked.update((device, v) for v in vectors)

    await asyncio.gather(*(one(seed) for seed in range(clients)))
    return acked, failures


def assert_all_set(ram: Path, acked: Acked) -> None:
    with GuestMemory(MEMORY, str(ram)) as memory:
        missing = []
        for device, vector in sorted(acked):
            gaddr, mask = bit_of(BASES[device], vector)
            if not memory.load(gaddr, 1) & mask:
                missing.append((device, vector))
    assert not missing, f"acknowledged but not in guest memory: {missing[:10]}"


@contextlib.contextmanager
def daemon_on_file(tmp_path: Path, **sections: Any) -> Iterator[tuple[Daemon, Path]]:
    ram = tmp_path / "ram"
    raw = daemon_config(tmp_path / "control.sock", ram=ram, **sections)
    with running_daemon(tmp_path, raw) as daemon:
        yield daemon, ram


async def test_eagain_storm_loses_nothing_acknowledged(tmp_path: Path) -> None:
    faults = {"eagain_probability": 0.9, "eagain_sizes": [1, 2, 4, 8, 16], "seed": 3}
    retry = {"eagain_attempts": 8, "eagain_backoff_base": 1e-6, "eagain_backoff_cap": 1e-4}
    with daemon_on_file(tmp_path, backend={"faults": faults}, retry=retry) as (daemon, ram):
        acked, failures = await load(daemon.socket, 1.5)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    assert acked, "some notifications get through the storm"
    assert failures and all("EAGAIN" in f for f in failures), failures[:3]
    assert_all_set(ram, acked)


async def test_persistent_protection_fails_clearly_and_sets_no_summary(tmp_path: Path) -> None:
    faults = {"protected": [[NET_DSCI, 8]]}
    with daemon_on_file(tmp_path, backend={"faults": faults}) as (daemon, ram):
        acked, failures = await load(daemon.socket, 1.0)
        async with qmp_client(daemon.socket) as client:
            stats = await client.execute("query-stats")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    assert {device for device, _ in acked} == {"pci0"}, "only pci0 can be applied"
    assert failures and all("code 4" in f and "net0" in f for f in failures), failures[:3]
    assert stats["failures"].get("4", 0) > 0
    assert_all_set(ram, acked)
    with GuestMemory(MEMORY, str(ram)) as memory:
        assert memory.load(NET_SUMMARY, 1) == 0, "no summary without its indicator"
        assert memory.read(NET_DSCI, 8) == bytes(8)


async def test_sigkill_then_restart_rebuilds_from_guest_memory(tmp_path: Path) -> None:
    with daemon_on_file(tmp_path) as (daemon, ram):
        task = asyncio.create_task(load(daemon.socket, 5.0))
        await asyncio.sleep(1.0)
        daemon.signal(signal.SIGKILL)
        assert daemon.wait() == -signal.SIGKILL
        acked, _ = await task
    assert acked
    assert_all_set(ram, acked)
    # A new daemon on the same config and RAM file shows the same bits and serves.
    raw = daemon_config(tmp_path / "control.sock", ram=ram)
    with running_daemon(tmp_path, raw) as daemon:
        async with qmp_client(daemon.socket) as client:
            adapters = await client.execute("query-adapters")
            shown = {
                (device["name"], vector)
                for adapter in adapters
                for device in adapter["devices"]
                for vector in device.get("indicators-set", [])
            }
            assert acked <= shown
            assert (await client.execute("notify", {"device": "net0", "vector": 1}))["applied"]


def run_expecting_failure(tmp_path: Path, socket_dir: Path) -> str:
    config = write_config(tmp_path / "c.toml", daemon_config(socket_dir / "control.sock"))
    result = subprocess.run(
        indicators_command("run", "--config", str(config)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result
    return result.stderr


@contextlib.contextmanager
def tmpfs(target: Path, options: str) -> Iterator[Path]:
    target.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True
    )
    need(mounted.returncode == 0, f"needs root to mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False)


def test_read_only_socket_directory_is_a_clear_error(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro,size=64k") as directory:
        stderr = run_expecting_failure(tmp_path, directory)
    assert "cannot create the control socket" in stderr and "Read-only file system" in stderr


def test_full_disk_is_a_clear_error(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "full", "size=64k,nr_inodes=2") as directory:
        with contextlib.suppress(OSError):
            for number in range(4):  # use up the inodes
                (directory / f"f{number}").touch()
        stderr = run_expecting_failure(tmp_path, directory)
    assert "cannot create the control socket" in stderr and "No space left" in stderr
