"""The QMP server against real unix sockets, real ``qemu.qmp.QMPClient`` clients and raw bytes."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import RawClient, qmp_client, wait_until
from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, StateError

from indicators.daemon.qmp_server import (
    PeerCredentials,
    QmpArgs,
    QmpCommandError,
    QmpServer,
    QmpSession,
)
from indicators.daemon.qmp_wire import FramingError, JsonFramer

VERSION = (9, 1, 2)
TIMEOUT = 5.0


class EchoArgs(QmpArgs):
    text: str
    count: int = 1


class SleepArgs(QmpArgs):
    seconds: float


class FdArgs(QmpArgs):
    fdname: str
    value: int


class BigArgs(QmpArgs):
    size: int


class Probe:
    """What the registered commands saw: concurrency, completions, sessions."""

    def __init__(self) -> None:
        self.running = 0
        self.max_running = 0
        self.finished = 0
        self.cancelled = 0
        self.big_replies = 0
        self.sessions: list[QmpSession] = []


def register_commands(server: QmpServer, probe: Probe) -> None:
    async def echo(args: EchoArgs, session: QmpSession) -> object:
        probe.sessions.append(session)
        return {"text": args.text * args.count}

    async def sleep(args: SleepArgs, session: QmpSession) -> object:
        probe.running += 1
        probe.max_running = max(probe.max_running, probe.running)
        try:
            await asyncio.sleep(args.seconds)
            probe.finished += 1
        except asyncio.CancelledError:
            probe.cancelled += 1
            raise
        finally:
            probe.running -= 1
        return {}

    async def signal_fd(args: FdArgs, session: QmpSession) -> object:
        fd = session.take_fd(args.fdname)
        try:
            os.eventfd_write(fd, args.value)
        finally:
            os.close(fd)
        return None

    async def big(args: BigArgs, session: QmpSession) -> object:
        probe.big_replies += 1
        return "x" * args.size

    async def notify_me(args: None, session: QmpSession) -> object:
        return session.send_event("NOTIFIED", {"number": session.number})

    async def bye(args: None, session: QmpSession) -> object:
        session.close()
        return {"bye": True}

    async def fail(args: None, session: QmpSession) -> object:
        raise QmpCommandError("it failed on purpose", "DeviceNotFound")

    async def crash(args: None, session: QmpSession) -> object:
        raise RuntimeError("bug")

    async def abandoned(args: None, session: QmpSession) -> object:
        waited: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waited.cancel()
        await waited
        return None

    server.register("echo", echo, EchoArgs, returns="{'text': str}")
    server.register("sleep", sleep, SleepArgs)
    server.register("signal-fd", signal_fd, FdArgs)
    server.register("big", big, BigArgs)
    server.register("notify-me", notify_me)
    server.register("bye", bye)
    server.register("fail", fail)
    server.register("crash", crash)
    server.register("abandoned", abandoned)


def make_server(tmp_path: Path, probe: Probe, **options: Any) -> QmpServer:
    server = QmpServer(str(tmp_path / "qmp.sock"), version=VERSION, package="test", **options)
    register_commands(server, probe)
    return server


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def server(tmp_path: Path, probe: Probe) -> AsyncIterator[QmpServer]:
    server = make_server(tmp_path, probe)
    await server.start()
    yield server
    await server.stop()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- greeting, negotiation, built-ins ------------------------------------------------


async def test_greeting_is_qemus(server: QmpServer) -> None:
    raw = RawClient(*await asyncio.open_unix_connection(server.path))
    assert await raw.recv() == {
        "QMP": {
            "version": {"qemu": {"micro": 2, "minor": 1, "major": 9}, "package": "test"},
            "capabilities": [],
        }
    }
    await raw.close()


async def test_qmpclient_negotiates_and_queries(server: QmpServer) -> None:
    async with qmp_client(server.path) as client:
        assert client.greeting is not None
        assert await client.execute("query-version") == {
            "qemu": {"micro": 2, "minor": 1, "major": 9},
            "package": "test",
        }
        commands = await client.execute("query-commands")
        assert isinstance(commands, list)
        names = {entry["name"] for entry in commands}
        assert names == {
            "qmp_capabilities", "query-commands", "query-version", "getfd", "closefd",
            "echo", "sleep", "signal-fd", "big", "notify-me", "bye", "fail", "crash", "abandoned",
        }  # fmt: skip


async def test_commands_before_negotiation_are_refused(server: QmpServer) -> None:
    async with qmp_client(server.path, negotiate=False) as client:
        with pytest.raises(ExecuteError) as refused:
            await client.execute("query-commands")
        assert refused.value.error_class == "CommandNotFound"
        assert str(refused.value) == "Expecting capabilities negotiation with 'qmp_capabilities'"
        assert await client.execute("qmp_capabilities") == {}
        with pytest.raises(ExecuteError) as again:
            await client.execute("qmp_capabilities")
        assert again.value.error_class == "CommandNotFound"
        assert "already complete" in str(again.value)


async def test_unknown_capability_is_refused(server: QmpServer) -> None:
    async with qmp_client(server.path, negotiate=False) as client:
        with pytest.raises(ExecuteError, match="Capability 'oob' not available"):
            await client.execute("qmp_capabilities", {"enable": ["oob"]})


# -- registered commands and argument validation ---------------------------------------


async def test_echo_with_pydantic_arguments(server: QmpServer, probe: Probe) -> None:
    async with qmp_client(server.path) as client:
        assert await client.execute("echo", {"text": "ab", "count": 3}) == {"text": "ababab"}
    session = probe.sessions[0]
    assert session.credentials == PeerCredentials(os.getpid(), os.getuid(), os.getgid())


@pytest.mark.parametrize(
    ("command", "arguments", "desc"),
    [
        (
            "echo",
            {"text": 5},
            "Invalid parameter 'text': Input should be a valid string (got an integer 5)",
        ),
        (
            "echo",
            {"text": "a", "count": "2"},
            "Invalid parameter 'count': Input should be a valid integer (got a string \"2\")",
        ),
        ("echo", {"text": "a", "bogus": 1}, "Parameter 'bogus' is unexpected"),
        ("echo", {}, "Parameter 'text' is missing"),
        ("query-version", {"verbose": True}, "Parameter 'verbose' is unexpected"),
        ("getfd", {"fdname": "x"}, "No file descriptor supplied via SCM_RIGHTS"),
        ("closefd", {"fdname": "x"}, "File descriptor named 'x' not found"),
        ("crash", {}, "Internal error in command 'crash'"),
        ("abandoned", {}, "Command 'abandoned' was cancelled"),
    ],
)
async def test_bad_arguments_are_generic_errors_naming_the_field(
    server: QmpServer, command: str, arguments: dict[str, object], desc: str
) -> None:
    async with qmp_client(server.path) as client:
        with pytest.raises(ExecuteError) as failed:
            await client.execute(command, arguments)
        assert failed.value.error_class == "GenericError"
        assert str(failed.value) == desc


@pytest.mark.parametrize(
    ("command", "error_class", "desc"),
    [
        ("no-such-command", "CommandNotFound", "The command no-such-command has not been found"),
        ("fail", "DeviceNotFound", "it failed on purpose"),
    ],
)
async def test_command_errors_keep_their_class(
    server: QmpServer, command: str, error_class: str, desc: str
) -> None:
    async with qmp_client(server.path) as client:
        with pytest.raises(ExecuteError) as failed:
            await client.execute(command)
        assert (failed.value.error_class, str(failed.value)) == (error_class, desc)


# -- malformed input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "desc"),
    [
        (b'{"execute": }\n', "JSON parse error, Expecting value"),
        (b"nonsense\n", "JSON parse error, Expecting value"),
        (b'{"a": 1, "a": 2}\n', "JSON parse error, duplicate key 'a'"),
        (b"[1, 2]\n", "QMP input must be a JSON object"),
        (b"42\n", "QMP input must be a JSON object"),
        (b'{"exec": "echo"}\n', "QMP input member 'exec' is unexpected"),
        (b'{"arguments": {}}\n', "QMP input lacks member 'execute'"),
        (b'{"execute": 1}\n', "QMP input member 'execute' must be a string"),
        (
            b'{"execute": "echo", "arguments": []}\n',
            "QMP input member 'arguments' must be an object",
        ),
    ],
)
async def test_malformed_input_is_answered_and_others_keep_working(
    server: QmpServer, data: bytes, desc: str
) -> None:
    async with qmp_client(server.path) as client:
        raw = await RawClient.connect(server.path)
        raw.send(data)
        reply = await raw.recv()
        assert reply["error"]["class"] == "GenericError"
        assert reply["error"]["desc"] == desc
        # The stream resynchronises after the bad value.
        ok = await raw.execute("echo", arguments={"text": "ok"}, id=7)
        assert ok == {"return": {"text": "ok"}, "id": 7}
        assert await client.execute("echo", {"text": "still"}) == {"text": "still"}
        await raw.close()


async def test_oversized_message_closes_only_that_connection(server: QmpServer) -> None:
    async with qmp_client(server.path) as client:
        raw = await RawClient.connect(server.path)
        raw.send(b'{"execute": "echo", "arguments": {"text": "' + b"a" * 70_000 + b'"}}\n')
        reply = await raw.recv()
        assert reply["error"]["class"] == "GenericError"
        assert "exceeds the limit of 65536 bytes" in reply["error"]["desc"]
        assert await raw.at_eof()
        assert await client.execute("echo", {"text": "fine"}) == {"text": "fine"}
        await raw.close()


async def test_objects_need_no_newlines_and_may_arrive_in_pieces(server: QmpServer) -> None:
    raw = await RawClient.connect(server.path)
    raw.send(b'{"execute":"echo","arguments":{"text":"a"},"id":1}{"execute":"echo",')
    await asyncio.sleep(0.05)
    for byte in b'"arguments":{"text":"\xc3\xa9"},"id":"two"}  \t':
        raw.send(bytes([byte]))
        await raw.writer.drain()
    assert await raw.recv() == {"return": {"text": "a"}, "id": 1}
    assert await raw.recv() == {"return": {"text": "\u00e9"}, "id": "two"}
    await raw.close()


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b'{"a": "}{"}', b" "], [{"a": "}{"}]),
        ([b'{"a": "\\"}"}'], [{"a": '"}'}]),
        ([b'"str"', b"true "], ["str", True]),
        ([b"}"], ["error"]),
        ([b"[" * 65], ["fatal"]),
        ([b"[", b"1" * 70_000], ["fatal"]),
    ],
)
def test_framer_tracks_strings_and_brackets(chunks: list[bytes], expected: list[object]) -> None:
    framer = JsonFramer(max_message=65536)
    frames = [frame for chunk in chunks for frame in framer.feed(chunk)]
    kinds = [
        "fatal" if isinstance(f, FramingError) else "error" if isinstance(f, QmpCommandError) else f
        for f in frames
    ]
    assert kinds == expected


# -- ordering, concurrency, flow control -------------------------------------------------


async def test_replies_keep_request_order_while_handlers_overlap(
    server: QmpServer, probe: Probe
) -> None:
    raw = await RawClient.connect(server.path)
    raw.send(
        b'{"execute": "sleep", "arguments": {"seconds": 0.3}, "id": "slow"}\n'
        b'{"execute": "sleep", "arguments": {"seconds": 0.1}, "id": "fast"}\n'
        b'{"execute": "echo", "arguments": {"text": "x"}, "id": "instant"}\n'
    )
    ids = [(await raw.recv())["id"] for _ in range(3)]
    assert ids == ["slow", "fast", "instant"]
    assert probe.max_running >= 2, "the handlers ran one after the other"
    await raw.close()


async def test_max_pending_bounds_handlers_per_client(tmp_path: Path, probe: Probe) -> None:
    async with (
        make_server(tmp_path, probe, max_pending=3) as server,
        qmp_client(server.path) as client,
    ):
        await asyncio.gather(*(client.execute("sleep", {"seconds": 0.05}) for _ in range(12)))
    assert probe.max_running == 3
    assert probe.finished == 12


async def test_max_rate_throttles_one_client_not_the_others(tmp_path: Path, probe: Probe) -> None:
    async with (
        make_server(tmp_path, probe, max_rate=40.0) as server,
        qmp_client(server.path) as greedy,
        qmp_client(server.path) as other,
    ):
        answered = 0

        async def one() -> None:
            nonlocal answered
            await greedy.execute("query-version")
            answered += 1

        # 40 requests of burst, then 40 per second: the greedy client is throttled
        flood = asyncio.gather(*(one() for _ in range(80)))
        await wait_until(lambda: answered >= 40)
        await other.execute("query-version")
        greedy_when_other_done = answered
        await flood
    # ordering, not time: the other client was answered while the greedy one waited
    assert greedy_when_other_done < 80, "the other client is held behind the greedy one"


async def test_fifty_clients_twenty_commands_each(server: QmpServer) -> None:
    async def one_client(number: int) -> list[object]:
        async with qmp_client(server.path) as client:
            return await asyncio.gather(
                *(client.execute("echo", {"text": f"{number}:{i}"}) for i in range(20))
            )

    results = await asyncio.wait_for(asyncio.gather(*(one_client(n) for n in range(50))), 15)
    assert results == [[{"text": f"{n}:{i}"} for i in range(20)] for n in range(50)]


async def test_client_that_does_not_read_replies_does_not_block_others(
    tmp_path: Path, probe: Probe
) -> None:
    async with make_server(tmp_path, probe, max_queued=128 * 1024) as server:
        slow = await RawClient.connect(server.path, limit=1 << 16)
        request = b'{"execute": "big", "arguments": {"size": 16384}}\n'
        slow.send(request * 400)  # 6.5 MB of replies it never reads
        await asyncio.sleep(0.2)
        async with qmp_client(server.path) as client:
            for i in range(20):  # answered while the other's replies back up
                reply = await asyncio.wait_for(client.execute("echo", {"text": str(i)}), 30)
                assert reply == {"text": str(i)}
        await wait_until(lambda: len(server.sessions) == 1)
        assert server.sessions[0].number == 0  # throttled, not dropped
        assert probe.big_replies < 100  # it stopped being read once its output backed up
        await slow.close()
        await wait_until(lambda: not server.sessions)


async def test_client_that_does_not_read_events_is_dropped(tmp_path: Path, probe: Probe) -> None:
    async with make_server(tmp_path, probe, max_queued=64 * 1024) as server:
        slow = await RawClient.connect(server.path)
        async with qmp_client(server.path) as client:
            await wait_until(lambda: len(server.sessions) == 2)
            first = server.sessions[0]
            payload = {"blob": "e" * 4096}
            for _ in range(2000):
                server.broadcast_event("BLOB", payload)
                await asyncio.sleep(0.001)
                if first not in server.sessions:
                    break
            assert server.sessions == (server.sessions[0],) and first not in server.sessions
            assert await client.execute("echo", {"text": "alive"}) == {"text": "alive"}
            assert len(client.events.clear()) > 0
        await slow.close()


async def test_client_disconnecting_mid_request_is_cleaned_up(
    server: QmpServer, probe: Probe
) -> None:
    fds_before = open_fds()
    raw = await RawClient.connect(server.path)
    raw.send(b'{"execute": "sleep", "arguments": {"seconds": 0.2}, "id": 1}\n')
    await wait_until(lambda: probe.running == 1)
    await raw.close()
    await wait_until(lambda: not server.sessions)
    assert (probe.finished, probe.cancelled) == (1, 0)  # ran to completion
    assert open_fds() == fds_before
    async with qmp_client(server.path) as client:
        assert await client.execute("echo", {"text": "next"}) == {"text": "next"}


# -- fd passing ------------------------------------------------------------------------------


async def test_getfd_hands_a_passed_eventfd_to_a_handler(server: QmpServer) -> None:
    efd = os.eventfd(0)
    try:
        async with qmp_client(server.path) as client:
            client.send_fd_scm(efd)
            assert await client.execute("getfd", {"fdname": "doorbell"}) == {}
            assert await client.execute("signal-fd", {"fdname": "doorbell", "value": 5}) is not None
            assert os.eventfd_read(efd) == 5
            with pytest.raises(ExecuteError, match="File descriptor named 'doorbell' not found"):
                await client.execute("signal-fd", {"fdname": "doorbell", "value": 1})
    finally:
        os.close(efd)


async def test_fds_are_replaced_closed_and_never_leaked(server: QmpServer) -> None:
    fds_before = open_fds()
    first, second, third = os.eventfd(0), os.eventfd(0), os.eventfd(0)
    try:
        async with qmp_client(server.path) as client:
            for efd in (first, second):
                client.send_fd_scm(efd)
                await client.execute("getfd", {"fdname": "door"})
            await client.execute("signal-fd", {"fdname": "door", "value": 2})
            assert os.eventfd_read(second) == 2  # the later getfd replaced the first fd
            client.send_fd_scm(first)
            with pytest.raises(ExecuteError, match="not starting with a digit"):
                await client.execute("getfd", {"fdname": "1door"})
            client.send_fd_scm(third)
            await client.execute("getfd", {"fdname": "kept"})
            client.send_fd_scm(third)  # passed, never claimed
            await client.execute("closefd", {"fdname": "kept"})
            client.send_fd_scm(third)
            await client.execute("getfd", {"fdname": "left-open"})
        await wait_until(lambda: not server.sessions)
    finally:
        for efd in (first, second, third):
            os.close(efd)
    assert open_fds() == fds_before


# -- events ----------------------------------------------------------------------------------


async def test_broadcast_event_reaches_negotiated_listeners(server: QmpServer) -> None:
    async with qmp_client(server.path) as a, qmp_client(server.path) as b:
        unnegotiated = await RawClient.connect(server.path, negotiate=False)
        await wait_until(lambda: len(server.sessions) == 3)
        with a.listener("HELLO") as listener:
            before = time.time()
            assert server.broadcast_event("HELLO", {"n": 1}) == 2
            event = await asyncio.wait_for(listener.get(), TIMEOUT)
        assert event["event"] == "HELLO" and event["data"] == {"n": 1}
        stamp = event["timestamp"]
        assert isinstance(stamp, dict)
        assert abs(stamp["seconds"] + stamp["microseconds"] / 1e6 - before) < 1.0
        with b.listener("NOTIFIED") as listener:
            assert await b.execute("notify-me") is True
            event = await asyncio.wait_for(listener.get(), TIMEOUT)
        assert event["data"] == {"number": 1}
        await unnegotiated.close()


async def test_handler_closing_its_session_still_replies(server: QmpServer) -> None:
    raw = await RawClient.connect(server.path)
    assert await raw.execute("bye", id="last") == {"return": {"bye": True}, "id": "last"}
    assert await raw.at_eof()
    await raw.close()
    await wait_until(lambda: not server.sessions)


# -- socket file, credentials, lifetime -----------------------------------------------


async def test_socket_file_is_mode_0600(server: QmpServer) -> None:
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


async def test_peer_credentials_decide_admission(tmp_path: Path, probe: Probe) -> None:
    seen: list[PeerCredentials] = []

    def nobody(credentials: PeerCredentials) -> bool:
        seen.append(credentials)
        return False

    async with make_server(tmp_path, probe, allowed=nobody) as server:
        with pytest.raises(ConnectError):
            async with qmp_client(server.path):
                pass
        assert seen == [PeerCredentials(os.getpid(), os.getuid(), os.getgid())]
        raw = RawClient(*await asyncio.open_unix_connection(server.path))
        assert (await raw.recv())["error"]["desc"] == f"Permission denied for uid {os.getuid()}"
        assert await raw.at_eof()
        await raw.close()


async def test_stale_socket_is_replaced_and_other_files_refused(
    tmp_path: Path, probe: Probe
) -> None:
    path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # bound, never listening: a crashed server's leftover
    async with make_server(tmp_path, probe) as server, qmp_client(server.path) as client:
        assert await client.execute("echo", {"text": "new"}) == {"text": "new"}
        with pytest.raises(OSError, match="another server is listening"):
            await make_server(tmp_path, probe).start()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        await make_server(tmp_path, probe).start()


async def test_stop_finishes_in_flight_replies_and_disconnects(
    server: QmpServer, probe: Probe
) -> None:
    async with qmp_client(server.path) as idle, qmp_client(server.path) as busy:
        in_flight = asyncio.ensure_future(busy.execute("sleep", {"seconds": 0.2}))
        await wait_until(lambda: probe.running == 1)
        await server.stop(grace=2.0)
        assert await in_flight == {}
        assert not server.sessions
        assert not os.path.exists(server.path)
        for client in (idle, busy):
            with pytest.raises((ExecInterruptedError, StateError)):
                await client.execute("query-version")


async def test_stop_cancels_handlers_that_outlive_the_grace(
    server: QmpServer, probe: Probe
) -> None:
    async with qmp_client(server.path) as client:
        in_flight = asyncio.ensure_future(client.execute("sleep", {"seconds": 30}))
        await wait_until(lambda: probe.running == 1)
        # the handler sleeps 30 s: a stop that waited for it would end this timeout
        await asyncio.wait_for(server.stop(grace=0.1), 20)
        with pytest.raises(ExecInterruptedError):
            await in_flight
    assert probe.cancelled == 1
