"""The memop contract, run against every backend (see ``memop_rig`` in conftest).

Laid out like the kernel's selftest (tools/testing/selftests/kvm/s390x/
memop.c): one function per behaviour, named after it, tables of sizes, keys
and offsets as parametrization, and every assertion says what was expected.
The semantics are those of shared/spec/memop-cmpxchg.md; where the two ABIs
differ (what the old buffer holds after an error) the expectation is
written per ABI in :func:`old_after`.

The functions listed in :data:`CORE_CASES` take only a rig and table values,
so test_kvm_backend.py runs them against a real KVM VM too.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import MemopRig

from indicators.abi import PAGE_SIZE
from indicators.memop import (
    CmpxchgResult,
    FaultInjector,
    MemopError,
    ProgramException,
    TransientError,
)

SIZES = (1, 2, 4, 8, 16)
#: Every (size, offset) of an aligned access inside a 16-byte area.
ALIGNED = [(size, offset) for size in SIZES for offset in range(0, 16, size)]
#: Every (size, offset) of a misaligned one.
MISALIGNED = [(size, offset) for size in SIZES[1:] for offset in range(1, 16) if offset % size]
BAD_SIZES = (3, 5, 6, 7, *range(9, 16), *range(17, 32))

KEYED_PAGE = 1 * PAGE_SIZE
AREA = KEYED_PAGE + 0x100  # the 16 bytes under test, with 16 bytes of margin each side
READONLY_PAGE = 3 * PAGE_SIZE
SCRATCH_PAGE = 5 * PAGE_SIZE  # flags shared with forked children

ACC = 9
SKEY_ACC9 = 0x90
SKEY_ACC9_FP = 0x98
R, C = 0x04, 0x02
#: Access keys that do not match ACC 9.
OTHER_KEYS = (1, 3, 8, 10, 15)
#: name -> (access key passed, storage key of the page): all three may store.
MATCHING = {
    "no key": (None, SKEY_ACC9_FP),
    "key 0": (0, SKEY_ACC9_FP),
    "matching key": (ACC, SKEY_ACC9_FP),
}

#: The kernel's limit on rounds lost to neighbouring bytes (spec, not the code's constant).
NEIGHBOUR_ROUNDS = 128


# ------------------------------------------------------------------ helpers


def old_after(rig: MemopRig, outcome: str, old: int, *, last_seen: int | None = None) -> int:
    """What the caller's old buffer holds after an error ``outcome``, per ABI.

    Upstream zeroes it on protection and leaves the last value seen on
    EAGAIN; v5 copies a value back only on a failed compare.
    """
    if rig.abi == "v5":
        return old
    if outcome == "protection":
        return 0
    if outcome == "eagain":
        return old if last_seen is None else last_seen
    return old


def fill_area(rig: MemopRig, seed: object) -> bytes:
    """Random bytes in the area and its margins; returns them."""
    data = random.Random(str(seed)).randbytes(48)
    rig.poke(AREA - 16, data)
    return data


def area(rig: MemopRig) -> bytes:
    return rig.peek(AREA - 16, 48)


def value_at(data: bytes, offset: int, size: int) -> int:
    """The big-endian value at ``offset`` of the area in a :func:`area` snapshot."""
    return int.from_bytes(data[16 + offset : 16 + offset + size], "big")


def other_value(value: int, size: int, seed: object) -> int:
    """A value of ``size`` bytes different from ``value`` in every byte."""
    rng = random.Random(str(seed))
    return int.from_bytes(bytes(b ^ rng.randrange(1, 256) for b in value.to_bytes(size, "big")))


def expect_memop_error(code: int, call: Callable[[], object]) -> MemopError:
    with pytest.raises(MemopError) as info:
        call()
    assert not isinstance(info.value, ProgramException), (
        f"expected errno {errno.errorcode[code]}, got {info.value}"
    )
    assert info.value.errno == code, f"expected errno {errno.errorcode[code]}, got {info.value}"
    return info.value


def expect_program(code: int, call: Callable[[], object]) -> ProgramException:
    with pytest.raises(ProgramException) as info:
        call()
    assert info.value.code == code, f"expected program exception {code}, got {info.value}"
    assert info.value.errno is None, "a program exception carries no errno"
    return info.value


def needs_emulation(rig: MemopRig) -> Any:
    if rig.emulated is None:
        pytest.skip("needs the emulation behind the backend")
    return rig.emulated


# ------------------------------------------------ outcome: exchanged (selftest)


@pytest.mark.parametrize("mode", MATCHING)
@pytest.mark.parametrize(("size", "offset"), ALIGNED)
def test_cmpxchg_exchange_touches_exactly_size_bytes(
    memop_rig: MemopRig, mode: str, size: int, offset: int
) -> None:
    key, skey = MATCHING[mode]
    memop_rig.set_storage_key(KEYED_PAGE, skey)
    before = fill_area(memop_rig, (size, offset))
    old = value_at(before, offset, size)
    new = other_value(old, size, (size, offset, "new"))

    result = memop_rig.backend.cmpxchg(AREA + offset, size, old, new, key)

    assert result == CmpxchgResult(True, old), f"expected an exchange reporting old {old:#x}"
    expected = bytearray(before)
    expected[16 + offset : 16 + offset + size] = new.to_bytes(size, "big")
    assert area(memop_rig) == bytes(expected), f"expected exactly bytes {offset}..+{size} changed"


@pytest.mark.parametrize("mode", MATCHING)
@pytest.mark.parametrize(("size", "offset"), ALIGNED)
def test_cmpxchg_mismatching_old_fails_and_reports_memory(
    memop_rig: MemopRig, mode: str, size: int, offset: int
) -> None:
    key, skey = MATCHING[mode]
    memop_rig.set_storage_key(KEYED_PAGE, skey)
    before = fill_area(memop_rig, (size, offset, "mismatch"))
    current = value_at(before, offset, size)
    for byte in range(size):  # a difference in any one byte must fail the compare
        wrong = current ^ (0x01 << (8 * byte))
        result = memop_rig.backend.cmpxchg(AREA + offset, size, wrong, wrong ^ 0xFF, key)
        assert result == CmpxchgResult(False, current), (
            f"expected a failed compare reporting the memory value {current:#x}"
        )
        assert area(memop_rig) == before, "expected memory unchanged by a failed compare"


def test_cmpxchg_values_are_big_endian(memop_rig: MemopRig) -> None:
    memop_rig.poke(AREA, bytes(16))
    for size in SIZES:
        value = int.from_bytes(bytes(range(1, size + 1)), "big")
        assert memop_rig.backend.cmpxchg(AREA, size, 0, value).exchanged
        assert memop_rig.peek(AREA, size) == bytes(range(1, size + 1)), (
            f"expected the guest's byte order for size {size}"
        )
        assert memop_rig.backend.cmpxchg(AREA, size, value, 0).exchanged


# ------------------------------------------------------ outcome: key protection


@pytest.mark.parametrize("skey", [SKEY_ACC9, SKEY_ACC9_FP], ids=["F=0", "F=1"])
@pytest.mark.parametrize("key", OTHER_KEYS)
@pytest.mark.parametrize("size", SIZES)
def test_cmpxchg_mismatching_key_is_protection(
    memop_rig: MemopRig, skey: int, key: int, size: int
) -> None:
    memop_rig.set_storage_key(KEYED_PAGE, skey)
    before = fill_area(memop_rig, (skey, key, size))
    old = value_at(before, 0, size)

    exc = expect_program(4, lambda: memop_rig.backend.cmpxchg(AREA, size, old, old ^ 1, key))

    assert exc.old == old_after(memop_rig, "protection", old), (
        f"expected the old buffer {'unchanged' if memop_rig.abi == 'v5' else 'zeroed'}"
    )
    assert area(memop_rig) == before, "expected memory unchanged by a protected cmpxchg"
    assert memop_rig.get_storage_key(KEYED_PAGE) == skey, "expected no R/C: nothing was accessed"


# -------------------------------------------------------- storage keys R and C


@pytest.mark.parametrize("mode", MATCHING)
@pytest.mark.parametrize("size", SIZES)
def test_cmpxchg_store_sets_reference_and_change(memop_rig: MemopRig, mode: str, size: int) -> None:
    key, skey = MATCHING[mode]
    memop_rig.set_storage_key(KEYED_PAGE, skey)
    old = value_at(fill_area(memop_rig, size), 0, size)

    assert memop_rig.backend.cmpxchg(AREA, size, old, old ^ 1, key).exchanged

    assert memop_rig.get_storage_key(KEYED_PAGE) == skey | R | C, "expected R and C set"


@pytest.mark.parametrize("size", SIZES)
def test_cmpxchg_failed_compare_sets_reference_only(memop_rig: MemopRig, size: int) -> None:
    memop_rig.set_storage_key(KEYED_PAGE, SKEY_ACC9)
    old = value_at(fill_area(memop_rig, size), 0, size)

    assert not memop_rig.backend.cmpxchg(AREA, size, old ^ 1, old, ACC).exchanged

    assert memop_rig.get_storage_key(KEYED_PAGE) == SKEY_ACC9 | R, "expected R set, C clear"


def test_read_sets_reference_and_write_sets_change(memop_rig: MemopRig) -> None:
    memop_rig.set_storage_key(KEYED_PAGE, SKEY_ACC9)
    memop_rig.backend.read(AREA, 8, ACC)
    assert memop_rig.get_storage_key(KEYED_PAGE) == SKEY_ACC9 | R, "expected R after a fetch"
    memop_rig.set_storage_key(KEYED_PAGE, SKEY_ACC9)
    memop_rig.backend.write(AREA, b"\x01", ACC)
    assert memop_rig.get_storage_key(KEYED_PAGE) == SKEY_ACC9 | R | C, "expected R, C on a store"


# ----------------------------------------------------------- outcome: addressing


def past_end(rig: MemopRig) -> dict[str, int]:
    return {
        "first byte past memory": rig.memory_size,
        "a page past memory": rig.memory_size + PAGE_SIZE,
        "top of the address space": (1 << 64) - 16,
    }


PAST_END = ("first byte past memory", "a page past memory", "top of the address space")


@pytest.mark.parametrize("where", PAST_END)
@pytest.mark.parametrize("size", SIZES)
def test_cmpxchg_past_memory_is_addressing(memop_rig: MemopRig, where: str, size: int) -> None:
    gaddr = past_end(memop_rig)[where]
    before = area(memop_rig)

    exc = expect_program(5, lambda: memop_rig.backend.cmpxchg(gaddr, size, 1, 0))

    assert exc.old == 1, "expected the old buffer untouched by an addressing exception"
    assert area(memop_rig) == before


@pytest.mark.parametrize("size", SIZES[1:])
def test_cmpxchg_misaligned_and_unbacked_is_addressing(memop_rig: MemopRig, size: int) -> None:
    expect_program(5, lambda: memop_rig.backend.cmpxchg(memop_rig.memory_size + 1, size, 0, 0))


@pytest.mark.parametrize("size", [3, 7, 12])
def test_cmpxchg_bad_size_and_unbacked_is_addressing(memop_rig: MemopRig, size: int) -> None:
    expect_program(5, lambda: memop_rig.backend.cmpxchg(memop_rig.memory_size, size, 0, 0))


# ------------------------------------------------------------------- validation


@pytest.mark.parametrize("size", [0, *BAD_SIZES])
def test_cmpxchg_invalid_size_is_einval(memop_rig: MemopRig, size: int) -> None:
    before = fill_area(memop_rig, size)
    exc = expect_memop_error(errno.EINVAL, lambda: memop_rig.backend.cmpxchg(AREA, size, 0, 1))
    assert exc.old == 0, "expected the old buffer untouched"
    assert area(memop_rig) == before, "expected memory unchanged"


@pytest.mark.parametrize("size", [65537, 1 << 20, 1 << 32, 1 << 40])
def test_cmpxchg_size_over_65536_is_e2big(memop_rig: MemopRig, size: int) -> None:
    expect_memop_error(errno.E2BIG, lambda: memop_rig.backend.cmpxchg(AREA, size, 0, 0))


def test_cmpxchg_size_65536_is_einval(memop_rig: MemopRig) -> None:
    expect_memop_error(errno.EINVAL, lambda: memop_rig.backend.cmpxchg(AREA, 65536, 0, 0))


def test_cmpxchg_negative_size_is_einval(memop_rig: MemopRig) -> None:
    expect_memop_error(errno.EINVAL, lambda: memop_rig.backend.cmpxchg(AREA, -8, 0, 0))


@pytest.mark.parametrize(("size", "offset"), MISALIGNED)
def test_cmpxchg_misaligned_is_einval(memop_rig: MemopRig, size: int, offset: int) -> None:
    before = fill_area(memop_rig, (size, offset))
    old = value_at(before, offset, size)
    expect_memop_error(
        errno.EINVAL, lambda: memop_rig.backend.cmpxchg(AREA + offset, size, old, old ^ 1)
    )
    assert area(memop_rig) == before, "expected memory unchanged"


@pytest.mark.parametrize("key", [16, 17, 255, 256, -1])
def test_cmpxchg_key_over_15_is_einval(memop_rig: MemopRig, key: int) -> None:
    expect_memop_error(errno.EINVAL, lambda: memop_rig.backend.cmpxchg(AREA, 8, 0, 0, key))


@pytest.mark.parametrize("size", SIZES)
def test_cmpxchg_read_only_memslot_is_eopnotsupp(memop_rig: MemopRig, size: int) -> None:
    needs_emulation(memop_rig).set_readonly(READONLY_PAGE, PAGE_SIZE)
    memop_rig.poke(READONLY_PAGE, bytes(16))
    exc = expect_memop_error(
        errno.EOPNOTSUPP, lambda: memop_rig.backend.cmpxchg(READONLY_PAGE, size, 0, 1)
    )
    assert exc.old == 0
    assert memop_rig.peek(READONLY_PAGE, 16) == bytes(16), "expected memory unchanged"


def _order_cases() -> dict[str, tuple[dict[str, int | None], str, int]]:
    """name -> (cmpxchg arguments, expected kind, code); gaddr is symbolic."""
    return {
        "E2BIG before key": ({"size": 65537, "key": 16}, "errno", errno.E2BIG),
        "E2BIG before addressing": ({"size": 65537, "where": 1}, "errno", errno.E2BIG),
        "size over 16 before addressing": ({"size": 17, "where": 1}, "errno", errno.EINVAL),
        "key before addressing": ({"size": 8, "key": 16, "where": 1}, "errno", errno.EINVAL),
        "addressing before alignment": ({"size": 8, "where": 1, "offset": 1}, "pgm", 5),
        "addressing before size 1/2/4/8/16": ({"size": 3, "where": 1}, "pgm", 5),
        "alignment before read-only": ({"size": 8, "where": 2, "offset": 4}, "errno", errno.EINVAL),
        "size 1/2/4/8/16 before read-only": ({"size": 3, "where": 2}, "errno", errno.EINVAL),
        "read-only before protection": (
            {"size": 8, "where": 2, "key": 3},
            "errno",
            errno.EOPNOTSUPP,
        ),
        "protection before compare": ({"size": 8, "key": 3, "wrong_old": 1}, "pgm", 4),
    }


ORDER = _order_cases()


@pytest.mark.parametrize("case", ORDER)
def test_cmpxchg_validation_order(memop_rig: MemopRig, case: str) -> None:
    args, kind, code = ORDER[case]
    where = args.get("where", 0)
    if where == 2:
        needs_emulation(memop_rig).set_readonly(READONLY_PAGE, PAGE_SIZE)
        memop_rig.set_storage_key(READONLY_PAGE, SKEY_ACC9)
    memop_rig.set_storage_key(KEYED_PAGE, SKEY_ACC9)
    base = {0: AREA, 1: memop_rig.memory_size, 2: READONLY_PAGE}[where]
    gaddr = base + (args.get("offset") or 0)
    size = args["size"] or 0
    old = 1 if args.get("wrong_old") else 0
    call = lambda: memop_rig.backend.cmpxchg(gaddr, size, old, 0, args.get("key"))  # noqa: E731
    if kind == "pgm":
        expect_program(code, call)
    else:
        expect_memop_error(code, call)


@contextmanager
def no_access(rig: MemopRig, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Assert the block touches neither memory, storage keys nor (for KVM) the ioctl."""
    before = rig.peek(0, rig.memory_size)
    keys = [rig.get_storage_key(page * PAGE_SIZE) for page in range(rig.memory_size // PAGE_SIZE)]
    ioctls: list[int] = []
    inner = getattr(rig.backend, "_ioctl", None)
    if inner is not None:

        def counting(fd: int, request: int, arg: int) -> int:
            ioctls.append(request)
            return inner(fd, request, arg)

        monkeypatch.setattr(rig.backend, "_ioctl", counting)
    yield
    assert rig.peek(0, rig.memory_size) == before, "expected memory untouched"
    assert [rig.get_storage_key(p * PAGE_SIZE) for p in range(len(keys))] == keys, (
        "expected storage keys untouched"
    )
    assert not ioctls, f"expected no ioctl, saw {ioctls}"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("which", ["old", "new"])
@pytest.mark.parametrize("value", ["negative", "one too big"])
@pytest.mark.parametrize("where", ["valid", "unbacked, misaligned, key 16"])
def test_cmpxchg_value_that_does_not_fit_is_valueerror_first(
    memop_rig: MemopRig,
    monkeypatch: pytest.MonkeyPatch,
    size: int,
    which: str,
    value: str,
    where: str,
) -> None:
    bad = -1 if value == "negative" else 1 << (8 * size)
    old, new = (bad, 0) if which == "old" else (0, bad)
    memop_rig.poke(AREA, bytes(16))
    # Otherwise fine, or failing every later check: the ValueError comes first.
    gaddr, key = (AREA, None) if where == "valid" else (memop_rig.memory_size + 1, 16)
    with no_access(memop_rig, monkeypatch), pytest.raises(ValueError, match=which):
        memop_rig.backend.cmpxchg(gaddr, size, old, new, key)


@pytest.mark.parametrize("gaddr", [-1, -PAGE_SIZE, 1 << 64, (1 << 64) + 16])
def test_cmpxchg_gaddr_outside_64_bits_is_valueerror_first(
    memop_rig: MemopRig, monkeypatch: pytest.MonkeyPatch, gaddr: int
) -> None:
    with no_access(memop_rig, monkeypatch), pytest.raises(ValueError, match="gaddr"):
        memop_rig.backend.cmpxchg(gaddr, 0, -1, -1, 16)


# ----------------------------------------------- what the old buffer holds, per ABI


def test_error_old_value_per_abi(memop_rig: MemopRig) -> None:
    """One row per error outcome: upstream zeroes on protection, v5 never writes."""
    emulated = needs_emulation(memop_rig)
    memop_rig.set_storage_key(KEYED_PAGE, SKEY_ACC9)
    memop_rig.poke(AREA, bytes([0x5A] * 16))
    cmpxchg = memop_rig.backend.cmpxchg
    rows: list[tuple[str, Callable[[], object], int]] = [
        ("protection", lambda: cmpxchg(AREA, 8, 0x5A5A5A5A5A5A5A5A, 0, 3), 0x5A5A5A5A5A5A5A5A),
        ("addressing", lambda: cmpxchg(memop_rig.memory_size, 4, 0x11223344, 0), 0x11223344),
        ("einval", lambda: cmpxchg(AREA + 1, 4, 0x11223344, 0), 0x11223344),
    ]
    for outcome, call, old in rows:
        with pytest.raises(MemopError) as info:
            call()
        assert info.value.old == old_after(memop_rig, outcome, old), (
            f"{outcome} ({memop_rig.abi}): expected old {old_after(memop_rig, outcome, old):#x}"
        )
    emulated.faults = FaultInjector(eagain_probability=1.0)
    with pytest.raises(TransientError) as eagain:
        cmpxchg(AREA, 1, 0x5A, 0)
    assert eagain.value.old == old_after(memop_rig, "eagain", 0x5A)


# ------------------------------------------------------- outcome: transient EAGAIN


@contextmanager
def neighbour_interference(
    rig: MemopRig,
    monkeypatch: pytest.MonkeyPatch,
    gaddr: int,
    size: int,
    plan: Callable[[int], str],
) -> Iterator[list[int]]:
    """Before CAS attempt ``n`` (from 1) on the word holding ``gaddr``, do ``plan(n)``.

    ``plan`` returns "neighbour" (change a byte next to the target in the same
    word), "target" (change the target) or "" (leave the word alone).  Yields
    the list of attempt numbers, filled as the backend runs.
    """
    emulated = needs_emulation(rig)
    memory = emulated.memory
    real = memory.atomics
    word = gaddr & ~3
    neighbour = next(b for b in range(word, word + 4) if not gaddr <= b < gaddr + size)
    attempts: list[int] = []

    def interfering_cas(at: int, expected: int, desired: int) -> tuple[bool, int]:
        attempts.append(len(attempts) + 1)
        action = plan(len(attempts))
        if action:
            victim = neighbour if action == "neighbour" else gaddr
            memory.write(victim, bytes([memory.read(victim, 1)[0] ^ 0xFF]))
        return real.cas[4](at, expected, desired)

    fake = SimpleNamespace(cas={**real.cas, 4: interfering_cas}, load=real.load)
    monkeypatch.setattr(memory, "atomics", fake)
    yield attempts


TRANSIENT = [(size, offset) for size in (1, 2) for offset in range(0, 4, size)]


@pytest.mark.parametrize(("size", "offset"), TRANSIENT)
def test_cmpxchg_neighbour_changes_for_128_rounds_are_transient(
    memop_rig: MemopRig, monkeypatch: pytest.MonkeyPatch, size: int, offset: int
) -> None:
    gaddr = AREA + offset
    old = value_at(fill_area(memop_rig, (size, offset)), offset, size)
    always = lambda n: "neighbour"  # noqa: E731
    with (
        neighbour_interference(memop_rig, monkeypatch, gaddr, size, always) as tries,
        pytest.raises(TransientError) as info,
    ):
        memop_rig.backend.cmpxchg(gaddr, size, old, old ^ 1)
    assert info.value.errno == errno.EAGAIN
    assert len(tries) == NEIGHBOUR_ROUNDS, (
        f"expected {NEIGHBOUR_ROUNDS} CS attempts, not {len(tries)}"
    )
    assert value_at(area(memop_rig), offset, size) == old, "expected the target bytes unchanged"
    assert info.value.old == old_after(memop_rig, "eagain", old), (
        "expected the last value seen (the target still held old)"
    )


@pytest.mark.parametrize(("size", "offset"), TRANSIENT)
def test_cmpxchg_neighbour_changes_for_127_rounds_still_exchange(
    memop_rig: MemopRig, monkeypatch: pytest.MonkeyPatch, size: int, offset: int
) -> None:
    gaddr = AREA + offset
    old = value_at(fill_area(memop_rig, (size, offset)), offset, size)
    plan = lambda n: "neighbour" if n < NEIGHBOUR_ROUNDS else ""  # noqa: E731
    with neighbour_interference(memop_rig, monkeypatch, gaddr, size, plan) as tries:
        result = memop_rig.backend.cmpxchg(gaddr, size, old, old ^ 1)
    assert result == CmpxchgResult(True, old), "expected the last allowed round to exchange"
    assert len(tries) == NEIGHBOUR_ROUNDS
    assert value_at(area(memop_rig), offset, size) == old ^ 1


@pytest.mark.parametrize(("size", "offset"), TRANSIENT)
def test_cmpxchg_target_change_on_the_last_round_is_a_failed_compare(
    memop_rig: MemopRig, monkeypatch: pytest.MonkeyPatch, size: int, offset: int
) -> None:
    gaddr = AREA + offset
    old = value_at(fill_area(memop_rig, (size, offset)), offset, size)
    plan = lambda n: "neighbour" if n < NEIGHBOUR_ROUNDS else "target"  # noqa: E731
    with neighbour_interference(memop_rig, monkeypatch, gaddr, size, plan):
        result = memop_rig.backend.cmpxchg(gaddr, size, old, old ^ 1)
    changed = value_at(area(memop_rig), offset, size)
    assert changed != old
    assert result == CmpxchgResult(False, changed), (
        "expected a failed compare, not EAGAIN, when the target itself changed"
    )


@pytest.mark.parametrize("size", [1, 2])
def test_cmpxchg_concurrent_neighbour_writer_causes_transient_error(
    memop_rig: MemopRig, size: int
) -> None:
    """A forked process hammers the neighbour byte of the target's word until EAGAIN."""
    emulated = needs_emulation(memop_rig)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs: the writer must run while the cmpxchg loops")
    # The child stores with plain byte writes, as a guest's non-interlocked store would.
    view = (ctypes.c_uint8 * memop_rig.memory_size).from_address(emulated.memory.base)
    target, neighbour, stop, report = AREA, AREA + 3, SCRATCH_PAGE, SCRATCH_PAGE + 8
    memop_rig.poke(AREA, bytes(4))
    memop_rig.poke(SCRATCH_PAGE, bytes(16))
    pid = os.fork()
    if pid == 0:  # child: count in the neighbour byte until told to stop
        count = 0
        try:
            os.sched_setaffinity(0, {cpus[1]})  # never sharing a CPU with the cmpxchg loop
            for count in itertools.count(1):
                view[neighbour] = count & 0xFF
                if not count & 0x3FF and view[stop]:
                    break
            view[report : report + 8] = count.to_bytes(8, "big")
        finally:
            os._exit(0)
    os.sched_setaffinity(0, {cpus[0]})
    try:
        exchanges, transients, value = 0, 0, 0
        deadline = time.monotonic() + 20
        while not transients and time.monotonic() < deadline:
            nxt = (value + 1) & ((1 << (8 * size)) - 1)
            try:
                result = memop_rig.backend.cmpxchg(target, size, value, nxt)
            except TransientError as exc:
                transients += 1
                assert exc.old == value, "expected EAGAIN only while the target still held old"
                continue
            assert result == CmpxchgResult(True, value), "no one else writes the target"
            value, exchanges = nxt, exchanges + 1
    finally:
        os.sched_setaffinity(0, cpus)
        view[stop] = 1
        os.waitpid(pid, 0)
    written = int.from_bytes(view[report : report + 8], "big")
    assert transients, f"expected a TransientError within 20 s ({exchanges} exchanges)"
    assert value_at(area(memop_rig), 0, size) == value, "expected every exchange kept"
    assert memop_rig.peek(neighbour, 1)[0] == written & 0xFF, "expected the neighbour's last store"


# ------------------------------------------------------------------ concurrency


def _rotate(value: int, size: int) -> int:
    bits = 8 * size
    return ((value << 1) | (value >> (bits - 1))) & ((1 << bits) - 1)


def _rotator(rig: MemopRig, size: int, offset: int, seconds: float, failed: list[int]) -> None:
    """Rotate the field at ``AREA + offset`` left by one bit until ``seconds`` pass.

    Appends the number of failed compares (lost races) to ``failed``.
    """
    old, misses = 0, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            result = rig.backend.cmpxchg(AREA + offset, size, old, _rotate(old, size))
        except TransientError:
            continue
        if result.exchanged:
            old = _rotate(old, size)
        else:
            old, misses = result.old, misses + 1
    failed.append(misses)


def test_cmpxchg_concurrent_rotation_preserves_popcount(memop_rig: MemopRig) -> None:
    """Threads here and a forked process rotate bits of overlapping fields of all sizes."""
    pattern = bytes.fromhex("f00f0ff0a55a3cc3 0123456789abcdef")
    memop_rig.poke(AREA, pattern)
    popcount = int.from_bytes(pattern).bit_count()
    workers = [(1, 3), (2, 6), (4, 4), (8, 8), (16, 0), (1, 12), (4, 0)]
    seconds = 0.3
    pid = os.fork()
    if pid == 0:
        try:
            child = [
                threading.Thread(target=_rotator, args=(memop_rig, size, offset, seconds, []))
                for size, offset in [(8, 0), (2, 14), (1, 7)]
            ]
            for thread in child:
                thread.start()
            for thread in child:
                thread.join()
        finally:
            os._exit(0)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # make the threads interleave between bytecodes
    failed: list[int] = []
    try:
        threads = [
            threading.Thread(target=_rotator, args=(memop_rig, size, offset, seconds, failed))
            for size, offset in workers
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
        _, status = os.waitpid(pid, 0)
    assert status == 0
    assert sum(failed), "expected the workers to race (some compares to fail)"
    after = memop_rig.peek(AREA, 16)
    assert int.from_bytes(after).bit_count() == popcount, (
        f"expected popcount {popcount} kept (no lost or torn update), memory {after.hex()}"
    )


# -------------------------------------------------- read / write key protection

FETCH = [
    # storage key, access key, protected?
    (SKEY_ACC9, None, False),
    (SKEY_ACC9, 0, False),
    (SKEY_ACC9, ACC, False),
    (SKEY_ACC9, 3, False),  # F clear: any key may fetch
    (SKEY_ACC9_FP, None, False),
    (SKEY_ACC9_FP, 0, False),
    (SKEY_ACC9_FP, ACC, False),
    (SKEY_ACC9_FP, 3, True),
    (SKEY_ACC9_FP, 15, True),
]
STORE = [
    (SKEY_ACC9, None, False),
    (SKEY_ACC9, 0, False),
    (SKEY_ACC9, ACC, False),
    (SKEY_ACC9, 3, True),  # a store needs ACC == key whatever F is
    (SKEY_ACC9_FP, 3, True),
    (SKEY_ACC9_FP, ACC, False),
]


@pytest.mark.parametrize(("skey", "key", "protected"), FETCH)
def test_read_fetch_protection(
    memop_rig: MemopRig, skey: int, key: int | None, protected: bool
) -> None:
    memop_rig.set_storage_key(KEYED_PAGE, skey)
    data = fill_area(memop_rig, (skey, key))
    if protected:
        expect_program(4, lambda: memop_rig.backend.read(AREA - 16, 48, key))
        assert memop_rig.get_storage_key(KEYED_PAGE) == skey, "expected no R on a refused fetch"
    else:
        assert memop_rig.backend.read(AREA - 16, 48, key) == data


@pytest.mark.parametrize(("skey", "key", "protected"), STORE)
def test_write_store_protection(
    memop_rig: MemopRig, skey: int, key: int | None, protected: bool
) -> None:
    memop_rig.set_storage_key(KEYED_PAGE, skey)
    before = fill_area(memop_rig, (skey, key))
    if protected:
        expect_program(4, lambda: memop_rig.backend.write(AREA, b"\xee" * 8, key))
        assert area(memop_rig) == before, "expected memory unchanged"
    else:
        memop_rig.backend.write(AREA, b"\xee" * 8, key)
        assert memop_rig.peek(AREA, 8) == b"\xee" * 8


@pytest.mark.parametrize(("skey", "protected"), [(SKEY_ACC9, False), (SKEY_ACC9_FP, True)])
def test_read_spanning_into_a_fetch_protected_page(
    memop_rig: MemopRig, skey: int, protected: bool
) -> None:
    memop_rig.set_storage_key(KEYED_PAGE, 0x30)
    memop_rig.set_storage_key(KEYED_PAGE + PAGE_SIZE, skey)
    call = lambda: memop_rig.backend.read(KEYED_PAGE + PAGE_SIZE - 8, 16, 3)  # noqa: E731
    if protected:
        expect_program(4, call)
    else:
        assert len(call()) == 16  # type: ignore[arg-type]


def test_read_write_past_memory_is_addressing(memop_rig: MemopRig) -> None:
    end = memop_rig.memory_size
    expect_program(5, lambda: memop_rig.backend.read(end - 4, 8))
    expect_program(5, lambda: memop_rig.backend.write(end - 4, bytes(8)))
    assert memop_rig.peek(end - 4, 4) == bytes(4), "expected no partial store"


@pytest.mark.parametrize(("size", "code"), [(0, errno.EINVAL), (65537, errno.E2BIG)])
def test_read_write_size_validation(memop_rig: MemopRig, size: int, code: int) -> None:
    expect_memop_error(code, lambda: memop_rig.backend.read(AREA, size))
    expect_memop_error(code, lambda: memop_rig.backend.write(AREA, bytes(size)))


def test_read_write_key_over_15_is_einval(memop_rig: MemopRig) -> None:
    expect_memop_error(errno.EINVAL, lambda: memop_rig.backend.read(AREA, 8, 16))
    expect_memop_error(errno.EINVAL, lambda: memop_rig.backend.write(AREA, bytes(8), 16))


def test_read_only_memslot_refuses_writes_only(memop_rig: MemopRig) -> None:
    needs_emulation(memop_rig).set_readonly(READONLY_PAGE, PAGE_SIZE)
    memop_rig.poke(READONLY_PAGE, b"\x42" * 8)
    assert memop_rig.backend.read(READONLY_PAGE, 8) == b"\x42" * 8
    expect_memop_error(errno.EOPNOTSUPP, lambda: memop_rig.backend.write(READONLY_PAGE, bytes(8)))
    assert memop_rig.peek(READONLY_PAGE, 8) == b"\x42" * 8


# ------------------------------------------- check(): F_CHECK_ONLY, nothing touched


def keys_of(rig: MemopRig) -> list[int]:
    return [rig.get_storage_key(page * PAGE_SIZE) for page in range(rig.memory_size // PAGE_SIZE)]


@contextmanager
def untouched(rig: MemopRig) -> Iterator[None]:
    """Assert the block changes neither memory nor any storage key (R and C included)."""
    memory, keys = rig.peek(0, rig.memory_size), keys_of(rig)
    yield
    assert rig.peek(0, rig.memory_size) == memory, "expected memory untouched by a check"
    assert keys_of(rig) == keys, "expected no R or C set by a check"


@pytest.mark.parametrize(("skey", "key", "protected"), STORE)
def test_check_store_protection(
    memop_rig: MemopRig, skey: int, key: int | None, protected: bool
) -> None:
    memop_rig.set_storage_key(KEYED_PAGE, skey)
    fill_area(memop_rig, ("check", skey, key))
    with untouched(memop_rig):
        if protected:
            expect_program(4, lambda: memop_rig.backend.check(AREA, 8, key))
        else:
            memop_rig.backend.check(AREA, 8, key)


@pytest.mark.parametrize("skey", [SKEY_ACC9, SKEY_ACC9_FP], ids=["F=0", "F=1"])
@pytest.mark.parametrize("key", OTHER_KEYS)
def test_check_store_mismatching_key_is_protection_whatever_f(
    memop_rig: MemopRig, skey: int, key: int
) -> None:
    memop_rig.set_storage_key(KEYED_PAGE, skey)
    with untouched(memop_rig):
        expect_program(4, lambda: memop_rig.backend.check(AREA, 16, key, store=True))


@pytest.mark.parametrize(("skey", "key", "protected"), FETCH)
def test_check_fetch_protection(
    memop_rig: MemopRig, skey: int, key: int | None, protected: bool
) -> None:
    memop_rig.set_storage_key(KEYED_PAGE, skey)
    with untouched(memop_rig):
        if protected:
            expect_program(4, lambda: memop_rig.backend.check(AREA, 8, key, store=False))
        else:
            memop_rig.backend.check(AREA, 8, key, store=False)


@pytest.mark.parametrize(("skey", "protected"), [(SKEY_ACC9, False), (SKEY_ACC9_FP, True)])
def test_check_fetch_spanning_into_a_fetch_protected_page(
    memop_rig: MemopRig, skey: int, protected: bool
) -> None:
    memop_rig.set_storage_key(KEYED_PAGE, 0x30)
    memop_rig.set_storage_key(KEYED_PAGE + PAGE_SIZE, skey)
    call = lambda: memop_rig.backend.check(KEYED_PAGE + PAGE_SIZE - 8, 16, 3, store=False)  # noqa: E731
    with untouched(memop_rig):
        if protected:
            expect_program(4, call)
        else:
            call()


@pytest.mark.parametrize("store", [True, False], ids=["store", "fetch"])
@pytest.mark.parametrize("key", [None, 0, ACC])
@pytest.mark.parametrize("where", PAST_END)
def test_check_first_byte_past_memory_is_addressing(
    memop_rig: MemopRig, store: bool, key: int | None, where: str
) -> None:
    gaddr = past_end(memop_rig)[where]
    with untouched(memop_rig):
        expect_program(5, lambda: memop_rig.backend.check(gaddr, 8, key, store=store))


@pytest.mark.parametrize("store", [True, False], ids=["store", "fetch"])
@pytest.mark.parametrize(("key", "addressing"), [(None, False), (0, False), (ACC, True)])
def test_check_range_running_past_memory_is_addressing_only_with_a_key(
    memop_rig: MemopRig, store: bool, key: int | None, addressing: bool
) -> None:
    """kvm_s390_vm_mem_op_abs tests the first byte; only a non-zero key walks the pages."""
    last = memop_rig.memory_size - PAGE_SIZE
    memop_rig.set_storage_key(last, SKEY_ACC9)
    call = lambda: memop_rig.backend.check(memop_rig.memory_size - 8, 16, key, store=store)  # noqa: E731
    with untouched(memop_rig):
        if addressing:
            expect_program(5, call)
        else:
            call()


@pytest.mark.parametrize("store", [True, False], ids=["store", "fetch"])
@pytest.mark.parametrize(("key", "addressing"), [(None, False), (0, False), (ACC, True)])
def test_check_read_only_memslot_is_addressing_only_with_a_key(
    memop_rig: MemopRig, store: bool, key: int | None, addressing: bool
) -> None:
    """vm_check_access_key's gfn_to_hva asks for a writable mapping, even for a fetch."""
    needs_emulation(memop_rig).set_readonly(READONLY_PAGE, PAGE_SIZE)
    memop_rig.set_storage_key(READONLY_PAGE, SKEY_ACC9)
    call = lambda: memop_rig.backend.check(READONLY_PAGE, 8, key, store=store)  # noqa: E731
    with untouched(memop_rig):
        if addressing:
            expect_program(5, call)
        else:
            call()


@pytest.mark.parametrize("store", [True, False], ids=["store", "fetch"])
@pytest.mark.parametrize(
    ("size", "key", "code"),
    [
        (0, None, errno.EINVAL),
        (-4, None, errno.EINVAL),
        (65537, None, errno.E2BIG),
        (8, 16, errno.EINVAL),
        (8, 255, errno.EINVAL),
    ],
)
def test_check_size_and_key_validation(
    memop_rig: MemopRig, store: bool, size: int, key: int | None, code: int
) -> None:
    with untouched(memop_rig):
        expect_memop_error(code, lambda: memop_rig.backend.check(AREA, size, key, store=store))


def test_check_validation_comes_before_addressing(memop_rig: MemopRig) -> None:
    end = memop_rig.memory_size
    expect_memop_error(errno.E2BIG, lambda: memop_rig.backend.check(end, 65537, 16))
    expect_memop_error(errno.EINVAL, lambda: memop_rig.backend.check(end, 8, 16))


def test_check_the_largest_size_walks_every_page(memop_rig: MemopRig) -> None:
    assert memop_rig.memory_size == 65536, "the rig's memory is exactly the largest memop"
    for page in range(0, memop_rig.memory_size, PAGE_SIZE):
        memop_rig.set_storage_key(page, SKEY_ACC9)
    with untouched(memop_rig):
        memop_rig.backend.check(0, 65536, ACC)
    memop_rig.set_storage_key(memop_rig.memory_size - PAGE_SIZE, 0x30)
    with untouched(memop_rig):
        expect_program(4, lambda: memop_rig.backend.check(0, 65536, ACC))
        memop_rig.backend.check(0, 65536, ACC, store=False)  # F clear: a fetch may


def test_check_store_in_a_fault_injected_protected_range(memop_rig: MemopRig) -> None:
    faults = needs_emulation(memop_rig).faults = FaultInjector()
    faults.protect(AREA, 16)
    with untouched(memop_rig):
        expect_program(4, lambda: memop_rig.backend.check(AREA + 15, 2))
        memop_rig.backend.check(AREA, 16, store=False)
        memop_rig.backend.check(AREA + 16, 8)
    assert faults.injected["protection"] == 1


# ---------------------------------------------------------------- FaultInjector


@pytest.mark.parametrize("size", SIZES)
def test_fault_injector_eagain_always_hits_only_sizes_1_and_2(
    memop_rig: MemopRig, size: int
) -> None:
    emulated = needs_emulation(memop_rig)
    faults = emulated.faults = FaultInjector(eagain_probability=1.0)
    old = value_at(fill_area(memop_rig, size), 0, size)
    if size in (1, 2):
        with pytest.raises(TransientError) as info:
            memop_rig.backend.cmpxchg(AREA, size, old, old ^ 1)
        assert info.value.old == old
        assert value_at(area(memop_rig), 0, size) == old, "expected memory unchanged"
        assert faults.injected == {"eagain": 1, "protection": 0}
    else:
        assert memop_rig.backend.cmpxchg(AREA, size, old, old ^ 1).exchanged
        assert faults.injected == {"eagain": 0, "protection": 0}


def test_fault_injector_eagain_never_at_probability_0(memop_rig: MemopRig) -> None:
    faults = needs_emulation(memop_rig).faults = FaultInjector(eagain_probability=0.0)
    memop_rig.poke(AREA, bytes(1))
    for value in range(100):
        assert memop_rig.backend.cmpxchg(AREA, 1, value, value + 1).exchanged
    assert faults.injected["eagain"] == 0


def test_fault_injector_eagain_probability_is_seeded(memop_rig: MemopRig) -> None:
    emulated = needs_emulation(memop_rig)

    def outcomes() -> list[bool]:
        emulated.faults = FaultInjector(eagain_probability=0.5, seed=7)
        memop_rig.poke(AREA, bytes(1))
        seen = []
        for _ in range(200):
            try:
                memop_rig.backend.cmpxchg(AREA, 1, 0, 0)
                seen.append(False)
            except TransientError:
                seen.append(True)
        return seen

    first = outcomes()
    assert 60 <= sum(first) <= 140, f"expected about half of 200 to fail, {sum(first)} did"
    assert outcomes() == first, "expected the same seed to give the same faults"


def test_fault_injector_eagain_sizes_are_configurable(memop_rig: MemopRig) -> None:
    needs_emulation(memop_rig).faults = FaultInjector(
        eagain_probability=1.0, eagain_sizes=frozenset({8})
    )
    memop_rig.poke(AREA, bytes(16))
    assert memop_rig.backend.cmpxchg(AREA, 1, 0, 1).exchanged, "expected size 1 spared"
    with pytest.raises(TransientError):
        memop_rig.backend.cmpxchg(AREA + 8, 8, 0, 1)


@pytest.mark.parametrize("probability", [-0.1, 1.5])
def test_fault_injector_rejects_probability_outside_0_to_1(probability: float) -> None:
    with pytest.raises(ValueError, match="eagain_probability"):
        FaultInjector(eagain_probability=probability)


@pytest.mark.parametrize("mode", MATCHING)
def test_fault_injector_protected_range_refuses_stores(memop_rig: MemopRig, mode: str) -> None:
    key, skey = MATCHING[mode]
    emulated = needs_emulation(memop_rig)
    memop_rig.set_storage_key(KEYED_PAGE, skey)
    faults = emulated.faults = FaultInjector(eagain_probability=1.0)
    faults.protect(AREA, 16)
    before = fill_area(memop_rig, mode)
    for size, offset in ALIGNED:
        old = value_at(before, offset, size)
        with pytest.raises(ProgramException) as info:
            memop_rig.backend.cmpxchg(AREA + offset, size, old, old ^ 1, key)
        assert info.value.code == 4, f"size {size} at +{offset}: expected protection"
        assert info.value.old == old_after(memop_rig, "protection", old)
    expect_program(4, lambda: memop_rig.backend.write(AREA + 15, b"\x00\x00", key))
    assert area(memop_rig) == before, "expected memory unchanged"
    assert memop_rig.backend.read(AREA, 16, key) == before[16:32], "expected fetches allowed"
    assert faults.injected == {"eagain": 0, "protection": len(ALIGNED) + 1}
    # Just outside the range is not protected (and size 8 is not transient).
    assert memop_rig.backend.cmpxchg(AREA + 16, 8, value_at(before, 16, 8), 0, key).exchanged
    memop_rig.backend.write(AREA - 1, b"\x00", key)


# ------------------------------------------------------------- the core cases

#: (test function, its table): what test_kvm_backend runs against a real VM.
CORE_CASES: list[tuple[Callable[..., None], list[dict[str, Any]]]] = [
    (
        test_cmpxchg_exchange_touches_exactly_size_bytes,
        [{"mode": m, "size": s, "offset": o} for m in MATCHING for s, o in ALIGNED],
    ),
    (
        test_cmpxchg_mismatching_old_fails_and_reports_memory,
        [{"mode": m, "size": s, "offset": o} for m in MATCHING for s, o in ALIGNED],
    ),
    (test_cmpxchg_values_are_big_endian, [{}]),
    (
        test_cmpxchg_mismatching_key_is_protection,
        [
            {"skey": sk, "key": k, "size": s}
            for sk in (SKEY_ACC9, SKEY_ACC9_FP)
            for k in OTHER_KEYS
            for s in SIZES
        ],
    ),
    (
        test_cmpxchg_past_memory_is_addressing,
        [{"where": "first byte past memory", "size": s} for s in SIZES],
    ),
    (test_cmpxchg_misaligned_and_unbacked_is_addressing, [{"size": s} for s in SIZES[1:]]),
    (test_cmpxchg_invalid_size_is_einval, [{"size": s} for s in (0, *BAD_SIZES)]),
    (test_cmpxchg_size_over_65536_is_e2big, [{"size": 65537}]),
    (test_cmpxchg_misaligned_is_einval, [{"size": s, "offset": o} for s, o in MISALIGNED]),
    (test_cmpxchg_key_over_15_is_einval, [{"key": 16}]),
    (
        test_read_fetch_protection,
        [dict(zip(("skey", "key", "protected"), r, strict=True)) for r in FETCH],
    ),
    (
        test_write_store_protection,
        [dict(zip(("skey", "key", "protected"), r, strict=True)) for r in STORE],
    ),
]
