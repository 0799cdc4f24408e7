"""The daemon's own wiring, configured from a file: what the README promises, through it.

``indicators run --config FILE`` (a subprocess, its RAM a file the test
maps) or a :class:`~indicators.daemon.service.Service` made from
``load_config(FILE)``: delivery judged by the caller-side oracle, the
default peer policy, the per-client rate limit, the eventfd limits and the
write guard.  No test sets attributes on a running daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import subprocess
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from daemon_helpers import (
    MEMORY,
    NET_DSCI,
    TIMEOUT,
    Client,
    bit_of,
    daemon_config,
    qmp_client,
    running_daemon,
    write_config,
)
from qemu.qmp import ExecuteError

from indicators.adapters import build_model
from indicators.config import load_config, parse_config
from indicators.daemon.service import Service
from indicators.engine import Engine
from indicators.guestmem import GuestMemory
from indicators.memop import EmulatedBackend
from indicators.simguest import SimulatedGuest
from indicators.testing.delivery import error_code, notify
from indicators.testing.oracle import oracle_for

#: Where each device's vector n has its bit: from the test's own layout (daemon_helpers).
DSCI = {"net0": (NET_DSCI, 64), "pci0": (0x10200, 32), "route0": (0x10300, 4)}


def dsci_bit(device: str, vector: int) -> tuple[int, int]:
    return bit_of(DSCI[device][0], vector)


# ------------------------------------------------------------------ delivery


async def test_every_acknowledged_notify_reached_the_guest(tmp_path: Path) -> None:
    """3,000 notifies through ``indicators run``; a simulated guest on the shared RAM
    file consumes between them, so each acknowledged bit must be in memory at its
    acknowledgement or counted by the guest since it was sent (the oracle), never
    by what the daemon says it did."""
    ram = tmp_path / "guest.ram"
    raw = daemon_config(tmp_path / "control.sock", ram=ram)
    rng = random.Random(5)
    with running_daemon(tmp_path, raw) as daemon, GuestMemory(MEMORY, str(ram)) as memory:
        guest = SimulatedGuest(memory, build_model(parse_config(raw)))
        # The guest runs only between requests: its count is final at acknowledgement.
        oracle = oracle_for(memory.load, dsci_bit, guest.counts, settle=lambda: None)
        async with qmp_client(daemon.socket) as client:
            for _ in range(3000):
                device = rng.choice(list(DSCI))
                vectors = sorted({rng.randrange(DSCI[device][1]) for _ in range(3)})
                tokens = oracle.submit_many((device, v) for v in vectors)
                try:
                    await client.execute("notify", {"device": device, "vector": vectors})
                except ExecuteError as exc:
                    for token in tokens:
                        oracle.failed(token, error_code(exc))
                else:
                    for token in tokens:
                        oracle.acknowledged(token)
                if rng.random() < 0.7:
                    guest.poll_once()
            stats = await client.execute("query-stats")
        while guest.poll_once():
            pass
    verdict = oracle.verdict()
    assert verdict.ok and not verdict.failed, verdict
    assert verdict.acknowledged == stats["applied"] > 6000
    assert verdict.seen_in_memory > 0 and verdict.seen_by_counter == 0  # nothing concurrent


async def test_refused_notifies_are_counted_as_what_they_were_and_change_nothing(
    tmp_path: Path,
) -> None:
    """The keyed device's page refuses its key (protection, code 4); a vector out of
    range is a bad request.  Both are failures by their code, and memory is unchanged."""
    ram = tmp_path / "guest.ram"
    raw = daemon_config(tmp_path / "control.sock", ram=ram)
    with running_daemon(tmp_path, raw) as daemon, GuestMemory(MEMORY, str(ram)) as memory:
        before = memory.snapshot()
        locked = (0x20100, 4)  # LOCKED_PAGE + 0x100: its dsci bits, by the test's layout
        oracle = oracle_for(
            memory.load, lambda d, v: bit_of(locked[0], v), Counter(), settle=lambda: None
        )
        async with qmp_client(daemon.socket) as client:
            assert not await notify(client, oracle, "locked", [0, 3])
            assert not await notify(client, oracle, "locked", [9])
        assert memory.snapshot() == before
    verdict = oracle.verdict()
    assert verdict.ok and verdict.acknowledged == 0
    assert verdict.failed == {"4": 2, "GenericError": 1}, verdict


# --------------------------------------------------------------- peer policy


#: The peer runs as nobody: the test's own interpreter may sit under root's 0700 home.
SYSTEM_PYTHON = "/usr/bin/python3"
PEER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sys.argv[1])
    print(s.recv(4096).decode(errors="replace"))
    """
)


