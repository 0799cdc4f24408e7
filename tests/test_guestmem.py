"""GuestMemory: big-endian CAS and loads of every size, and their atomicity.

The atomicity tests hammer one 16 bytes with CAS increments of different
sub-fields, from threads of this process and from a second process that
maps the same memory (a forked child for the anonymous shared mapping, a
fresh interpreter for a RAM file), with every size at once: a 16-byte CAS
rewrites its neighbours' fields and an 8-byte one half of them, so any lost
or torn update shows up as a wrong final count.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from indicators.guestmem import CAS_SIZES, GuestMemory

MEMORY_SIZE = 4 * 4096
SLOT = 0x100  # the hammered 16 bytes
GATE = 0x1000  # one "ready" byte per process
#: How long a process waits at the gate for the other: only ends a hang (the other died).
GATE_TIMEOUT = 60.0

# ------------------------------------------------------------- semantics


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    with GuestMemory(MEMORY_SIZE) as mem:
        yield mem


def _value(size: int) -> int:
    return int.from_bytes(bytes(range(0x11, 0x11 + size)), "big")


@pytest.mark.parametrize("size", CAS_SIZES)
@pytest.mark.parametrize("offset", [0, 16, 48])
def test_cas_stores_big_endian(memory: GuestMemory, size: int, offset: int) -> None:
    gaddr = SLOT + offset
    memory.write(gaddr - 16, b"\xaa" * (size + 32))
    current = int.from_bytes(b"\xaa" * size, "big")

    assert memory.cas(gaddr, size, current, _value(size)) == (True, current)

    assert memory.read(gaddr, size) == bytes(range(0x11, 0x11 + size)), "expected guest order"
    assert memory.read(gaddr - 16, 16) == b"\xaa" * 16, "expected the bytes before untouched"
    assert memory.read(gaddr + size, 16) == b"\xaa" * 16, "expected the bytes after untouched"
    assert memory.load(gaddr, size) == _value(size)


@pytest.mark.parametrize("size", CAS_SIZES)
def test_cas_mismatch_reports_current_value(memory: GuestMemory, size: int) -> None:
    memory.write(SLOT, bytes(range(0x11, 0x11 + size)))
    for byte in range(size):
        wrong = _value(size) ^ (0x80 << (8 * byte))
        assert memory.cas(SLOT, size, wrong, 0) == (False, _value(size)), (
            f"expected a failed compare (byte {byte} differs) to report the memory value"
        )
    assert memory.read(SLOT, size) == bytes(range(0x11, 0x11 + size)), "expected no store"


@pytest.mark.parametrize("size", CAS_SIZES)
def test_cas_full_range_values(memory: GuestMemory, size: int) -> None:
    top = (1 << (8 * size)) - 1
    memory.write(SLOT, bytes(16))
    assert memory.cas(SLOT, size, 0, top) == (True, 0)
    assert memory.cas(SLOT, size, top, 1) == (True, top)
    assert memory.load(SLOT, size) == 1


def test_closed_memory_refuses_atomics(memory: GuestMemory) -> None:
    memory.close()
    assert memory.closed
    with pytest.raises(ValueError, match="closed"):
        memory.cas(SLOT, 8, 0, 1)
    with pytest.raises(ValueError, match="closed"):
        memory.load(SLOT, 8)
    memory.close()  # idempotent


def test_ram_file_must_be_large_enough(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    path.write_bytes(bytes(4096))
    with pytest.raises(ValueError, match="fewer than"):
        GuestMemory(MEMORY_SIZE, str(path))
    with GuestMemory(MEMORY_SIZE, str(path), create=True) as mem:
        assert mem.size == MEMORY_SIZE
    assert path.stat().st_size == MEMORY_SIZE


@pytest.mark.parametrize("size", [0, 100, -4096])
def test_size_must_be_a_positive_page_multiple(size: int) -> None:
    with pytest.raises(ValueError, match="page size"):
        GuestMemory(size)


# ------------------------------------------------------------ atomicity

# Each worker increments one sub-field of the 16 bytes with one CAS size:
# (CAS size, CAS offset in the slot, field offset in the slot, field size).
# The 16- and 8-byte CASes cover other workers' fields as well.
FIELDS = {
    "cas16": (16, 0, 0, 2),
    "cas8": (8, 0, 2, 2),
    "cas8b": (8, 8, 8, 2),
    "cas4": (4, 4, 4, 4),
    "cas2": (2, 10, 10, 2),
    "cas1": (1, 12, 12, 1),
    "cas1b": (1, 13, 13, 1),
    "cas4b": (4, 12, 14, 2),
}


def increment(memory: GuestMemory, field: str, count: int) -> None:
    """Add 1 to ``field``, ``count`` times, each by a CAS of the field's size."""
    size, cas_offset, offset, width = FIELDS[field]
    shift = 8 * (cas_offset + size - offset - width)
    mask = ((1 << (8 * width)) - 1) << shift
    gaddr = SLOT + cas_offset
    seen = memory.load(gaddr, size)
    for _ in range(count):
        while True:
            bumped = (seen & ~mask) | ((seen + (1 << shift)) & mask)
            exchanged, seen = memory.cas(gaddr, size, seen, bumped)
            if exchanged:
                seen = bumped
                break


