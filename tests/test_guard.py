"""Write confinement below the engine: only configured bits may change."""

from __future__ import annotations

import errno

import pytest

from indicators.memop import EmulatedBackend, MemopError, ProgramException
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
    assert info.value.errno == errno.EPERM and f"{size} bytes" in str(info.value)


def test_fetch_check_of_any_size_is_delegated(confined: ConfinedBackend) -> None:
    confined.check(0x0, 4096, None, store=False)
    with pytest.raises(MemopError) as info:
        confined.check(0x0, 0, None, store=False)
    assert info.value.errno == errno.EINVAL
