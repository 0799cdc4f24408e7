"""A stand-in for QEMU's QMP monitor, for the daemon's VMM link without a guest.

It speaks QMP on a unix socket (greeting, ``qmp_capabilities``, replies
carrying the request's ``id``) and answers what the daemon's VMM link asks
of QEMU: ``query-status``, ``query-memdev`` and ``qom-get`` (a RAM file of
the test's choosing), and ``dump-skeys`` (writes the storage keys the test
set, in QEMU's text format, and counts the dumps).  :meth:`FakeQemu.cut`
hangs up and stops listening, as a killed QEMU would; :meth:`FakeQemu.start`
listens again.  The real QEMU runs in the QEMU-marked tests; this one keeps
the daemon's own VMM paths under test everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
from typing import Any


class UnixListener:
    """A unix-socket server that can hang up on everyone and stop listening, and
    listen again: what a killed and restarted QEMU looks like to its clients.
    Subclasses serve each connection in ``_serve`` and keep its writers in
    ``_writers``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """Listen (again)."""
        self._server = await asyncio.start_unix_server(self._serve, self.path)

    async def cut(self) -> None:
        """Hang up every connection and stop listening (the socket file goes away)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class FakeQemu(UnixListener):
    """A QMP server at ``path`` that reports ``ram_path`` and ``skeys`` (page gaddr -> key)."""

    def __init__(self, path: str, ram_path: str, skeys: dict[int, int] | None = None) -> None:
        super().__init__(path)
        self.ram_path = ram_path
        self.skeys = dict(skeys or {})
        #: dump-skeys commands answered so far
        self.dumps = 0
        self.connections = 0
        self._dumped = asyncio.Condition()
        #: RAM files it holds open and maps shared, as QEMU does (the daemon takes
        #: the RAM only from a file QEMU really maps): path -> (fd, mapping)
        self._held: dict[str, tuple[int, mmap.mmap]] = {}

    def _hold(self, path: str) -> None:
        if path in self._held:
            return
        with contextlib.suppress(OSError, ValueError):  # a missing or empty file: not mapped
            fd = os.open(path, os.O_RDWR)
            self._held[path] = (fd, mmap.mmap(fd, 0, mmap.MAP_SHARED))

    async def wait_dumps(self, count: int, timeout: float = 10.0) -> None:
        """Wait until ``count`` dump-skeys were answered in all (the timeout ends a hang)."""

        async def reached() -> None:
            async with self._dumped:
                await self._dumped.wait_for(lambda: self.dumps >= count)

        await asyncio.wait_for(reached(), timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        greeting = {
            "QMP": {
                "version": {"qemu": {"major": 9, "minor": 0, "micro": 0}, "package": "fake"},
                "capabilities": [],
            }
        }
        decoder = json.JSONDecoder()
        pending = ""
        try:
            writer.write(json.dumps(greeting).encode() + b"\r\n")
            while data := await reader.read(65536):
                pending += data.decode()
                while pending.strip():  # clients need not end a request with a newline
                    try:
                        request, end = decoder.raw_decode(pending.lstrip())
                    except json.JSONDecodeError:
                        break  # the rest of the object is still on its way
                    pending = pending.lstrip()[end:]
                    arguments = request.get("arguments") or {}
                    reply = await self._answer(request.get("execute"), arguments)
                    if "id" in request:
                        reply["id"] = request["id"]
                    writer.write(json.dumps(reply).encode() + b"\r\n")
                await writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _answer(self, command: str, arguments: dict[str, Any]) -> dict[str, Any]:
        if command == "qmp_capabilities":
            return {"return": {}}
        if command == "query-status":
            return {"return": {"status": "running", "running": True, "singlestep": False}}
        if command == "query-memdev":
            return {"return": [{"id": "ram0", "size": 0, "merge": False, "dump": False,
                                "prealloc": False, "share": True, "policy": "default",
                                "host-nodes": []}]}  # fmt: skip
        if command == "qom-get" and arguments.get("property") == "mem-path":
            self._hold(self.ram_path)
            return {"return": self.ram_path}
        if command == "dump-skeys":
            with open(arguments["filename"], "w") as dump:
                for gaddr, key in sorted(self.skeys.items()):
                    dump.write(f"page={gaddr >> 12:x}: key({key}) => ACC={key >> 4}, "
                               f"FP={key >> 3 & 1}, REF=0, ch=0, reserved=0\n")  # fmt: skip
            async with self._dumped:
                self.dumps += 1
                self._dumped.notify_all()
            return {"return": {}}
        missing = f"The command {command} has not been found"
        return {"error": {"class": "CommandNotFound", "desc": missing}}