def run_workers(memory: GuestMemory, fields: list[str], count: int, party: int) -> None:
    """Increment ``fields`` in threads, once both processes (party 0 and 1) are ready."""
    threads = [threading.Thread(target=increment, args=(memory, f, count)) for f in fields]
    memory.write(GATE + party, b"\x01")
    deadline = time.monotonic() + GATE_TIMEOUT
    while memory.read(GATE, 2) != b"\x01\x01":  # start together, so the processes overlap
        if time.monotonic() > deadline:
            raise TimeoutError(f"party {party}: the other process never reached the gate")
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads finely
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)


def field_values(memory: GuestMemory) -> dict[str, int]:
    data = memory.read(SLOT, 16)
    return {
        name: int.from_bytes(data[offset : offset + width], "big")
        for name, (_, _, offset, width) in FIELDS.items()
    }


PARENT = ["cas16", "cas8", "cas4", "cas1", "cas4b"]
CHILD = ["cas8b", "cas2", "cas1b", "cas16", "cas4"]
COUNT = 10000


def expected_counts() -> dict[str, int]:
    """Each field's count, modulo its width (the 1-byte fields wrap)."""
    return {
        name: COUNT * (PARENT + CHILD).count(name) % (1 << (8 * width))
        for name, (_, _, _, width) in FIELDS.items()
    }


def test_threads_and_forked_process_on_anonymous_mapping() -> None:
    with GuestMemory(MEMORY_SIZE) as memory:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                run_workers(memory, CHILD, COUNT, party=1)
                code = 0
            finally:
                os._exit(code)
        run_workers(memory, PARENT, COUNT, party=0)
        _, status = os.waitpid(pid, 0)
        assert status == 0
        assert field_values(memory) == expected_counts(), "expected no lost or torn increment"


CHILD_SCRIPT = """
import sys
sys.path[:0] = [sys.argv[3]]
from indicators.guestmem import GuestMemory
from test_guestmem import CHILD, run_workers
with GuestMemory(int(sys.argv[2]), sys.argv[1]) as memory:
    run_workers(memory, CHILD, int(sys.argv[4]), party=1)
"""


def test_threads_and_second_process_on_ram_file(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    with GuestMemory(MEMORY_SIZE, str(path), create=True) as memory:
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD_SCRIPT,
                str(path),
                str(MEMORY_SIZE),
                str(Path(__file__).parent),
                str(COUNT),
            ]
        )
        run_workers(memory, PARENT, COUNT, party=0)
        assert child.wait(timeout=60) == 0
        assert field_values(memory) == expected_counts(), "expected no lost or torn increment"
