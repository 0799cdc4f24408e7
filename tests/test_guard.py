"""Write confinement below the engine: only configured bits may change."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from indicators.memop import EmulatedBackend, MemopBackend, MemopError, ProgramException
from indicators.memop.guard import ConfinedBackend


@pytest.fixture
def confined() -> ConfinedBackend:
    return ConfinedBackend(EmulatedBackend(1 << 16), {0x100: 0x81, 0x105: 0xFF})


def test_setting_allowed_bits_passes(confined: ConfinedBackend) -> None:
    assert confined.cmpxchg(0x100, 1, 0, 0x80).exchanged
    assert confined.cmpxchg(0x100, 8, 0x80 << 56, 0x81 << 56 | 0x42 << 16).exchanged
    assert confined.read(0x100, 8) == bytes.fromhex("8100000000420000")


@pytest.mark.parametrize(
    ("gaddr", "size", "old", "new"),
    [
        (0x100, 1, 0, 0x40),  # a bit of an allowed byte that is not allowed
        (0x101, 1, 0, 0x01),  # a byte with no allowed bit
        (0x100, 16, 0, 1),  # the last byte of the window
        (0x0F0, 16, 0, 1 << 127),
    ],
)
def test_other_bits_are_refused_and_untouched(
    confined: ConfinedBackend, gaddr: int, size: int, old: int, new: int
) -> None:
    before = confined.read(0, 0x200)
    with pytest.raises(MemopError) as info:
        confined.cmpxchg(gaddr, size, old, new)
    assert info.value.errno == errno.EPERM and "outside the configured" in str(info.value)
    assert f"{gaddr:#x}" in str(info.value)
    assert confined.read(0, 0x200) == before


def test_writes_are_confined_too(confined: ConfinedBackend) -> None:
    confined.write(0x105, b"\x7f")
    with pytest.raises(MemopError, match="outside the configured"):
        confined.write(0x104, b"\x01\x00")
    assert confined.read(0x104, 2) == b"\x00\x7f"


def test_check_is_delegated(confined: ConfinedBackend) -> None:
    inner = confined.inner
    assert isinstance(inner, EmulatedBackend)
    inner.set_storage_key(0x0, 0x98)
    confined.check(0x100, 1, 9)
    confined.check(0x100, 1, 0)
    with pytest.raises(ProgramException) as info:
        confined.check(0x100, 1, 3)
    assert info.value.code == 4
    with pytest.raises(ProgramException):
        confined.check(0x100, 8, 3, store=False)  # fetch-protected page
    assert inner.get_storage_key(0x0) == 0x98, "expected no R or C from a check"


@pytest.mark.parametrize("size", [0, -1, 17, 32, 4096])
def test_store_check_of_a_size_the_guard_cannot_check_is_refused(
    confined: ConfinedBackend, size: int
) -> None:
    with pytest.raises(MemopError) as info:
        confined.check(0x100, size, None)
    assert info.value.errno == errno.EPERM and f"store of {size} bytes" in str(info.value)


def test_fetch_check_of_any_size_is_delegated(confined: ConfinedBackend) -> None:
    confined.check(0x0, 4096, None, store=False)
    with pytest.raises(MemopError) as info:
        confined.check(0x0, 0, None, store=False)
    assert info.value.errno == errno.EINVAL


class Spy(MemopBackend):
    """Records what reaches the inner backend (a spy over a real emulation)."""

    def __init__(self, inner: MemopBackend) -> None:
        self.inner = inner
        self.forwarded: list[str] = []

    def cmpxchg(self, gaddr: int, size: int, old: int, new: int, key: int | None = None) -> Any:
        self.forwarded.append("cmpxchg")
        return self.inner.cmpxchg(gaddr, size, old, new, key)

    def read(self, gaddr: int, size: int, key: int | None = None) -> bytes:
        return self.inner.read(gaddr, size, key)

    def write(self, gaddr: int, data: bytes, key: int | None = None) -> None:
        self.forwarded.append("write")
        self.inner.write(gaddr, data, key)


@pytest.fixture
def spied() -> tuple[ConfinedBackend, Spy]:
    spy = Spy(EmulatedBackend(1 << 16))
    # Every bit of 0x100..0x13f allowed: only the size can be the reason to refuse.
    return ConfinedBackend(spy, {0x100 + n: 0xFF for n in range(64)}), spy


@pytest.mark.parametrize("size", [0, -1, -16, 3, 5, 6, 7, 9, 12, 15, 17, 32, 64, 1 << 40])
def test_cmpxchg_of_a_size_it_cannot_check_is_refused_not_forwarded(
    spied: tuple[ConfinedBackend, Spy], size: int
) -> None:
    confined, spy = spied
    before = confined.read(0x100, 64)
    with pytest.raises(MemopError) as info:
        confined.cmpxchg(0x100, size, 0, 0)
    error = info.value
    assert error.errno == errno.EPERM and (error.gaddr, error.size) == (0x100, size)
    assert f"cannot check a cmpxchg of {size} bytes" in str(error)
    assert spy.forwarded == [], "expected nothing forwarded"
    assert confined.read(0x100, 64) == before


@pytest.mark.parametrize("size", [1, 2, 4, 8, 16])
def test_cmpxchg_of_a_checkable_size_is_forwarded(
    spied: tuple[ConfinedBackend, Spy], size: int
) -> None:
    confined, spy = spied
    assert confined.cmpxchg(0x100, size, 0, 1).exchanged
    assert spy.forwarded == ["cmpxchg"]


@pytest.mark.parametrize("size", [0, 17, 64, 4096])
def test_write_of_a_size_it_cannot_check_is_refused_not_forwarded(
    spied: tuple[ConfinedBackend, Spy], size: int
) -> None:
    confined, spy = spied
    with pytest.raises(MemopError) as info:
        confined.write(0x100, b"\x01" * size)
    assert info.value.errno == errno.EPERM
    assert f"cannot check a write of {size} bytes" in str(info.value)
    assert spy.forwarded == []
    assert confined.read(0x100, 64) == bytes(64)


@pytest.mark.parametrize("size", [1, 3, 16])
def test_write_of_a_checkable_size_is_forwarded(
    spied: tuple[ConfinedBackend, Spy], size: int
) -> None:
    confined, spy = spied
    confined.write(0x100, b"\x01" * size)
    assert spy.forwarded == ["write"] and confined.read(0x100, size) == b"\x01" * size


def test_generation_is_the_inner_backends() -> None:
    with EmulatedBackend(1 << 16, kernel="7.0") as inner:
        assert ConfinedBackend(inner, {}).generation == "7.0"
