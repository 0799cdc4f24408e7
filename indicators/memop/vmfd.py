"""Where a KVM VM file descriptor comes from.

The VMM (QEMU) owns the VM fd; the daemon borrows it in one of three ways,
written as a source string in the config:

``fd:N``
    inherited from the parent (a supervisor started us with the fd open);
``unix:PATH``
    received once over a unix socket as SCM_RIGHTS ancillary data;
``pid:N``
    taken from the VMM process with ``pidfd_open`` + ``pidfd_getfd`` (needs
    ptrace rights over it: same uid and no Yama restriction, or
    CAP_SYS_PTRACE), choosing the fd whose ``/proc/N/fd`` link reads
    ``anon_inode:kvm-vm``.

Every source checks that what it got is a KVM VM fd (``expect`` may name
another anon inode, e.g. ``kvm-device`` for a FLIC fd) and returns a new fd
that the caller owns, close-on-exec: nothing the daemon ever starts inherits
a guest's VM (``os.dup`` and ``pidfd_getfd`` set the flag themselves; fds
received as SCM_RIGHTS get it atomically with ``MSG_CMSG_CLOEXEC``).
"""

from __future__ import annotations

import array
import ctypes
import os
import socket

from ..errors import IndicatorsError

__all__ = ["VmFdError", "acquire_fd", "fd_kind", "from_inherited", "from_pid", "from_unix_socket"]

KVM_VM = "anon_inode:kvm-vm"
_SYS_PIDFD_GETFD = 438  # the same number on every architecture (unified table)


class VmFdError(IndicatorsError, OSError):
    """The VM fd could not be acquired; the message says from where and why."""


def fd_kind(fd: int, pid: int | str = "self") -> str:
    """What ``/proc/PID/fd/FD`` points at (``anon_inode:kvm-vm`` for a VM)."""
    return os.readlink(f"/proc/{pid}/fd/{fd}")


def _checked(fd: int, source: str, expect: str) -> int:
    kind = fd_kind(fd)
    if kind != expect:
        os.close(fd)
        raise VmFdError(f"{source}: the fd is {kind!r}, not {expect!r}")
    return fd


def from_inherited(fd: int, expect: str = KVM_VM) -> int:
    """A duplicate of inherited fd ``fd``."""
    try:
        duplicate = os.dup(fd)
    except OSError as exc:
        raise VmFdError(f"fd:{fd}: not an open file descriptor ({exc.strerror})") from None
    return _checked(duplicate, f"fd:{fd}", expect)


def from_unix_socket(path: str, expect: str = KVM_VM, timeout: float = 5.0) -> int:
    """Connect to ``path`` and receive one fd as SCM_RIGHTS."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            fds = _recv_fds_cloexec(sock, 4)
        except OSError as exc:
            raise VmFdError(f"unix:{path}: {exc.strerror or exc}") from None
    if not fds:
        raise VmFdError(f"unix:{path}: the peer sent no file descriptor")
    for extra in fds[1:]:
        os.close(extra)
    return _checked(fds[0], f"unix:{path}", expect)


def _recv_fds_cloexec(sock: socket.socket, maxfds: int) -> list[int]:
    """Up to ``maxfds`` SCM_RIGHTS fds from one message, each close-on-exec.

    ``MSG_CMSG_CLOEXEC`` sets the flag as the kernel installs the fds, with
    no window in which a fork and exec elsewhere in the process could
    inherit them.  (``socket.recv_fds`` takes a ``flags`` argument but, in
    the Pythons this project supports, does not pass it on.)
    """
    fds = array.array("i")
    _, ancdata, _, _ = sock.recvmsg(
        16, socket.CMSG_LEN(maxfds * fds.itemsize), socket.MSG_CMSG_CLOEXEC
    )
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


def from_pid(pid: int, expect: str = KVM_VM) -> int:
    """Take the VMM's ``expect`` fd with pidfd_getfd."""
    source = f"pid:{pid}"
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError as exc:
        raise VmFdError(f"{source}: cannot list its fds ({exc.strerror})") from None
    matches = []
    for name in names:
        try:
            if fd_kind(int(name), pid) == expect:
                matches.append(int(name))
        except OSError:
            continue  # closed meanwhile
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(map(str, sorted(matches)))
        raise VmFdError(f"{source}: expected exactly one {expect!r} fd, found {found}")
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.syscall(_SYS_PIDFD_GETFD, pidfd, matches[0], 0))
        if fd < 0:
            err = ctypes.get_errno()
            raise VmFdError(
                f"{source}: pidfd_getfd of fd {matches[0]} failed: {os.strerror(err)} "
                f"(needs ptrace rights over the VMM: same uid, or CAP_SYS_PTRACE)"
            )
    finally:
        os.close(pidfd)
    return _checked(fd, source, expect)


def acquire_fd(source: str, expect: str = KVM_VM) -> int:
    """Resolve a ``fd:N`` / ``unix:PATH`` / ``pid:N`` source string."""
    kind, _, rest = source.partition(":")
    if kind == "fd" and rest.isdigit():
        return from_inherited(int(rest), expect)
    if kind == "unix" and rest:
        return from_unix_socket(rest, expect)
    if kind == "pid" and rest.isdigit():
        return from_pid(int(rest), expect)
    raise VmFdError(f"{source!r} is not fd:N, unix:PATH or pid:N")
