"""Host files QEMU hands over: the guest's RAM and the storage-key dump.

QEMU is not trusted with the daemon's file system.  A path it reports is a
name it chose, and the daemon may be root; so no file is opened the way a
path says unless QEMU itself could not have done better:

- :func:`open_guest_ram` takes the RAM file from QEMU's own open files
  (``pidfd_getfd``, else ``/proc/PID/fd/N``), only a file QEMU holds open
  *and* maps shared under the name it reported; only when the daemon may not
  look into QEMU's process does it open the name, with ``O_NOFOLLOW`` and
  never ``O_CREAT``.  Either way the file must be a regular file (or a
  memfd) of exactly the guest's size, owned by QEMU's uid when known.
- :class:`SkeysDump` is a file the daemon creates itself (``O_EXCL``, in a
  fresh directory only it can write) for QEMU's ``dump-skeys`` and reads
  back through the fd it kept, never by name: whatever QEMU puts under that
  name afterwards (a symlink, a FIFO, ``/dev/zero``) is not read.  The read
  is size-capped and its errors never quote the contents.

    fd = open_guest_ram(path, memory_size, qemu_pid, qemu_uid)
    with SkeysDump(directory, pages, qemu_uid) as dump:
        await qmp.execute("dump-skeys", {"filename": dump.path})
        text = dump.read()
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import stat
import tempfile
from types import TracebackType

__all__ = ["HostFileError", "SkeysDump", "open_guest_ram"]

_SYS_PIDFD_GETFD = 438  # the same number on every architecture (unified table)
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
_SKEYS_LINE = 96  # generous bytes per page line of a dump-skeys file


class HostFileError(OSError):
    """A file QEMU named that the daemon will not use; ``path`` and ``reason`` say why."""

    def __init__(self, path: str, reason: str, code: int = errno.EPERM) -> None:
        self.path = path
        self.reason = reason
        super().__init__(code, f"{path}: {reason}")

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def open_guest_ram(path: str, size: int, pid: int | None = None, uid: int | None = None) -> int:
    """An fd of the guest RAM file QEMU (``pid``, ``uid``) reported as ``path``.

    The caller owns the fd (close-on-exec).  Raises :class:`HostFileError`
    naming the path and what was wrong with it; nothing is created.
    """
    fd = _from_qemu(path, pid) if pid is not None else None
    if fd is None:
        try:
            fd = os.open(path, os.O_RDWR | _OPEN_FLAGS)
        except OSError as exc:
            why = "is a symlink" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
            raise HostFileError(
                path, f"cannot open the guest RAM file: {why}", exc.errno or errno.EIO
            ) from None
    try:
        _check_ram(fd, path, size, uid)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_ram(fd: int, path: str, size: int, uid: int | None) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise HostFileError(path, f"is not a regular file (mode {stat.filemode(info.st_mode)})")
    if info.st_size != size:
        raise HostFileError(
            path, f"has {info.st_size:#x} bytes; the guest's memory_size is {size:#x}"
        )
    if uid is not None and info.st_uid != uid:
        raise HostFileError(path, f"belongs to uid {info.st_uid}, not to QEMU's uid {uid}")


def _from_qemu(path: str, pid: int) -> int | None:
    """QEMU's own open file for ``path`` if it maps it shared; None if we may not look.

    Raises :class:`HostFileError` when we may look and QEMU has no such file:
    then the name does not lead to QEMU's RAM.
    """
    try:
        names = os.listdir(f"/proc/{pid}/fd")
        mapped, mapped_names = _shared_mappings(pid)
    except PermissionError:
        return None  # no ptrace rights over QEMU: the caller opens the name instead
    except OSError as exc:
        raise HostFileError(path, f"QEMU (pid {pid}) is gone: {exc.strerror}") from None
    wanted = {path, os.path.realpath(path)}  # only to find QEMU's fd; its file is what we use
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target not in wanted:
            continue
        fd = _take(pid, int(name))
        if fd is None:
            continue
        info = os.fstat(fd)
        # maps names the lower file's inode on a stacked file system (overlayfs),
        # so its path counts too; both are QEMU's own mapping of this open file.
        if (info.st_dev, info.st_ino) in mapped or target in mapped_names:
            return fd
        os.close(fd)
    raise HostFileError(path, f"QEMU (pid {pid}) has no shared mapping of an open file there")


def _shared_mappings(pid: int) -> tuple[set[tuple[int, int]], set[str]]:
    """(st_dev, st_ino) and path of every file ``pid`` maps shared (``/proc/PID/maps``)."""
    inodes, paths = set(), set()
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 5 or fields[1][3:4] != "s" or fields[4] == "0":
                continue
            major, _, minor = fields[3].partition(":")
            inodes.add((os.makedev(int(major, 16), int(minor, 16)), int(fields[4])))
            if len(fields) == 6:
                paths.add(fields[5].rstrip("\n"))
    return inodes, paths


def _take(pid: int, target: int) -> int | None:
    """QEMU's fd ``target`` in this process: its open file (pidfd_getfd) or a reopening."""
    with contextlib.suppress(OSError):
        pidfd = os.pidfd_open(pid)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = int(libc.syscall(_SYS_PIDFD_GETFD, pidfd, target, 0))
            if fd >= 0:
                return fd  # pidfd_getfd sets close-on-exec itself
        finally:
            os.close(pidfd)
    try:  # PTRACE_MODE_READ suffices here (Yama does not restrict it)
        return os.open(f"/proc/{pid}/fd/{target}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None


class SkeysDump:
    """A file for one ``dump-skeys``: created by the daemon, read through its own fd.

    ``directory`` holds a fresh private directory (mode 0711: QEMU may reach
    the file, nobody else may list or write the directory); the file is made
    writable for ``qemu_uid`` (owned by it when the daemon is root, else
    through the daemon's group).  ``pages`` bounds the size read back.
    """

    def __init__(self, directory: str | None, pages: int, qemu_uid: int | None = None) -> None:
        self.cap = pages * _SKEYS_LINE + 4096
        self._dir = tempfile.mkdtemp(prefix="indicators-skeys-", dir=directory)
        try:
            os.chmod(self._dir, 0o711)  # our fresh directory: nobody can have swapped it
            self.path = os.path.join(self._dir, "skeys")
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
            if qemu_uid is not None and qemu_uid != os.geteuid():
                if os.geteuid() == 0:
                    os.fchown(self._fd, qemu_uid, -1)
                else:
                    os.fchmod(self._fd, 0o660)
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise

    def read(self) -> str:
        """The dump's text, read through the kept fd; HostFileError without contents."""
        info = os.fstat(self._fd)
        if not stat.S_ISREG(info.st_mode):  # cannot change, but say so if it ever does
            raise HostFileError(self.path, "the dump-skeys file is not a regular file")
        if info.st_size > self.cap:
            raise HostFileError(
                self.path, f"the dump-skeys file has {info.st_size} bytes, over the cap {self.cap}"
            )
        data = os.pread(self._fd, self.cap + 1, 0)
        if len(data) > self.cap:
            raise HostFileError(self.path, f"the dump-skeys file grew over the cap {self.cap}")
        try:
            return data.decode("ascii")
        except UnicodeDecodeError as exc:
            raise HostFileError(
                self.path, f"the dump-skeys file is not ASCII (byte offset {exc.start})"
            ) from None

    def close(self) -> None:
        """Close the fd and remove the directory (whatever QEMU left in it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> SkeysDump:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
