"""Build the airq guest and run it under ``qemu-system-s390x`` (TCG), sharing its RAM.

:class:`AirqGuest` is an async context manager around one QEMU process:

    layout = Layout(areas=(Area(summary_gaddr=0x30000, dsci_gaddr=0x31000,
                                n_vectors=8, counter_base=0),))
    async with AirqGuest(layout) as guest:       # built, booted, heartbeat moving
        ok, old = guest.memory.cas(0x31000, 1, 0, 0x80)   # DSCI bit of vector 0
        ok, old = guest.memory.cas(0x30000, 1, 0, 0x01)   # then the summary
        await guest.wait_rounds(2)
        counts = await guest.park()                # consistent: guest parked
        await guest.resume()
    # QEMU killed, RAM file and QMP socket removed, also after an exception

Before boot the parameter block for ``layout`` is written into a fresh RAM
file (a ``memory-backend-file,share=on``, so the file keeps it and this
process sees the guest's stores); QEMU then loads the ELF on top, which
touches only 0x20000 and up.  The guest runs with ``-smp 1,maxcpus=2``:
with plain ``-smp 1`` TCG runs non-parallel and the guest's CS/CSG stop being
host atomics, so host and guest updates would be lost.

With ``vmm_socket`` QEMU serves a second QMP monitor at that path, for a
VMM link (the ``indicators`` daemon's) next to this object's own client:
a QMP socket serves one client at a time.

The toolchain (:func:`skip_reason`, :func:`build_guest`) lives in
:mod:`indicators.testing.build`, the errors in :mod:`indicators.testing.errors`,
storage keys in :mod:`indicators.testing.skeys`; what a caller of
:class:`AirqGuest` needs is re-exported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from qemu.qmp import ExecuteError, QMPClient

from indicators.guestmem import GuestMemory
from indicators.testing.build import (
    QEMU,
    ToolsMissingError,
    build_guest,
    missing_tools,
    skip_reason,
)
from indicators.testing.errors import (
    BadParametersError,
    BootError,
    GuestProgramCheck,
    GuestTimeoutError,
    RigError,
)
from indicators.testing.guest import (
    OFF_ACK,
    OFF_CLEARED,
    OFF_CONTROL,
    OFF_ERROR,
    OFF_PGM,
    OFF_RESCAN_CLEARED,
    OFF_ROUNDS,
    OFF_STATE,
    OFF_SUMMARY_HITS,
    PARAM_GADDR,
    RESULTS_GADDR,
    Command,
    GuestState,
    GuestStats,
    Layout,
    ParamError,
    ProgramCheck,
)
from indicators.testing.skeys import StorageKey, parse_skeys

__all__ = [
    "DEFAULT_MEMORY",
    "AirqGuest",
    "BadParametersError",
    "BootError",
    "GuestProgramCheck",
    "GuestStats",
    "GuestTimeoutError",
    "RigError",
    "StorageKey",
    "ToolsMissingError",
    "parse_skeys",
    "skip_reason",
]

DEFAULT_MEMORY = 32 << 20
_POLL = 0.001


# ------------------------------------------------------------------ guest


def _reap(proc: subprocess.Popen[bytes], workdir: str, vmm_socket: str | None) -> None:
    """Kill QEMU and remove its files; safe to call twice (also from a finalizer)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)
    if vmm_socket is not None:
        with contextlib.suppress(OSError):
            os.unlink(vmm_socket)


