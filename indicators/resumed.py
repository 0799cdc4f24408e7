"""Carrying on, in a task, a coroutine that was begun by hand in a caller's callback.

The engine applies a batch eagerly: it runs the batch coroutine with
``send`` in the caller's own callback, and only when the batch has to wait
(the ``-EAGAIN`` back-off) does the rest become a task, which drives the
same coroutine from where it stopped through :class:`Resumed`.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any

__all__ = ["Resumed"]


class Resumed:
    """Awaitable that carries on a coroutine begun by hand and suspended on ``waiting``.

    The eager path runs the batch coroutine with ``send`` in the caller's
    callback; only when it has to wait (the ``-EAGAIN`` back-off) does the
    rest become a task, which drives the same coroutine from where it stopped.
    """

    __slots__ = ("coro", "waiting")

    def __init__(self, coro: Coroutine[Any, Any, Any], waiting: Any) -> None:
        self.coro = coro
        self.waiting = waiting

    def __await__(self) -> Generator[Any, None, Any]:
        coro, waiting = self.coro, self.waiting
        while True:
            try:
                yield waiting
            except BaseException as exc:  # cancellation reaches the coroutine
                try:
                    waiting = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                waiting = coro.send(None)
            except StopIteration as stop:
                return stop.value
