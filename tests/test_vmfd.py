"""VM fd sources with real fds: a real KVM VM (x86 or s390x /dev/kvm) in another process."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from indicators import abi
from indicators.memop.vmfd import (
    KVM_VM,
    VmFdError,
    acquire_fd,
    fd_kind,
    from_inherited,
    from_pid,
    from_unix_socket,
)


@pytest.fixture
def needs_kvm() -> None:
    """Skip without a usable /dev/kvm; with the environment variable CI set, fail."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        reason = "needs a usable /dev/kvm to create a VM"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the VM fd tests: {reason}")
        pytest.skip(reason)


HOLDER = """
import fcntl, os, sys, time
kvm = os.open("/dev/kvm", os.O_RDWR)
vm = fcntl.ioctl(kvm, {create}, 0)
print(vm, flush=True)
sys.stdin.read()
"""


def create_vm() -> int:
    kvm = os.open("/dev/kvm", os.O_RDWR)
    try:
        return fcntl.ioctl(kvm, abi.KVM_CREATE_VM, 0)
    finally:
        os.close(kvm)


@pytest.fixture
def vmm(needs_kvm: None) -> Iterator[tuple[int, int]]:
    """A stand-in VMM process holding a VM fd: yields (pid, fd number in it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER.format(create=abi.KVM_CREATE_VM)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    fd = int(proc.stdout.readline())
    yield proc.pid, fd
    proc.stdin.close()
    proc.wait(timeout=10)


@pytest.mark.usefixtures("needs_kvm")
def test_from_pid_takes_the_vms_fd(vmm: tuple[int, int]) -> None:
    pid, _ = vmm
    fd = from_pid(pid)
    try:
        assert fd_kind(fd) == KVM_VM
    finally:
        os.close(fd)
    fd = acquire_fd(f"pid:{pid}")
    os.close(fd)


@pytest.mark.usefixtures("needs_kvm")
def test_from_inherited_and_unix_socket(tmp_path: Path) -> None:
    vm = create_vm()
    try:
        fd = from_inherited(vm)
        assert fd != vm and fd_kind(fd) == KVM_VM
        os.close(fd)
        path = str(tmp_path / "vmfd.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                socket.send_fds(conn, [b"x"], [vm])

        thread = threading.Thread(target=serve)
        thread.start()
        fd = from_unix_socket(path)
        thread.join()
        server.close()
        assert fd_kind(fd) == KVM_VM
        os.close(fd)
    finally:
        os.close(vm)


def test_wrong_kinds_of_fd_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(VmFdError, match=r"fd:\d+: the fd is '.*file', not 'anon_inode:kvm-vm'"):
            from_inherited(fd)
    finally:
        os.close(fd)
    with pytest.raises(VmFdError, match="fd:9999: not an open file descriptor"):
        from_inherited(9999)
    with pytest.raises(
        VmFdError, match=r"pid:1: expected exactly one 'anon_inode:kvm-vm' fd|pid:1: cannot"
    ):
        from_pid(1)
    with pytest.raises(VmFdError, match=r"unix:.*missing"):
        from_unix_socket(str(tmp_path / "missing"))
    with pytest.raises(VmFdError, match="is not fd:N, unix:PATH or pid:N"):
        acquire_fd("tcp:1")


# -------------------------------------------------- close-on-exec, without KVM

EVENTFD = "anon_inode:[eventfd]"


def _serve_fds(path: str, fds: list[int]) -> threading.Thread:
    """A peer on ``path`` that sends ``fds`` (inheritable, as a careless VMM would)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                socket.send_fds(conn, [b"x"], fds)

    thread = threading.Thread(target=serve)
    thread.start()
    return thread


def _visible_after_exec(fd: int) -> bool:
    """Whether a program exec'd by this process (keeping every fd it may) sees ``fd``."""
    probe = f"import os, sys; sys.exit(0 if os.path.exists('/proc/self/fd/{fd}') else 3)"
    result = subprocess.run([sys.executable, "-c", probe], close_fds=False, timeout=30)
    return result.returncode == 0


def _eventfds() -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if fd_kind(int(name)) == EVENTFD:
                found.add(int(name))
        except OSError:
            continue  # the listing's own fd, closed meanwhile
    return found


def test_fd_received_over_unix_is_close_on_exec(tmp_path: Path) -> None:
    """The peer's fds are inheritable; what arrives here must not be, and a surplus
    fd is closed."""
    sent = [os.eventfd(0), os.eventfd(0)]
    for fd in sent:
        os.set_inheritable(fd, True)
    before = _eventfds()
    path = str(tmp_path / "vmfd.sock")
    thread = _serve_fds(path, sent)
    fd = from_unix_socket(path, expect=EVENTFD)
    thread.join(timeout=30)
    try:
        assert _eventfds() - before == {fd}, "expected one new fd: the surplus one closed"
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, "expected FD_CLOEXEC set"
        assert not os.get_inheritable(fd)
        assert not _visible_after_exec(fd), "expected an exec'd program not to get the fd"
    finally:
        os.close(fd)
        for mine in sent:
            os.close(mine)


def test_fd_from_inherited_is_close_on_exec() -> None:
    inherited = os.eventfd(0)
    os.set_inheritable(inherited, True)
    try:
        fd = from_inherited(inherited, expect=EVENTFD)
        try:
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert not _visible_after_exec(fd)
        finally:
            os.close(fd)
    finally:
        os.close(inherited)
