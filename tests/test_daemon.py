"""The daemon end to end: real control socket, real QMP clients, real eventfds and processes.

Most tests run a :class:`~indicators.daemon.service.Service` in the test's
event loop (so they can read its guest memory directly); the signal tests
run ``indicators run --config FILE`` as a subprocess whose guest RAM is a
file the test maps after the process has exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from attack_helpers import FakeQemu
from daemon_helpers import (
    LOCKED_PAGE,
    MEMORY,
    NET_DSCI,
    NET_SUMMARY,
    PCI_AIBV,
    PCI_SUMMARY,
    ROUTE_IND,
    ROUTE_SUMMARY,
    TIMEOUT,
    Client,
    RawClient,
    bit_of,
    daemon_config,
    eventfd_writer,
    kill_quietly,
    memory_of,
    qmp_client,
    running_daemon,
    start_service,
    wait_until,
    write_config,
)
from qemu.qmp import ConnectError, ExecuteError, QMPError

from indicators.config import parse_config
from indicators.daemon.commands import COMMANDS as COMMAND_TABLE
from indicators.daemon.commands import FailureBatch, failure_message
from indicators.daemon.qmp_server import QmpServer
from indicators.daemon.service import Service
from indicators.engine import NotifyError
from indicators.guestmem import GuestMemory

NET_ADAPTER, PCI_ADAPTER, ROUTE_ADAPTER, LOCKED_ADAPTER = 3, 1 << 3 | 2, 0x40, 4
COMMANDS = {spec.name for spec in COMMAND_TABLE} | set(QmpServer.BUILTINS)


# ------------------------------------------------------------------ fixtures


def is_set(memory: GuestMemory, gaddr: int, number: int) -> bool:
    byte, mask = bit_of(gaddr, number)
    return bool(memory.load(byte, 1) & mask)


def device_entry(adapters: Any, name: str) -> dict[str, Any]:
    for adapter in adapters:
        for device in adapter["devices"]:
            if device["name"] == name:
                return dict(device)
    raise AssertionError(f"query-adapters has no device {name!r}")


def adapter_entry(adapters: Any, adapter_id: int) -> dict[str, Any]:
    return dict(next(a for a in adapters if a["id"] == adapter_id))


async def expect_error(client: Client, command: str, arguments: dict[str, Any]) -> str:
    with pytest.raises(ExecuteError) as caught:
        await client.execute(command, arguments)
    assert caught.value.error_class == "GenericError"
    return str(caught.value)


async def next_event(listener: Any) -> dict[str, Any]:
    event = await asyncio.wait_for(listener.get(), TIMEOUT)
    return {"event": event["event"], "data": dict(event.get("data", {}))}


# ------------------------------------------------------------- negotiation


async def test_greeting_negotiation_and_command_list(client: Client) -> None:
    assert client.greeting is not None
    greeting = client.greeting.QMP
    assert list(greeting.capabilities) == []
    assert str(greeting.version["package"]).startswith("indicators ")
    names = {entry["name"] for entry in await client.execute("query-commands")}
    assert names == COMMANDS
    assert await client.execute("query-version") == greeting.version


async def test_commands_before_negotiation_are_refused(service: Service) -> None:
    raw = await RawClient.connect(service.socket_path, negotiate=False)
    reply = await raw.execute("notify", arguments={"device": "net0", "vector": 1})
    assert reply["error"]["class"] == "CommandNotFound"
    assert "qmp_capabilities" in reply["error"]["desc"]
    assert not is_set(memory_of(service), NET_DSCI, 1)
    assert await raw.execute("qmp_capabilities") == {"return": {}}
    assert await raw.execute("notify", arguments={"device": "net0", "vector": 1}) == {
        "return": {"applied": 1}
    }
    await raw.close()


# ------------------------------------------------------------------ notify


async def test_notify_single_vector_sets_dsci_and_summary(service: Service, client: Client) -> None:
    memory = memory_of(service)
    assert await client.execute("notify", {"device": "net0", "vector": 5}) == {"applied": 1}
    assert is_set(memory, NET_DSCI, 5)
    assert memory.load(NET_SUMMARY, 1) == 0x01  # QEMU ORs 0x01 into a virtio summary byte
    assert [n for n in range(64) if is_set(memory, NET_DSCI, n)] == [5]


async def test_notify_list_of_vectors(service: Service, client: Client) -> None:
    memory = memory_of(service)
    vectors = [0, 7, 8, 31, 63, 7]  # a duplicate counts once
    assert await client.execute("notify", {"device": "net0", "vector": vectors}) == {"applied": 5}
    assert [n for n in range(64) if is_set(memory, NET_DSCI, n)] == [0, 7, 8, 31, 63]
    assert await client.execute("notify", {"device": "pci0", "vector": [3]}) == {"applied": 1}
    assert is_set(memory, PCI_AIBV, 3)
    assert memory.load(PCI_SUMMARY, 1) == 0x80  # aisbo 0: the MSB
    assert await client.execute("notify", {"device": "route0", "vector": 2}) == {"applied": 1}
    assert is_set(memory, ROUTE_IND, 2)
    assert memory.load(ROUTE_SUMMARY, 1) == 0x80


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"device": "nope", "vector": 1}, ["device 'nope'"]),
        ({"device": "net0", "vector": 64}, ["device 'net0'", "vector 64"]),
        ({"device": "net0", "vector": -1}, ["device 'net0'", "vector -1"]),
        ({"device": "net0", "vector": [1, 2, 99]}, ["device 'net0'", "vector 99"]),
        ({"device": "net0", "vector": "1"}, ["'vector"]),
        ({"device": "net0", "vector": 1.0}, ["'vector"]),
        ({"device": "net0", "vector": [1, "2"]}, ["'vector"]),
        ({"device": 7, "vector": 1}, ["'device'"]),
        ({"device": "", "vector": 1}, ["'device'"]),
        ({"device": "net0"}, ["Parameter 'vector' is missing"]),
        ({"vector": 1}, ["Parameter 'device' is missing"]),
        ({"device": "net0", "vector": 1, "queue": 2}, ["Parameter 'queue' is unexpected"]),
    ],
)
async def test_notify_bad_arguments_are_named_and_nothing_is_applied(
    service: Service, client: Client, arguments: dict[str, Any], named: list[str]
) -> None:
    desc = await expect_error(client, "notify", arguments)
    for text in named:
        assert text in desc
    stats = await client.execute("query-stats")
    assert stats["notifications"] == 0
    assert stats["applied"] == 0
    assert not any(memory_of(service).read(NET_DSCI, 8))
    # The daemon keeps serving the same client.
    assert await client.execute("notify", {"device": "net0", "vector": 1}) == {"applied": 1}


@pytest.mark.parametrize(
    ("vector", "desc"),
    [
        ("1", "Invalid parameter 'vector': expected an integer or a list of integers; "
              'got a string "1"'),
        ([1, "2"], "Invalid parameter 'vector': expected an integer or a list of integers; "
                   'item 1 is a string "2"'),
        (None, "Invalid parameter 'vector': expected an integer or a list of integers; got null"),
    ],
)  # fmt: skip
async def test_argument_errors_read_as_a_person_would_write_them(
    client: Client, vector: object, desc: str
) -> None:
    error = await expect_error(client, "notify", {"device": "net0", "vector": vector})
    assert error == desc
    assert "list[int]" not in error


async def test_failed_notify_reports_code_and_event(service: Service, client: Client) -> None:
    """Device key 5 on a page whose storage key has ACC 3: protection (code 4)."""
    with client.listener(names=("NOTIFY_FAILED",)) as listener:
        desc = await expect_error(client, "notify", {"device": "locked", "vector": [1, 2]})
        assert "device 'locked': 0 of 2 applied, 2 failed (code 4: 2)" in desc
        for vector in (1, 2):
            assert f"vector {vector}: " in desc
        # the summary (same page) is checked before any dsci bit is written: it is named
        assert f"(code 4) on the summary at gaddr {LOCKED_PAGE:#x} size 1 key 5" in desc
        event = await next_event(listener)  # one event for the batch
        await client.execute("query-stats")  # any second event would have come before
        assert listener.empty()
    assert event["event"] == "NOTIFY_FAILED"
    data = event["data"]
    assert (data["device"], data["vector"], data["code"]) == ("locked", 1, "4")
    assert (data["where"], data["gaddr"], data["size"], data["key"]) == (
        "summary",
        LOCKED_PAGE,
        1,
        5,
    )
    assert data["count"] == 2 and data["codes"] == {"4": 2}
    assert [(f["vector"], f["code"]) for f in data["first"]] == [(1, "4"), (2, "4")]
    assert "protection" in data["desc"]
    memory = memory_of(service)
    assert memory.read(LOCKED_PAGE, 0x101) == bytes(0x101)  # neither dsci nor summary
    stats = await client.execute("query-stats")
    assert stats["failures"] == {"4": 2}
    assert stats["adapters"][str(LOCKED_ADAPTER)]["failures"] == 2
    assert await client.execute("notify", {"device": "net0", "vector": 3}) == {"applied": 1}


# --------------------------------------------------------------- the events


@pytest.mark.parametrize(
    ("device", "adapter", "isc"),
    [("net0", NET_ADAPTER, 3), ("pci0", PCI_ADAPTER, 2), ("route0", ROUTE_ADAPTER, 5)],
)
async def test_adapter_interrupt_event_once_per_summary_edge(
    service: Service, client: Client, device: str, adapter: int, isc: int
) -> None:
    with client.listener(names=("ADAPTER_INTERRUPT",)) as listener:
        await client.execute("notify", {"device": device, "vector": 0})
        assert await next_event(listener) == {
            "event": "ADAPTER_INTERRUPT",
            "data": {"adapter": adapter, "isc": isc},
        }
        # The summary is still set (nobody consumed it): no second interrupt.
        await client.execute("notify", {"device": device, "vector": 1})
        await client.execute("query-stats")  # a round trip after which an event would be here
        assert listener.empty()
    stats = await client.execute("query-stats")
    assert stats["interrupts-injected"] == 1
    assert stats["adapters"][str(adapter)]["interrupts"] == 1


async def test_ais_single_mode_suppresses_the_second_interrupt(
    service: Service, client: Client
) -> None:
    memory = memory_of(service)
    names = ("ADAPTER_INTERRUPT", "INTERRUPT_SUPPRESSED")
    pci = {"adapter": PCI_ADAPTER, "isc": 2}
    with client.listener(names=names) as listener:
        assert await client.execute("set-ais-mode", {"isc": 2, "mode": "single"}) == {}
        adapters = await client.execute("query-adapters")
        assert adapter_entry(adapters, PCI_ADAPTER)["simm"] is True
        assert adapter_entry(adapters, PCI_ADAPTER)["nimm"] is False

        await client.execute("notify", {"device": "pci0", "vector": 0})
        assert await next_event(listener) == {"event": "ADAPTER_INTERRUPT", "data": pci}
        adapters = await client.execute("query-adapters")
        assert adapter_entry(adapters, PCI_ADAPTER)["nimm"] is True

        memory.write(PCI_SUMMARY, b"\0")  # the guest consumed the summary, not re-armed yet
        await client.execute("notify", {"device": "pci0", "vector": 1})
        assert await next_event(listener) == {"event": "INTERRUPT_SUPPRESSED", "data": pci}
        assert is_set(memory, PCI_AIBV, 1) and memory.load(PCI_SUMMARY, 1) == 0x80

        # Another ISC is not affected.
        await client.execute("notify", {"device": "net0", "vector": 0})
        assert await next_event(listener) == {
            "event": "ADAPTER_INTERRUPT",
            "data": {"adapter": NET_ADAPTER, "isc": 3},
        }

        # The guest re-arms with mode ALL: the next edge interrupts again.
        assert await client.execute("set-ais-mode", {"isc": 2, "mode": "all"}) == {}
        memory.write(PCI_SUMMARY, b"\0")
        await client.execute("notify", {"device": "pci0", "vector": 2})
        assert await next_event(listener) == {"event": "ADAPTER_INTERRUPT", "data": pci}
    stats = await client.execute("query-stats")
    assert stats["interrupts-suppressed"] == 1
    counts = stats["adapters"][str(PCI_ADAPTER)]
    assert (counts["interrupts"], counts["suppressed"], counts["failures"]) == (2, 1, 0)


async def test_reset_adapter_clears_suppression(service: Service, client: Client) -> None:
    memory = memory_of(service)
    await client.execute("set-ais-mode", {"isc": 2, "mode": "single"})
    await client.execute("notify", {"device": "pci0", "vector": 0})
    adapter = adapter_entry(await client.execute("query-adapters"), PCI_ADAPTER)
    assert (adapter["simm"], adapter["nimm"]) == (True, True)
    assert await client.execute("reset-adapter", {"adapter": PCI_ADAPTER}) == {}
    adapter = adapter_entry(await client.execute("query-adapters"), PCI_ADAPTER)
    assert (adapter["simm"], adapter["nimm"]) == (False, False)
    with client.listener(names=("ADAPTER_INTERRUPT", "INTERRUPT_SUPPRESSED")) as listener:
        memory.write(PCI_SUMMARY, b"\0")
        await client.execute("notify", {"device": "pci0", "vector": 1})
        assert (await next_event(listener))["event"] == "ADAPTER_INTERRUPT"


@pytest.mark.parametrize(
    ("command", "arguments", "named"),
    [
        ("reset-adapter", {"adapter": 99}, "unknown adapter 99; adapters are [3, 4, 10, 64]"),
        ("reset-adapter", {"adapter": -1}, "'adapter'"),
        ("reset-adapter", {}, "Parameter 'adapter' is missing"),
        ("set-ais-mode", {"isc": 8, "mode": "all"}, "'isc'"),
        ("set-ais-mode", {"isc": 2, "mode": "sometimes"}, "'mode'"),
        ("set-ais-mode", {"isc": "2", "mode": "all"}, "'isc'"),
        ("query-stats", {"verbose": True}, "Parameter 'verbose' is unexpected"),
        ("detach-eventfd", {"device": "net0", "vector": 1}, "has no eventfd attached"),
        ("detach-eventfd", {"device": "nope", "vector": 1}, "unknown device 'nope'"),
        ("detach-eventfd", {"device": "net0", "vector": 99}, "vector 99 is not one"),
        ("attach-eventfd", {"device": "net0", "vector": 1, "fdname": "x"}, "named 'x' not found"),
        ("getfd", {"fdname": "x"}, "No file descriptor supplied"),
    ],
)
async def test_other_commands_refuse_bad_arguments(
    client: Client, command: str, arguments: dict[str, Any], named: str
) -> None:
    assert named in await expect_error(client, command, arguments)
    assert (await client.execute("query-stats"))["notifications"] == 0


async def test_query_adapters_reads_live_bits(service: Service, client: Client) -> None:
    adapters = await client.execute("query-adapters")
    assert [a["id"] for a in adapters] == [NET_ADAPTER, PCI_ADAPTER, ROUTE_ADAPTER, LOCKED_ADAPTER]
    assert adapter_entry(adapters, PCI_ADAPTER)["suppressible"] is True
    net = device_entry(adapters, "net0")
    assert (net["indicators-set"], net["summary-set"], net["vectors"]) == ([], False, 64)

    await client.execute("notify", {"device": "net0", "vector": [2, 40]})
    net = device_entry(await client.execute("query-adapters"), "net0")
    assert (net["indicators-set"], net["summary-set"]) == ([2, 40], True)

    # The guest consumes vector 2 and the summary: query-adapters reads memory, not a cache.
    memory = memory_of(service)
    byte, mask = bit_of(NET_DSCI, 2)
    memory.write(byte, bytes([memory.load(byte, 1) & ~mask]))
    memory.write(NET_SUMMARY, b"\0")
    net = device_entry(await client.execute("query-adapters"), "net0")
    assert (net["indicators-set"], net["summary-set"]) == ([40], False)
    assert device_entry(await client.execute("query-adapters"), "locked")["key"] == 5


async def test_query_stats_counts(client: Client) -> None:
    await client.execute("notify", {"device": "net0", "vector": [1, 1, 2]})
    await client.execute("notify", {"device": "pci0", "vector": 0})
    with contextlib.suppress(ExecuteError):
        await client.execute("notify", {"device": "locked", "vector": 0})
    stats = await client.execute("query-stats")
    assert stats["notifications"] == 4  # vector 1 twice in one notify counts once
    assert stats["applied"] == 3
    assert stats["merged"] == 0
    assert stats["interrupts-injected"] == 2
    assert stats["failures"] == {"4": 1}
    assert (stats["pending"], stats["paused"], stats["holds"]) == (0, False, [])
    assert (stats["unavailable"], stats["vmm"]) == (None, None)
    assert (stats["eventfd-signals"], stats["eventfds"]) == (0, [])


# -------------------------------------------------------------- eventfds


async def attach(client: Client, fd: int, device: str, vector: int, name: str = "ev") -> None:
    client.send_fd_scm(fd)
    assert await client.execute("getfd", {"fdname": name}) == {}
    arguments = {"device": device, "vector": vector, "fdname": name}
    assert await client.execute("attach-eventfd", arguments) == {}


async def test_eventfd_attach_signal_detach(service: Service, client: Client) -> None:
    memory = memory_of(service)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        await attach(client, efd, "net0", 9)
        stats = await client.execute("query-stats")
        assert stats["eventfds"] == [{"device": "net0", "vector": 9, "signals": 0, "reads": 0}]

        os.eventfd_write(efd, 3)
        await wait_until(lambda: is_set(memory, NET_DSCI, 9))
        await wait_until(lambda: service.engine.stats.applied == 1)
        stats = await client.execute("query-stats")
        assert stats["eventfd-signals"] == 3
        assert stats["eventfds"][0]["signals"] == 3

        # A second eventfd on the same vector is refused (and the passed fd closed).
        other = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            client.send_fd_scm(other)
            await client.execute("getfd", {"fdname": "again"})
            args = {"device": "net0", "vector": 9, "fdname": "again"}
            assert "already has an eventfd" in await expect_error(client, "attach-eventfd", args)
        finally:
            os.close(other)

        assert await client.execute("detach-eventfd", {"device": "net0", "vector": 9}) == {}
        assert (await client.execute("query-stats"))["eventfds"] == []
        memory.write(NET_DSCI + 1, b"\0")
        os.eventfd_write(efd, 1)  # nobody listens any more
        await asyncio.sleep(0.05)
        assert not is_set(memory, NET_DSCI, 9)
        assert service.engine.stats.applied == 1
    finally:
        os.close(efd)


@pytest.mark.parametrize(
    ("device", "vector", "named"),
    [("nope", 0, "unknown device 'nope'"), ("net0", 64, "vector 64 is not one")],
)
async def test_eventfd_for_an_unknown_target_is_refused(
    client: Client, device: str, vector: int, named: str
) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        client.send_fd_scm(efd)
        await client.execute("getfd", {"fdname": "ev"})
        arguments = {"device": device, "vector": vector, "fdname": "ev"}
        assert named in await expect_error(client, "attach-eventfd", arguments)
        assert (await client.execute("query-stats"))["eventfds"] == []
    finally:
        os.close(efd)


async def test_eventfds_per_uid_are_limited_over_connections(tmp_path: Path) -> None:
    service = await start_service(tmp_path, control={"max_eventfds_per_client": 2})
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
    try:
        async with (
            qmp_client(service.socket_path) as first,
            qmp_client(service.socket_path) as second,
        ):
            for vector, efd in enumerate(efds[:3]):
                first.send_fd_scm(efd)
                await first.execute("getfd", {"fdname": f"e{vector}"})
            for vector in range(2):
                args = {"device": "net0", "vector": vector, "fdname": f"e{vector}"}
                assert await first.execute("attach-eventfd", args) == {}
            args = {"device": "net0", "vector": 2, "fdname": "e2"}
            assert "at most 2 eventfds" in await expect_error(first, "attach-eventfd", args)
            # Another connection of the same uid gains nothing (the limit is the uid's).
            second.send_fd_scm(efds[3])
            await second.execute("getfd", {"fdname": "mine"})
            args = {"device": "net0", "vector": 3, "fdname": "mine"}
            assert "uid 0 may attach at most 2" in await expect_error(
                second, "attach-eventfd", args
            )
            assert len((await second.execute("query-stats"))["eventfds"]) == 2
    finally:
        for efd in efds:
            os.close(efd)
        await service.stop(grace=1.0)


@pytest.mark.parametrize("kind", ["pipe", "file", "socket"])
async def test_a_non_eventfd_is_refused(tmp_path: Path, client: Client, kind: str) -> None:
    with contextlib.ExitStack() as stack:
        if kind == "pipe":
            read_end, write_end = os.pipe()
            stack.callback(os.close, read_end)
            stack.callback(os.close, write_end)
            fd = read_end
        elif kind == "file":
            fd = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT, 0o600)
            stack.callback(os.close, fd)
        else:
            pair = socket.socketpair()
            for end in pair:
                stack.enter_context(end)
            fd = pair[0].fileno()
        client.send_fd_scm(fd)
        await client.execute("getfd", {"fdname": "notanevent"})
        arguments = {"device": "net0", "vector": 0, "fdname": "notanevent"}
        assert "is not an eventfd" in await expect_error(client, "attach-eventfd", arguments)
        # The daemon closed its copy: the name is gone.
        assert "not found" in await expect_error(client, "closefd", {"fdname": "notanevent"})
        assert (await client.execute("query-stats"))["eventfds"] == []


async def test_100000_eventfd_writes_from_another_process_all_applied(
    service: Service, client: Client
) -> None:
    """Every write is counted, and the last one sets the bit again after the guest cleared it."""
    writes = 100_000
    memory = memory_of(service)
    byte, mask = bit_of(NET_DSCI, 33)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    go_read, go_write = os.pipe()
    try:
        await attach(client, efd, "net0", 33)
        child = subprocess.Popen(
            [sys.executable, "-c", eventfd_writer(efd, writes, wait_for_go=go_read)],
            pass_fds=(efd, go_read),
        )
        try:
            await wait_until(lambda: service.eventfds.signals == writes - 1, timeout=30.0)
            await service.eventfds.drain()
            await service.engine.drain()
            assert memory.load(byte, 1) == mask
            memory.write(byte, b"\0")  # the guest consumed the bit and the summary
            memory.write(NET_SUMMARY, b"\0")
            os.write(go_write, b"!")
            await wait_until(lambda: service.eventfds.signals == writes)
            assert child.wait(TIMEOUT) == 0
            await wait_until(lambda: memory.load(byte, 1) == mask)
            assert memory.load(NET_SUMMARY, 1) == 0x01
        finally:
            kill_quietly(child)
    finally:
        os.close(efd)
        os.close(go_read)
        os.close(go_write)
    stats = await client.execute("query-stats")
    assert stats["eventfd-signals"] == writes
    (source,) = stats["eventfds"]
    assert source["signals"] == writes
    # Each read is one notification, however many writes it coalesced.
    assert stats["notifications"] == stats["applied"] == source["reads"]
    assert 1 <= source["reads"] <= writes


# --------------------------------------------------------- many clients


async def test_50_concurrent_clients(service: Service) -> None:
    clients, rounds = 50, 20
    rng = random.Random(7)
    # Half the commands list several vectors of net0, half name one vector of pci0.
    plans: list[list[tuple[str, Any]]] = [
        [
            ("net0", rng.sample(range(64), rng.randint(1, 4)))
            if rng.random() < 0.5
            else ("pci0", rng.randrange(32))
            for _ in range(rounds)
        ]
        for _ in range(clients)
    ]

    async def run(plan: list[tuple[str, Any]]) -> list[Any]:
        async with qmp_client(service.socket_path) as client:
            return [
                await client.execute("notify", {"device": device, "vector": vector})
                for device, vector in plan
            ]

    replies = await asyncio.wait_for(asyncio.gather(*(run(p) for p in plans)), 30.0)
    expected_total = 0
    for plan, answers in zip(plans, replies, strict=True):
        for (_, vector), answer in zip(plan, answers, strict=True):
            count = len(vector) if isinstance(vector, list) else 1
            assert answer == {"applied": count}
            expected_total += count
    memory = memory_of(service)
    net_wanted = {v for plan in plans for d, vs in plan if d == "net0" for v in vs}
    pci_wanted = {v for plan in plans for d, v in plan if d == "pci0"}
    assert {n for n in range(64) if is_set(memory, NET_DSCI, n)} == net_wanted
    assert {n for n in range(32) if is_set(memory, PCI_AIBV, n)} == pci_wanted
    stats = service.describe_stats()
    assert stats["notifications"] == stats["applied"] == expected_total
    assert stats["pending"] == 0


# ----------------------------------------------------- bad input on the wire


async def test_malformed_input_is_answered_while_a_client_is_served(service: Service) -> None:
    async with qmp_client(service.socket_path) as client:
        served = 0

        async def keep_notifying() -> None:
            nonlocal served
            while True:
                vector = served % 64
                reply = await client.execute("notify", {"device": "net0", "vector": vector})
                assert reply == {"applied": 1}
                served += 1

        worker = asyncio.create_task(keep_notifying())
        try:
            raw = await RawClient.connect(service.socket_path)
            raw.send(b'{"execute": "notify", "arguments": {"device": "net0", "vector": 1,}}\n')
            reply = await raw.reply()
            assert reply["error"]["class"] == "GenericError"
            assert "JSON parse error" in reply["error"]["desc"]
            # The stream resynchronises after invalid JSON.
            raw.send(b"{'execute': 'quit'}\n")
            assert "JSON parse error" in (await raw.reply())["error"]["desc"]
            raw.send(b"[1, 2]\n")
            assert "must be a JSON object" in (await raw.reply())["error"]["desc"]
            reply = await raw.execute("frobnicate", id=7)
            assert reply == {
                "error": {
                    "class": "CommandNotFound",
                    "desc": "The command frobnicate has not been found",
                },
                "id": 7,
            }
            reply = await raw.execute("notify", arguments={"device": "net0", "vector": 1}, id="x")
            assert reply == {"return": {"applied": 1}, "id": "x"}
            # Oversized: answered, then that connection (only) is closed.
            raw.send(b'{"execute": "notify", "arguments": {"device": "' + b"n" * 70_000 + b'"}}')
            reply = await raw.reply()
            assert "exceeds the limit of 65536 bytes" in reply["error"]["desc"]
            assert await raw.at_eof()
            await raw.close()
            before = served
            await wait_until(lambda: served >= before + 10)
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        assert await client.execute("notify", {"device": "net0", "vector": 0}) == {"applied": 1}
    assert service.describe_stats()["failures"] == {}


async def test_events_never_precede_the_capabilities_reply(service: Service) -> None:
    """While events flow, a new client still gets the qmp_capabilities reply first."""
    assert service.server is not None
    server = service.server
    flooding = True

    async def flood() -> None:
        while flooding:
            server.broadcast_event("TEST_FLOOD", {})
            await asyncio.sleep(0)

    flooder = asyncio.create_task(flood())
    try:
        for _ in range(10):
            raw = await RawClient.connect(service.socket_path, negotiate=False)
            raw.send(b'{"execute": "qmp_capabilities", "id": 1}\n')
            assert await raw.recv() == {"return": {}, "id": 1}
            assert (await raw.recv())["event"] == "TEST_FLOOD"  # and events follow
            await raw.close()
        for _ in range(10):  # qemu.qmp fails its negotiation on an early event
            async with qmp_client(service.socket_path) as client:
                assert await client.execute("notify", {"device": "net0", "vector": 0}) == {
                    "applied": 1
                }
    finally:
        flooding = False
        await flooder


async def test_a_client_that_hangs_up_mid_command_does_not_hurt(service: Service) -> None:
    raw = await RawClient.connect(service.socket_path)
    raw.send(b'{"execute": "notify", "arguments": {"device": "net0", "vector": 4}}\n')
    await raw.close()
    await wait_until(lambda: is_set(memory_of(service), NET_DSCI, 4))
    async with qmp_client(service.socket_path) as client:
        assert await client.execute("notify", {"device": "net0", "vector": 5}) == {"applied": 1}


# ------------------------------------------------------- socket and peers


async def test_control_socket_mode_is_0600(service: Service) -> None:
    st = os.stat(service.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


async def test_configured_socket_mode(tmp_path: Path) -> None:
    service = await start_service(tmp_path, control={"mode": 0o660})
    try:
        assert stat.S_IMODE(os.stat(service.socket_path).st_mode) == 0o660
    finally:
        await service.stop()
    assert not os.path.exists(service.socket_path)


async def test_a_peer_outside_allowed_uids_is_refused(tmp_path: Path) -> None:
    uid = os.getuid()
    service = await start_service(tmp_path, control={"allowed_uids": [uid + 4242]})
    try:
        raw_reader, raw_writer = await asyncio.open_unix_connection(service.socket_path)
        line = await asyncio.wait_for(raw_reader.readline(), TIMEOUT)
        assert b"QMP" not in line
        assert f"Permission denied for uid {uid}".encode() in line
        assert await asyncio.wait_for(raw_reader.read(), TIMEOUT) == b""
        raw_writer.close()
        with pytest.raises(ConnectError):
            async with qmp_client(service.socket_path):
                pass
        assert service.describe_stats()["notifications"] == 0
    finally:
        await service.stop()


async def test_allowed_gids_admit_a_peer(tmp_path: Path) -> None:
    service = await start_service(
        tmp_path, control={"allowed_uids": [os.getuid() + 4242], "allowed_gids": [os.getgid()]}
    )
    try:
        async with qmp_client(service.socket_path) as client:
            assert await client.execute("notify", {"device": "net0", "vector": 0}) == {"applied": 1}
    finally:
        await service.stop()


# ---------------------------------------------------------- the VMM link


async def test_unreachable_vmm_holds_notifications_and_stop_applies_them(
    tmp_path: Path,
) -> None:
    """No QEMU yet: notifications are held (not failed); a stop applies what was accepted."""
    vmm = {"qmp_socket": str(tmp_path / "no-qemu.sock")}
    service = await start_service(tmp_path, vmm=vmm)
    stopped = False
    try:
        async with qmp_client(service.socket_path) as client:
            stats = await client.execute("query-stats")
            assert (stats["holds"], stats["paused"], stats["vmm"]) == (
                ["disconnected"],
                True,
                "disconnected",
            )
            pending = asyncio.create_task(client.execute("notify", {"device": "net0", "vector": 6}))
            await wait_until(lambda: service.engine.pending == 1)
            assert not is_set(memory_of(service), NET_DSCI, 6)
            memory = memory_of(service)
            stopping = asyncio.create_task(service.stop(grace=2.0))
            assert await asyncio.wait_for(pending, TIMEOUT) == {"applied": 1}
            # Checked before the backend is closed by the stop.
            assert is_set(memory, NET_DSCI, 6)
            await stopping
            stopped = True
    finally:
        if not stopped:
            await service.stop()


async def test_the_vmm_link_logs_once_per_state_change_naming_the_socket(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    qmp = tmp_path / "qemu" / "qmp.sock"
    qmp.parent.mkdir()
    vmm = {"qmp_socket": str(qmp), "reconnect_backoff_cap": 0.01}
    service = await start_service(tmp_path, vmm=vmm)

    def lines(level: int, text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == level
                and text in r.getMessage()]  # fmt: skip

    try:
        # Many attempts, one line above debug level.
        await wait_until(lambda: len(lines(logging.DEBUG, "is unreachable")) >= 20)
        assert lines(logging.WARNING, "is unreachable") == [
            f"QEMU's QMP socket {qmp} is unreachable ([Errno 2] No such file or directory); "
            "retrying every 0.01 s at most"
        ]
        with FakeQemu(qmp.parent, size=MEMORY):
            await wait_until(lambda: service.vmm is not None and service.vmm.status == "running")
            assert lines(logging.INFO, "connected to QEMU") == [
                f"connected to QEMU at {qmp} (running)"
            ]
        await wait_until(lambda: len(lines(logging.WARNING, "is unreachable")) == 2)
        assert len(lines(logging.WARNING, f"QMP link to {qmp} lost")) == 1
    finally:
        await service.stop(grace=1.0)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "nothing at ERROR"


# -------------------------------------------------------- quit and signals


async def test_quit_stops_the_service(tmp_path: Path) -> None:
    service = Service(parse_config(daemon_config(tmp_path / "control.sock"), "<test>"))
    running = asyncio.create_task(service.run(no_new_privs=False))
    await wait_until(lambda: os.path.exists(service.socket_path))
    async with qmp_client(service.socket_path) as client:
        assert await client.execute("notify", {"device": "net0", "vector": 0}) == {"applied": 1}
        assert await client.execute("quit") == {}
        await asyncio.wait_for(running, TIMEOUT)
    assert not os.path.exists(service.socket_path)
    assert service.wiring is None


async def _notify_until_refused(
    path: str, seed: int, acknowledged: list[tuple[str, int]], started: asyncio.Event
) -> None:
    rng = random.Random(seed)
    devices = [("net0", 64), ("pci0", 32), ("route0", 4)]
    async with qmp_client(path, f"load{seed}") as client:
        started.set()
        with contextlib.suppress(QMPError, OSError, EOFError):  # the daemon went away
            while True:
                device, count = rng.choice(devices)
                vectors = [rng.randrange(count) for _ in range(rng.randint(1, 3))]
                await client.execute("notify", {"device": device, "vector": vectors})
                acknowledged.extend((device, v) for v in vectors)


async def test_sigterm_under_load_keeps_every_acknowledged_bit(tmp_path: Path) -> None:
    ram = tmp_path / "guest.ram"
    raw = daemon_config(tmp_path / "control.sock", ram=ram)
    acknowledged: list[tuple[str, int]] = []
    with running_daemon(tmp_path, raw) as daemon:
        starts = [asyncio.Event() for _ in range(6)]
        clients = [
            asyncio.create_task(_notify_until_refused(daemon.socket, i, acknowledged, started))
            for i, started in enumerate(starts)
        ]
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in starts)), TIMEOUT)
        await wait_until(lambda: len(acknowledged) >= 2000, timeout=20.0)
        daemon.signal(signal.SIGTERM)
        # A second SIGTERM while draining (a hook's stop after a manager's) must not kill
        # the drain: the exit stays clean.
        await wait_until(lambda: "stopping (SIGTERM)" in daemon.logs())
        with contextlib.suppress(ProcessLookupError):
            daemon.signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*clients), TIMEOUT)
        assert await asyncio.to_thread(daemon.wait) == 0, daemon.logs()
        assert "stopping (SIGTERM)" in daemon.logs()
    assert not os.path.exists(raw["control"]["socket"])
    places = {"net0": NET_DSCI, "pci0": PCI_AIBV, "route0": ROUTE_IND}
    with GuestMemory(MEMORY, str(ram)) as memory:
        missing = sorted({(d, v) for d, v in acknowledged if not is_set(memory, places[d], v)})
        assert missing == []
        assert memory.load(NET_SUMMARY, 1) == 0x01
        assert memory.load(PCI_SUMMARY, 1) == 0x80
        assert memory.load(ROUTE_SUMMARY, 1) == 0x80


async def test_sighup_reloads_safe_changes_and_refuses_backend_changes(tmp_path: Path) -> None:
    raw = daemon_config(tmp_path / "control.sock")
    with running_daemon(tmp_path, raw) as daemon:
        async with qmp_client(daemon.socket) as client:
            assert await client.execute("notify", {"device": "net0", "vector": 1}) == {"applied": 1}
            unknown = await expect_error(client, "notify", {"device": "net1", "vector": 0})
            assert "unknown device 'net1'" in unknown

            # A new retry policy and a new device: reloaded.
            net1 = {**raw["devices"][0], "name": "net1", "device_indicator": NET_DSCI + 0x40}
            reloaded = {
                **raw,
                "retry": {"max_no_xchg_rounds": 50, "eagain_attempts": 4},
                "devices": [*raw["devices"], net1],
            }
            write_config(daemon.config, reloaded)
            daemon.signal(signal.SIGHUP)
            await wait_until(lambda: "config reloaded: 5 devices" in daemon.logs())
            added = "reload: device 'net1' added at dsci 0x10140/0x80..0x10147/0x01 (64 vectors)"
            assert added in daemon.logs()
            assert await client.execute("notify", {"device": "net1", "vector": 0}) == {"applied": 1}

            # A different backend: refused, the running config stays.
            refused = {
                **reloaded,
                "backend": {**raw["backend"], "memory_size": 2 * MEMORY},
                "devices": raw["devices"],
            }
            write_config(daemon.config, refused)
            daemon.signal(signal.SIGHUP)
            await wait_until(lambda: "config reload refused" in daemon.logs())
            assert "the [backend] section changed" in daemon.logs()
            assert await client.execute("notify", {"device": "net1", "vector": 1}) == {"applied": 1}
            stats = await client.execute("query-stats")
            assert stats["notifications"] == stats["applied"] == 3

            # A broken file: refused as well, naming the problem.
            daemon.config.write_text("[backend\n")
            daemon.signal(signal.SIGHUP)
            await wait_until(lambda: daemon.logs().count("config reload refused") == 2)
            assert await client.execute("notify", {"device": "net0", "vector": 2}) == {"applied": 1}

            assert await client.execute("quit") == {}
        assert await asyncio.to_thread(daemon.wait) == 0, daemon.logs()
    assert "stopping (quit command)" in daemon.logs()
    assert not os.path.exists(daemon.socket)


async def test_reload_logs_each_device_added_removed_or_moved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = daemon_config(tmp_path / "control.sock")
    path = write_config(tmp_path / "daemon.toml", raw)
    service = Service(parse_config(raw, "<test>"), config_path=str(path))
    await service.start()
    try:
        caplog.set_level(logging.INFO, logger="indicators")
        route0 = {**raw["devices"][2], "ind_addr": ROUTE_IND + 0x100}
        moved = [raw["devices"][0], route0, raw["devices"][3]]  # pci0 removed
        write_config(path, {**raw, "devices": moved})
        assert service.reload() == "reloaded"
    finally:
        await service.stop(grace=1.0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reload: ")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("reload: device 'pci0' removed from dsci 0x10200/0x80..")
    assert lines[1].startswith(
        "reload: device 'route0' moved from dsci 0x10300/0x80..0x10300/0x10 (4 vectors)"
    )
    assert "to dsci 0x10400/0x80..0x10400/0x10 (4 vectors)" in lines[1]


def test_a_failure_is_located_where_the_engine_says() -> None:
    """Once the engine names the step (dsci or summary) and errno, reply and event carry them."""
    error = NotifyError("net0", 3, "4", "program exception 4 (protection)",
                        gaddr=0x10000, size=1, key=5)  # fmt: skip
    error.where = "summary"  # type: ignore[attr-defined]
    error.errno = None  # type: ignore[attr-defined]
    batch = FailureBatch()
    batch.add(error)
    data = batch.summary()
    assert (data["where"], data["gaddr"], data["size"], data["key"]) == ("summary", 0x10000, 1, 5)
    assert (data["device"], data["vector"], data["code"], data["count"]) == ("net0", 3, "4", 1)
    reply = failure_message("net0", 2, [error])
    assert reply == (
        "device 'net0': 1 of 2 applied, 1 failed (code 4: 1); vector 3: program exception 4 "
        "(protection) (code 4) on the summary at gaddr 0x10000 size 1 key 5"
    )
