"""Storage keys as QEMU's QMP ``dump-skeys`` reports them.

    keys = parse_skeys(Path(dump).read_text())     # {page gaddr: StorageKey}
    keys[0x31000].acc                               # 3

QEMU writes one line per 4 KiB page, ``page=031: key(62) => ACC=3, FP=8,
REF=4, ch=2, reserved=0`` (page in hex, the key byte in decimal); the
daemon's parser (:func:`indicators.daemon.vmm.parse_skeys`) reads it.
"""

from __future__ import annotations

from typing import NamedTuple

from indicators.daemon.vmm import parse_skeys as parse_skeys_pages
from indicators.testing.guest import PAGE_SIZE

__all__ = ["StorageKey", "parse_skeys"]


class StorageKey(NamedTuple):
    """One page's storage key as QMP ``dump-skeys`` reports it."""

    page_gaddr: int
    key: int

    @property
    def acc(self) -> int:
        """Access-control bits (the key a store must match)."""
        return self.key >> 4

    @property
    def fetch(self) -> bool:
        """Fetch-protection bit."""
        return bool(self.key & 0x08)

    @property
    def ref(self) -> bool:
        """Reference bit."""
        return bool(self.key & 0x04)

    @property
    def change(self) -> bool:
        """Change bit."""
        return bool(self.key & 0x02)


def parse_skeys(text: str) -> dict[int, StorageKey]:
    """Parse a ``dump-skeys`` file: ``page=080: key(54) => ACC=3, ...`` per 4 KiB page."""
    return {
        page * PAGE_SIZE: StorageKey(page * PAGE_SIZE, key)
        for page, key in parse_skeys_pages(text).items()
    }