class AirqGuest:
    """One QEMU running the airq guest over ``layout``; use ``async with``.

    ``memory_size`` is the guest's RAM (and RAM file) in bytes; ``workdir``
    is where the private temporary directory (RAM file, QMP socket, log) is
    made; ``elf`` overrides the built guest; ``qemu_args`` are appended to
    the command line; ``vmm_socket`` is the path of a second QMP monitor
    (removed again by :meth:`close`).
    """

    def __init__(
        self,
        layout: Layout,
        *,
        memory_size: int = DEFAULT_MEMORY,
        workdir: str | os.PathLike[str] | None = None,
        elf: Path | None = None,
        qemu_args: Sequence[str] = (),
        vmm_socket: str | os.PathLike[str] | None = None,
        pages: Mapping[int, bytes] | None = None,
    ) -> None:
        if memory_size % (1 << 20):
            raise ValueError(f"memory size {memory_size:#x} is not a multiple of 1 MiB")
        layout.check(memory_size)
        self.layout = layout
        self.memory_size = memory_size
        self._workdir_parent = workdir
        self._elf = elf
        self._qemu_args = tuple(qemu_args)
        self.vmm_socket = None if vmm_socket is None else os.fspath(vmm_socket)
        #: ``{gaddr: bytes}`` written into the RAM file before boot (the driver block).
        self.pages = dict(pages or {})
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: (
            weakref.finalize[[subprocess.Popen[bytes], str, str | None], AirqGuest] | None
        ) = None
        self._memory: GuestMemory | None = None
        self._qmp: QMPClient | None = None
        self._seq = 0
        self.boot_seconds: float | None = None

    # ------------------------------------------------------- lifecycle

    async def __aenter__(self) -> AirqGuest:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def command(self) -> list[str]:
        """The QEMU command line (valid once :meth:`start` made the files)."""
        d = self._require_dir()
        size = f"{self.memory_size >> 20}M"
        vmm: list[str] = []
        if self.vmm_socket is not None:
            vmm = [
                "-chardev", f"socket,id=vmm,path={self.vmm_socket},server=on,wait=off",
                "-mon", "chardev=vmm,mode=control",
            ]  # fmt: skip
        return [
            QEMU,
            "-machine", "s390-ccw-virtio,memory-backend=mem0",
            "-m", size,
            "-object", f"memory-backend-file,id=mem0,size={size},mem-path={d / 'ram'},share=on",
            "-accel", "tcg,thread=multi",
            "-smp", "1,maxcpus=2",  # not plain 1: see the module docstring
            "-nographic", "-nodefaults",
            "-action", "panic=pause",  # a disabled wait leaves QEMU up to inspect
            "-qmp", f"unix:{d / 'qmp.sock'},server=on,wait=off",
            "-kernel", str(self._elf),
            *vmm,
            *self._qemu_args,
        ]  # fmt: skip

    async def start(self, *, timeout: float = 10.0) -> None:
        """Build, write the RAM file, boot, connect QMP, wait for the heartbeat.

        On any failure everything made so far is torn down again.
        """
        if self._proc is not None:
            raise RigError("guest already started")
        missing = missing_tools()
        if missing:
            raise ToolsMissingError(missing)
        try:
            await self._start(timeout)
        except BaseException:
            await self.close()
            raise

    async def _start(self, timeout: float) -> None:
        if self._elf is None:
            self._elf = await asyncio.to_thread(build_guest)
        self._dir = Path(tempfile.mkdtemp(prefix="airq-", dir=self._workdir_parent))
        self._memory = GuestMemory(self.memory_size, str(self._dir / "ram"), create=True)
        self._memory.write(PARAM_GADDR, self.layout.encode())
        for gaddr, data in self.pages.items():
            self._memory.write(gaddr, data)
        t0 = time.monotonic()
        command = self.command()
        setpriv = shutil.which("setpriv")
        if setpriv is not None:
            # If this process is SIGKILLed, finalizers never run: have the
            # kernel kill QEMU (which would spin a core forever) with us.
            # The signal follows the thread that forks, the event loop's.
            command = [setpriv, "--pdeathsig", "KILL", "--", *command]
        with open(self._dir / "qemu.log", "wb") as log:
            self._proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self._finalizer = weakref.finalize(self, _reap, self._proc, str(self._dir), self.vmm_socket)
        self._qmp = await self._connect_qmp(t0 + timeout)
        await self._wait(
            lambda: self.state() != GuestState.NOT_STARTED, "start", t0 + timeout - time.monotonic()
        )
        self._raise_if_failed()
        first = self.rounds()
        await self._wait(lambda: self.rounds() > first, "beat", t0 + timeout - time.monotonic())
        self.boot_seconds = time.monotonic() - t0

    async def _connect_qmp(self, deadline: float) -> QMPClient:
        # QEMU binds the socket a moment before it listens, and qemu.qmp logs
        # each failed connect at ERROR: connect a plain socket until it
        # works, then hand it over.
        path = str(self._require_dir() / "qmp.sock")
        loop = asyncio.get_running_loop()
        while True:
            self._check_alive("connecting to QMP")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, path)
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise BootError(f"no QMP at {path}: {exc}", self.log()) from exc
                await asyncio.sleep(_POLL)
        qmp = QMPClient("airq-rig")
        await qmp.connect(sock)
        return qmp

    async def close(self) -> None:
        """Kill QEMU, drop QMP, unmap and remove the files.  Idempotent."""
        if self._finalizer is not None:
            self._finalizer()  # kills first: a disconnect never waits for QEMU
        elif self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        if self._qmp is not None:
            with contextlib.suppress(Exception):  # QEMU is gone: EOF, reset, ...
                await self._qmp.disconnect()
            self._qmp = None
        if self._memory is not None:
            self._memory.close()

    # ------------------------------------------------------ accessors

    @property
    def memory(self) -> GuestMemory:
        """The guest's RAM, shared with QEMU (gaddr = offset)."""
        if self._memory is None or self._memory.closed:
            raise RigError("guest memory is not mapped (not started or closed)")
        return self._memory

    @property
    def qmp(self) -> QMPClient:
        """The connected QMP client."""
        if self._qmp is None:
            raise RigError("QMP is not connected (not started or closed)")
        return self._qmp

    @property
    def running(self) -> bool:
        """Whether QEMU was started and has not exited."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def ram_path(self) -> str:
        """The RAM file QEMU and this process share (gone after :meth:`close`)."""
        return str(self._require_dir() / "ram")

    @property
    def pid(self) -> int:
        """QEMU's process id."""
        if self._proc is None:
            raise RigError("QEMU is not running")
        return self._proc.pid

    def log(self) -> str:
        """What QEMU printed so far."""
        if self._dir is None:
            return ""
        try:
            return (self._dir / "qemu.log").read_text(errors="replace")
        except OSError:
            return ""

    def _word(self, offset: int, size: int) -> int:
        return self.memory.load(PARAM_GADDR + offset, size)

    def state(self) -> GuestState:
        """The guest's state word."""
        return GuestState(self._word(OFF_STATE, 4))

    def rounds(self) -> int:
        """The heartbeat: scan rounds the guest completed."""
        return self._word(OFF_ROUNDS, 8)

    def stats(self) -> GuestStats:
        """The guest's statistics (consistent with each other only while parked)."""
        return GuestStats(
            rounds=self.rounds(),
            summary_hits=self._word(OFF_SUMMARY_HITS, 8),
            cleared=self._word(OFF_CLEARED, 8),
            rescan_cleared=self._word(OFF_RESCAN_CLEARED, 8),
        )

    def counts(self, *, require_parked: bool = True) -> list[int]:
        """Per-counter clear counts (index ``counter_base + vector``).

        Consistent only while the guest is parked; ``require_parked=False``
        reads them anyway (each counter on its own is still exact).
        """
        if require_parked and self.state() != GuestState.PARKED:
            raise RigError(f"counts read while the guest is {self.state().name}, not PARKED")
        n = self.layout.n_counters
        return list(struct.unpack(f">{n}Q", self.memory.read(RESULTS_GADDR, 8 * n)))

    def program_check(self) -> ProgramCheck | None:
        """The guest's program-check report, if it took one."""
        return ProgramCheck.decode(self.memory.read(PARAM_GADDR + OFF_PGM, 0xA0))

    # ----------------------------------------------------- handshake

    async def park(self, *, timeout: float = 5.0) -> list[int]:
        """Have the guest finish its round and spin; return the counts."""
        await self._command(Command.PARK, timeout)
        return self.counts()

    async def resume(self, *, timeout: float = 5.0) -> None:
        """Let a parked guest scan again (returns once it acknowledged)."""
        await self._command(Command.RUN, timeout)

    async def stop(self, *, timeout: float = 5.0) -> int:
        """Have the guest enter its quiesce wait; return QEMU's exit status."""
        await self._command(Command.STOP, timeout)
        proc = self._proc
        assert proc is not None
        await self._wait(lambda: proc.poll() is not None, "shut down", timeout, alive=False)
        return proc.returncode

    async def fault(self, *, timeout: float = 5.0) -> ProgramCheck:
        """Have the guest execute an invalid opcode; return its report."""
        await self._command(Command.FAULT, timeout, raise_on_check=False)
        await self._wait(lambda: self.program_check() is not None, "report", timeout)
        report = self.program_check()
        assert report is not None
        return report

    async def reboot(self, *, timeout: float = 5.0) -> None:
        """Ask the guest to re-IPL itself (``diag 308`` subcode 3); returns once it
        acknowledged, which it does right before the diag."""
        await self._command(Command.REBOOT, timeout)

    async def wait_rounds(self, n: int = 1, *, timeout: float = 5.0) -> int:
        """Wait until the heartbeat advanced by ``n``; return the new count."""
        target = self.rounds() + n
        await self._wait(lambda: self.rounds() >= target, f"do {n} rounds", timeout)
        return self.rounds()

    async def storage_keys(self) -> dict[int, StorageKey]:
        """Every page's storage key, by QMP ``dump-skeys``, keyed by page gaddr.

        Empty while the guest has used no key instruction (QEMU then keeps
        no keys: every key is 0).
        """
        path = self._require_dir() / "skeys"
        try:
            await self.qmp.execute("dump-skeys", {"filename": str(path)})
            return parse_skeys(path.read_text())
        except ExecuteError as exc:
            if "not using storage keys" in str(exc):  # QEMU gives no finer error class
                return {}
            raise
        finally:
            path.unlink(missing_ok=True)

    async def _command(
        self, command: Command, timeout: float, *, raise_on_check: bool = True
    ) -> None:
        self._seq += 1
        value = self._seq << 32 | command
        mem = self.memory
        ok, seen = mem.cas(
            PARAM_GADDR + OFF_CONTROL, 8, mem.load(PARAM_GADDR + OFF_CONTROL, 8), value
        )
        if not ok:  # only this process writes control
            raise RigError(f"control word changed under us ({seen:#x})")
        await self._wait(
            lambda: self._word(OFF_ACK, 8) == value,
            f"acknowledge {command.name}",
            timeout,
            raise_on_check=raise_on_check,
        )

    # -------------------------------------------------------- waiting

    async def _wait(
        self,
        done: Callable[[], bool],
        what: str,
        timeout: float,
        *,
        alive: bool = True,
        raise_on_check: bool = True,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if raise_on_check:
                self._raise_if_failed()
            if alive:
                self._check_alive(f"waiting to {what}")
            if time.monotonic() > deadline:
                raise GuestTimeoutError(what, timeout, self._word(OFF_STATE, 4))
            await asyncio.sleep(_POLL)

    def _raise_if_failed(self) -> None:
        state = self._word(OFF_STATE, 4)
        if state == GuestState.BAD_PARAMS:
            error = self._word(OFF_ERROR, 4)
            raise BadParametersError(ParamError(error >> 16), error & 0xFFFF)
        report = self.program_check()
        if report is not None:
            raise GuestProgramCheck(report)

    def _check_alive(self, doing: str) -> None:
        if self._proc is None or self._proc.poll() is not None:
            code = None if self._proc is None else self._proc.returncode
            raise BootError(f"QEMU exited ({code}) while {doing}", self.log())

    def _require_dir(self) -> Path:
        if self._dir is None:
            raise RigError("guest not started")
        return self._dir
