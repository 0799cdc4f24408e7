"""Attackers for the test_attack_* files: a fake QEMU and clients under other uids.

Everything is real: the fake QEMU is a separate process (optionally under
another uid with ``setpriv``) serving QMP on a unix socket and holding its
own RAM file mapped shared, as QEMU does; a foreign client is a separate
process under another uid speaking QMP on the daemon's socket.  Both are
small stdlib scripts run by the system's python3, so any uid can run them.

    with FakeQemu(world, uid=NOBODY, mem_path=str(link)) as qemu:
        ...   # qemu.socket is its QMP socket, qemu.ram its own RAM file
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import daemon_config

from indicators.config import parse_config
from indicators.daemon.service import Service

NOBODY = 65534
STRANGER = 65533  # a second unprivileged uid (no passwd entry needed)
TIMEOUT = 20.0
PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable

# The fake QEMU: QMP greeting and negotiation, query-status, query-memdev,
# qom-get mem-path (answering whatever name it is told to), dump-skeys (doing
# what it is told to the file), its own RAM file created and mapped shared.
_FAKE_QEMU = r'''
import json, mmap, os, socket, sys
sock_path, ram, size, mem_path, skeys, count_file = sys.argv[1:7]
size = int(size)
fd = os.open(ram, os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, size)
ram_map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(sock_path)
server.listen(8)
print("ready", flush=True)

def dump(filename):
    with open(count_file, "a") as count:
        count.write("dump\n")
    mode, _, target = skeys.partition(":")
    if mode == "write":
        with open(filename, "w") as out:
            out.write("page=010: key(48) => ACC=3, FP=0, REF=0, ch=0, reserved=0\n")
        return {"return": {}}
    if mode == "error":
        return {"error": {"class": "GenericError", "desc": "this guest is not using storage keys"}}
    if mode == "fail":
        return {"error": {"class": "GenericError", "desc": "dump failed on purpose"}}
    try:
        os.unlink(filename)
    except OSError:
        pass
    if mode == "symlink":
        os.symlink(target, filename)
    elif mode == "fifo":
        os.mkfifo(filename)
    elif mode == "junk":  # cannot replace it (not our directory): fill what we may write
        with open(filename, "wb") as out:
            out.write(b"page=000: key(0)\n" * (int(target) // 17 + 1))
    return {"return": {}}

def serve(conn):
    conn.sendall(b'{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, '
                 b'"package": "fake"}, "capabilities": []}}\r\n')
    buf = ""
    decoder = json.JSONDecoder()
    while True:
        data = conn.recv(65536)
        if not data:
            return
        buf += data.decode()
        while buf.strip():
            try:
                request, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                break  # an incomplete message: read on
            buf = buf.lstrip()[end:]
            command, args = request.get("execute"), request.get("arguments", {})
            if command == "query-status":
                reply = {"return": {"status": "running", "running": True}}
            elif command == "query-memdev":
                reply = {"return": [{"id": "ram0", "size": size, "share": True}]}
            elif command == "qom-get":
                reply = {"return": mem_path}
            elif command == "dump-skeys" and skeys == "hang":
                with open(count_file, "a") as count:
                    count.write("dump\n")
                continue  # never answered
            elif command == "dump-skeys":
                reply = dump(args["filename"])
            else:
                reply = {"return": {}}
            if "id" in request:
                reply["id"] = request["id"]
            conn.sendall(json.dumps(reply).encode() + b"\r\n")

while True:
    conn, _ = server.accept()
    try:
        serve(conn)
    except (OSError, ValueError):
        pass
    finally:
        conn.close()
'''

# A QMP client in its own process: negotiates, runs the commands given as JSON
# (``["getfd-eventfd", name]`` makes a non-blocking eventfd and passes it),
# prints one JSON line per reply.  A refusal before the greeting is printed too.
_CLIENT = r'''
import json, os, socket, sys
path, commands = sys.argv[1], json.loads(sys.argv[2])
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(20)
try:
    sock.connect(path)
except OSError as exc:
    print(json.dumps({"connect-error": exc.strerror}), flush=True)
    sys.exit(0)
stream = sock.makefile("rb")
first = json.loads(stream.readline())
print(json.dumps(first), flush=True)
if "QMP" not in first:
    sys.exit(0)
def execute(command, arguments=None, fds=()):
    message = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    data = json.dumps(message).encode() + b"\n"
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(
            b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)))])
    else:
        sock.sendall(data)
    while True:
        reply = json.loads(stream.readline())
        if "event" not in reply:
            return reply
execute("qmp_capabilities")
for entry in commands:
    if entry[0] == "getfd-eventfd":
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        reply = execute("getfd", {"fdname": entry[1]}, fds=[efd])
    else:
        reply = execute(entry[0], entry[1] if len(entry) > 1 else None)
    print(json.dumps(reply), flush=True)
'''


def need_root() -> None:
    """Skip (fail under CI) unless this runs as root with setpriv: attackers need other uids."""
    missing = os.geteuid() != 0 or shutil.which("setpriv") is None
    if missing:
        why = "the attacker tests need root and setpriv (util-linux) to act as other uids"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


def as_uid(uid: int | None) -> list[str]:
    """The command prefix that runs a program as ``uid`` (nothing for None)."""
    if uid is None:
        return []
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]


@contextlib.contextmanager
def world_dir() -> Iterator[Path]:
    """A root-owned directory (0711) under /tmp that other uids may traverse."""
    path = Path(tempfile.mkdtemp(prefix="indicators-attack-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def owned_dir(parent: Path, name: str, uid: int, mode: int = 0o700) -> Path:
    """``parent/name`` owned by ``uid`` with ``mode``."""
    path = parent / name
    path.mkdir()
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


class FakeQemu:
    """The fake QEMU process: ``socket`` its QMP socket, ``ram`` its RAM file.

    ``mem_path`` is what it answers to ``qom-get`` (default: its RAM file);
    ``skeys`` what it does on ``dump-skeys``: ``write`` (a one-line dump),
    ``error`` (no storage keys), ``fail`` (another error), ``symlink:TARGET``
    / ``fifo`` (replaces the file), ``junk:BYTES`` (writes that much into it),
    ``hang`` (never answers).
    """

    def __init__(
        self,
        home: Path,
        *,
        size: int,
        uid: int | None = None,
        mem_path: str | None = None,
        skeys: str = "write",
        socket_path: Path | None = None,
    ) -> None:
        self.home = home
        self.uid = uid
        self.ram = home / "ram"
        self.socket = socket_path or home / "qmp.sock"
        self.count_file = home / "dumps"
        self.args = [str(self.socket), str(self.ram), str(size), mem_path or str(self.ram),
                     skeys, str(self.count_file)]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> FakeQemu:
        """Start it and wait until it listens."""
        self.process = subprocess.Popen(
            [*as_uid(self.uid), PYTHON, "-c", _FAKE_QEMU, *self.args],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == b"ready", "the fake QEMU did not start"
        return self

    @property
    def pid(self) -> int:
        """The fake QEMU's pid."""
        assert self.process is not None
        return self.process.pid

    def dumps(self) -> int:
        """How many dump-skeys it has served."""
        try:
            return len(self.count_file.read_text().splitlines())
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        """Kill it and remove its socket."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()

    def __enter__(self) -> FakeQemu:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def foreign_client(path: str, uid: int, commands: list[list[Any]]) -> list[dict[str, Any]]:
    """Run :data:`_CLIENT` as ``uid`` on the socket ``path``; its printed replies.

    Asynchronous: the daemon may be serving in this very event loop.
    """
    process = await asyncio.create_subprocess_exec(
        *as_uid(uid), PYTHON, "-c", _CLIENT, path, json.dumps(commands),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode == 0, f"the foreign client failed: {out!r}"
    return [json.loads(line) for line in out.decode().splitlines()]


def open_fds() -> int:
    """How many fds this process has open."""
    return len(os.listdir("/proc/self/fd"))


def wait_for(predicate: Any, what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``predicate`` until true; the timeout only ends hangs."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def raw_connect(path: str) -> socket.socket:
    """A plain connected unix socket (blocking, with a generous timeout)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(path)
    return sock


@contextlib.asynccontextmanager
async def daemon(socket_path: Path, **control: Any) -> AsyncIterator[Service]:
    """A :class:`Service` on :func:`daemon_helpers.daemon_config` with ``[control]`` set."""
    service = Service(parse_config(daemon_config(socket_path, control=control), "<attack>"))
    await service.start()
    try:
        yield service
    finally:
        await service.stop(grace=1.0)