def peer_as(user: str, path: str) -> str:
    """What a client running as ``user`` reads first from the control socket."""
    command = [SYSTEM_PYTHON, "-c", PEER, path]
    if user != "root":
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_default_peer_policy_refuses_another_uid(tmp_path: Path, world: Path) -> None:
    """No ``allowed_uids``: root and the daemon's own uid only.  The socket mode lets
    anyone connect (0666), so the policy, not the file mode, refuses ``nobody``."""
    need(os.geteuid() == 0, "needs root to run a client as another user")
    need(shutil.which("setpriv"), "needs setpriv (util-linux) to run a client as nobody")
    need(os.access(SYSTEM_PYTHON, os.X_OK), f"needs {SYSTEM_PYTHON} for a client as nobody")
    raw = daemon_config(world / "control.sock", control={"mode": 0o666})
    with running_daemon(tmp_path, raw) as daemon:
        assert '"QMP"' in peer_as("root", daemon.socket)
        refused = peer_as("65534", daemon.socket)  # nobody
        assert '"QMP"' not in refused
        assert "Permission denied for uid 65534" in refused
        assert "refused control client" in daemon.logs()


# ------------------------------------------------------------ rate limiting


async def test_a_greedy_client_does_not_hold_up_another(tmp_path: Path) -> None:
    """``max_rate = 2``: a burst of two requests, then one every half second, per
    client.  The greedy client pipelines 20 notifies; once its burst is answered, the
    other client makes two requests in a row and both are answered before the greedy
    client's third reply (its own bucket is full), and the daemon has accepted only
    the greedy client's burst: its other requests wait unread.  With one bucket for
    all, the other client would wait for refills the greedy one competes for.
    Counts and ordering; the half second is only a margin."""
    raw = daemon_config(tmp_path / "control.sock", control={"max_rate": 2.0})
    order: list[str] = []
    stats: list[dict[str, Any]] = []
    with running_daemon(tmp_path, raw) as daemon:
        async with (
            qmp_client(daemon.socket, "greedy") as greedy,
            qmp_client(daemon.socket, "other") as other,
        ):
            burst = asyncio.Event()

            async def one_greedy(number: int) -> None:
                await greedy.execute("notify", {"device": "net0", "vector": number})
                order.append(f"greedy{number}")
                if len(order) == 2:
                    burst.set()

            flood = [asyncio.create_task(one_greedy(n)) for n in range(20)]
            await asyncio.wait_for(burst.wait(), TIMEOUT)
            for _ in range(2):
                stats.append(await asyncio.wait_for(other.execute("query-stats"), TIMEOUT))
                order.append("other")
            for task in flood:
                task.cancel()
            await asyncio.gather(*flood, return_exceptions=True)
    assert order[2:4] == ["other", "other"], f"the other client waited for the greedy one: {order}"
    accepted = [s["notifications"] for s in stats]
    assert accepted == [2, 2], f"the greedy client was not held to its rate: {accepted}"


# ------------------------------------------------------------- eventfd limits


