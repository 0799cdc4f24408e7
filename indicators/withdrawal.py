"""Taking devices out of the engine's queue: their notifications fail, the others go on.

When a device is removed, its notifications that were accepted but are still
queued must not be applied later (the guest may have reset, its addresses be
ordinary memory by then).  :func:`withdraw` fails them (each with the error
the caller makes, guest memory untouched) and keeps every other notification
queued, also those that came in the same ticket as a withdrawn one: such a
ticket is split, and its caller gets the outcome of both parts together.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection

from .adapters import Device
from .notification import NotifyError, Target, Ticket

__all__ = ["withdraw"]


def withdraw(
    pending: list[Ticket], gone: Collection[Device], fail: Callable[[Target], NotifyError]
) -> list[Ticket]:
    """``pending`` without the notifications of ``gone``, each of which gets ``fail(target)``
    as its error; a ticket left empty is resolved, a partly withdrawn one split."""
    kept: list[Ticket] = []
    for ticket in pending:
        keep = [i for i, entry in enumerate(ticket.entries) if entry.device not in gone]
        if len(keep) == len(ticket.entries):
            kept.append(ticket)
            continue
        for index, entry in enumerate(ticket.entries):
            if entry.device in gone:
                ticket.errors[index] = fail(entry)
        if keep:
            kept.append(_rest_of(ticket, keep))
        else:
            ticket.resolve()
    return kept


def _rest_of(ticket: Ticket, keep: list[int]) -> Ticket:
    """A ticket for the entries ``keep`` of ``ticket`` that resolves ``ticket`` with them."""
    rest = Ticket([ticket.entries[index] for index in keep])
    rest.accepted = ticket.accepted
    rest.future = asyncio.get_running_loop().create_future()

    def done(future: asyncio.Future[list[NotifyError | None]]) -> None:
        for mine, index in enumerate(keep):
            ticket.errors[index] = future.result()[mine]
        ticket.resolve()

    rest.future.add_done_callback(done)
    return rest
