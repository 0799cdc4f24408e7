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

needs_kvm = pytest.mark.needs(
    os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm to create a VM"
)

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
def vmm() -> Iterator[tuple[int, int]]:
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


@needs_kvm
def test_from_pid_takes_the_vms_fd(vmm: tuple[int, int]) -> None:
    pid, _ = vmm
    fd = from_pid(pid)
    try:
        assert fd_kind(fd) == KVM_VM
    finally:
        os.close(fd)
    fd = acquire_fd(f"pid:{pid}")
    os.close(fd)


@needs_kvm
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
