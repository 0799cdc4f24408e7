"""fds a control client passes with SCM_RIGHTS: the message each belongs to, the ones it keeps.

A :class:`PassedFds` is one client's share of the fd table:

- an fd belongs to the message it came with: the one whose bytes end the
  chunk that carried it, or, when it came with whitespace only (as
  ``qemu.qmp``'s ``send_fd_scm`` sends it) or inside an unfinished
  message, the next message completed (:meth:`PassedFds.assign`);
- while that message's command runs (:func:`message_fds`), the command may
  keep one under a name (``getfd``: :meth:`PassedFds.store`, at most
  ``limit`` of them) or take it for good; whatever the command did not claim
  is closed when it is answered, so a surplus in one message never shifts
  the pairing of a later one;
- on disconnect everything left is closed (:meth:`PassedFds.close`).
"""

from __future__ import annotations

import array
import contextlib
import contextvars
import logging
import os
import socket

from .qmp_wire import QmpCommandError

__all__ = [
    "ANCILLARY_SIZE",
    "PassedFds",
    "close_all",
    "close_quietly",
    "fds_of",
    "message_fds",
]

logger = logging.getLogger(__name__)

#: fds taken per ``recvmsg``; the kernel closes the ones that do not fit (MSG_CTRUNC).
MAX_FDS_PER_RECV = 8
ANCILLARY_SIZE = socket.CMSG_LEN(MAX_FDS_PER_RECV * array.array("i").itemsize)
_MAX_UNCLAIMED = 16  # fds passed with whitespace, waiting for their message

#: The fds that came with the message whose command runs in this task.
message_fds: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "qmp_message_fds", default=None
)


class PassedFds:
    """One client's fds: those waiting for their message and those stored by name."""

    def __init__(self, limit: int) -> None:
        #: How many fds the client may keep stored at once.
        self.limit = limit
        self._stored: dict[str, int] = {}
        self._unclaimed: list[int] = []  # passed, waiting for the message they belong to

    def assign(self, completed: int, carried: list[int], partial: bool) -> list[list[int]]:
        """The fds of each of the ``completed`` messages of one chunk.

        The kernel ends a read after the data that carried fds: ``carried``
        belong to the message that ends the chunk, or to the next one when
        the chunk ends inside a message (``partial``) or completes none.
        fds waiting from earlier chunks belong to the first message completed.
        """
        owned: list[list[int]] = [[] for _ in range(completed)]
        if completed and self._unclaimed:
            owned[0], self._unclaimed = self._unclaimed, []
        if carried:
            if completed and not partial:
                owned[-1].extend(carried)
            else:
                self.wait_for_message(carried)
        return owned

    def wait_for_message(self, fds: list[int]) -> None:
        """Keep ``fds`` for the next message, at most :data:`_MAX_UNCLAIMED` of them."""
        self._unclaimed.extend(fds)
        while len(self._unclaimed) > _MAX_UNCLAIMED:
            logger.debug("a client passed too many fds without a message; closing one")
            close_quietly(self._unclaimed.pop(0))

    def store(self, name: str) -> None:
        """``getfd``: store the fd that came with the running command's message.

        Without an fd, or over :attr:`limit`, a :class:`QmpCommandError`
        says so (the fd is closed with the message's other unclaimed fds).
        """
        fds = message_fds.get()
        if not fds:
            raise QmpCommandError("No file descriptor supplied via SCM_RIGHTS")
        if name[:1].isdigit():  # QEMU consumes the fd in this case too
            raise QmpCommandError("Parameter 'fdname' expects a name not starting with a digit")
        stored = self._stored
        if name not in stored and len(stored) >= self.limit:
            raise QmpCommandError(
                f"fdname '{name}': a client may keep at most {self.limit} fds stored; "
                f"closefd one first"
            )
        fd = fds.pop(0)
        old = stored.pop(name, None)
        if old is not None:
            os.close(old)
        stored[name] = fd

    def take(self, name: str) -> int:
        """Remove the fd stored under ``name``; the caller owns (and must close) it."""
        try:
            return self._stored.pop(name)
        except KeyError:
            raise QmpCommandError(f"File descriptor named '{name}' not found") from None

    def close(self) -> None:
        """Close every fd stored or waiting."""
        for fd in [*self._stored.values(), *self._unclaimed]:
            close_quietly(fd)
        self._stored.clear()
        self._unclaimed.clear()


def close_quietly(fd: int) -> None:
    """Close ``fd``, ignoring an fd already gone."""
    with contextlib.suppress(OSError):
        os.close(fd)


def close_all(fds: list[int]) -> None:
    """Close every fd in ``fds`` and empty it (so nobody closes a number twice)."""
    while fds:
        close_quietly(fds.pop())


def fds_of(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds of the SCM_RIGHTS messages in ``ancdata``."""
    fds = array.array("i")
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)
