"""Notifications judged by a delivery oracle: the rig's guest as the oracle's other side.

:func:`guest_oracle` makes a :class:`~indicators.testing.oracle.DeliveryOracle`
over an :class:`~indicators.testing.qemu.AirqGuest`: the bit is read from
the guest's RAM at the address the guest layout gives (worked out from the
device configs, not from the daemon's adapter model), the counter is the
guest's own per-(device, vector) clear count, and ``settle`` waits two guest
rounds (the guest counts a bit in the round it clears it).

:func:`notify` and :func:`notify_engine` send notifications through a
``QMPClient`` or straight to an engine and tell the oracle what came back:

    oracle = rig.oracle()
    await notify(client, oracle, "net0", [0, 1])
    await notify_engine(rig.engine, oracle, [("net0", 2), ("pci0", 5)])
    await rig.settle()
    verdict = oracle.verdict()
    assert verdict.ok, verdict
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence

from qemu.qmp import ExecuteError, QMPClient

from indicators.engine import Engine
from indicators.guestmem import GuestMemory
from indicators.testing.guest import RESULTS_GADDR, GuestState
from indicators.testing.layout import GuestLayout
from indicators.testing.oracle import DeliveryOracle, GuestGone
from indicators.testing.qemu import AirqGuest

__all__ = ["error_code", "guest_oracle", "notify", "notify_engine"]

_CODE = re.compile(r"\(code (\w+)\)")
#: Only ends a hang: a running guest finishes two rounds in microseconds to milliseconds.
_SETTLE_TIMEOUT = 5.0


def guest_oracle(guest: AirqGuest, layout: GuestLayout) -> DeliveryOracle:
    """A delivery oracle over ``guest``'s RAM and counters, addressed by ``layout``."""

    memory = guest.memory  # this QEMU's: a later one is another guest
    where = guest.ram_path

    def live() -> GuestMemory:
        # Checked on the event loop's thread, where the rig also kills QEMU.
        if memory.closed or not guest.running:
            raise GuestGone(f"the QEMU of {where} is gone")
        return memory

    def read_bit(device: str, vector: int) -> bool:
        gaddr, mask = layout.areas[device].dsci_bit(vector)
        return bool(live().load(gaddr, 1) & mask)

    def guest_count(device: str, vector: int) -> int:
        return live().load(RESULTS_GADDR + 8 * layout.counter[(device, vector)], 8)

    def settle() -> None:
        # A parked or stopped guest has counted everything it cleared.
        target = guest.rounds() + 2
        deadline = time.monotonic() + _SETTLE_TIMEOUT
        while guest.rounds() < target and time.monotonic() < deadline:
            if not guest.running or guest.state() != GuestState.RUNNING:
                return
            time.sleep(0.0001)

    return DeliveryOracle(read_bit, guest_count, settle=settle)


def error_code(error: ExecuteError) -> str:
    """The failure code a refused ``notify`` names (``... (code 4)``), else its class."""
    match = _CODE.search(str(error))
    return match.group(1) if match else error.error_class


async def notify(
    client: QMPClient, oracle: DeliveryOracle, device: str, vectors: Sequence[int]
) -> bool:
    """``notify`` through ``client``, told to ``oracle``; True if acknowledged.

    A refused command acknowledged none of its items: all fail with its code.
    """
    tokens = oracle.submit_many((device, vector) for vector in vectors)
    try:
        await client.execute("notify", {"device": device, "vector": list(vectors)})
    except ExecuteError as exc:
        code = error_code(exc)
        for token in tokens:
            oracle.failed(token, code)
        return False
    for token in tokens:
        oracle.acknowledged(token)
    return True


async def notify_engine(
    engine: Engine, oracle: DeliveryOracle, items: Iterable[tuple[str, int]]
) -> Counter[str]:
    """``engine.notify_many(items)``, told to ``oracle``; the failures by code."""
    items = list(items)
    tokens = oracle.submit_many(items)
    failures: Counter[str] = Counter()
    for token, error in zip(tokens, await engine.notify_many(items), strict=True):
        if error is None:
            oracle.acknowledged(token)
        else:
            oracle.failed(token, error.code)
            failures[error.code] += 1
    return failures