async def attach(client: Client, fd: int, device: str, vector: int) -> str:
    """Pass ``fd`` and attach it; "ok" or the refusal's text."""
    name = f"{device}-{vector}"
    client.send_fd_scm(fd)
    await client.execute("getfd", {"fdname": name})
    try:
        await client.execute("attach-eventfd", {"device": device, "vector": vector, "fdname": name})
    except ExecuteError as exc:
        return str(exc)
    return "ok"


async def _attach_all(
    tmp_path: Path, control: dict[str, int], plan: list[tuple[str, int]]
) -> tuple[list[str], list[tuple[str, int]]]:
    """Run a daemon with ``control`` limits; attach one eventfd per (client, vector) of
    ``plan`` through two clients of this uid; the answers and what ended up attached."""
    raw = daemon_config(tmp_path / "control.sock", control=control)
    with contextlib.ExitStack() as stack, running_daemon(tmp_path, raw) as daemon:
        async with (
            qmp_client(daemon.socket, "a") as a,
            qmp_client(daemon.socket, "b") as b,
        ):
            clients = {"a": a, "b": b}
            answers = []
            for name, vector in plan:
                fd = os.eventfd(0, os.EFD_NONBLOCK)
                stack.callback(os.close, fd)
                answers.append(await attach(clients[name], fd, "net0", vector))
            stats = await b.execute("query-stats")
    return answers, sorted((e["device"], e["vector"]) for e in stats["eventfds"])


async def test_eventfd_limit_per_uid_follows_the_uid_across_connections(tmp_path: Path) -> None:
    plan = [("a", 0), ("a", 1), ("a", 2), ("b", 3)]
    control = {"max_eventfds": 10, "max_eventfds_per_client": 2}
    answers, attached = await _attach_all(tmp_path, control, plan)
    assert answers[:2] == ["ok", "ok"]
    # a second connection of the same uid gets no fresh allowance
    assert all("uid 0 may attach at most 2 eventfds" in answer for answer in answers[2:])
    assert attached == [("net0", 0), ("net0", 1)]


async def test_eventfd_limit_in_all(tmp_path: Path) -> None:
    plan = [("a", 0), ("a", 1), ("b", 3), ("b", 4)]
    control = {"max_eventfds": 3, "max_eventfds_per_client": 10}
    answers, attached = await _attach_all(tmp_path, control, plan)
    assert answers[:3] == ["ok", "ok", "ok"]
    assert "at most 3 eventfds may be attached" in answers[3]
    assert attached == [("net0", 0), ("net0", 1), ("net0", 3)]


# ---------------------------------------------------------------- write guard


@pytest.fixture
async def service(tmp_path: Path) -> Any:
    path = write_config(tmp_path / "daemon.toml", daemon_config(tmp_path / "control.sock"))
    service = Service(load_config(path), config_path=str(path))
    await service.start()
    yield service
    await service.stop(grace=1.0)


async def test_the_write_guard_refuses_bits_outside_the_model(service: Service) -> None:
    """An engine that got its addresses wrong (here: one built on a model whose net0
    sits 0x800 bytes higher) over the backend the service wired: refused with EPERM,
    nothing written.  Independent of any other test."""
    raw = daemon_config("unused.sock")
    raw["devices"][0] = {**raw["devices"][0], "device_indicator": NET_DSCI + 0x800}
    stray = build_model(parse_config(raw))
    assert service.wiring is not None
    backend = service.wiring.backend
    assert isinstance(backend, EmulatedBackend)
    memory = backend.memory.snapshot()
    engine = Engine(stray, service.engine.backend, service.engine.sink)
    (error,) = await engine.notify_many([("net0", 3)])
    assert error is not None and error.code == "EPERM", error
    assert "outside the configured indicator and summary bits" in str(error)
    assert f"{NET_DSCI + 0x800:#x}" in str(error)
    assert backend.memory.snapshot() == memory, "memory changed"
    # The daemon's own engine still works through the same guard.
    assert await service.engine.notify_many([("net0", 3)]) == [None]
    gaddr, mask = bit_of(NET_DSCI, 3)
    assert backend.memory.load(gaddr, 1) & mask
