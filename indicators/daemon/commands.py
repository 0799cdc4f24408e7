"""The control socket's commands: argument schemas and handlers.

Each command's arguments are a :class:`QmpArgs` pydantic model (unknown
arguments are refused, wrong types answered with the field's name), so
``query-commands`` and the JSON Schema describe exactly what is accepted.

=================== =========================================================
``notify``          ``{device, vector}``: an int or a list (at most the
                    device's vector count, duplicates count once); returns
                    when every bit is in guest memory (``{"applied": n}``),
                    else a GenericError that sums the failures up by code
                    and locates the first few
``query-adapters``  adapters, devices, live indicator and summary bits,
                    suppression state
``query-stats``     the engine's counters, eventfds, VMM state
``set-ais-mode``    ``{isc, mode: "all" | "single"}``: the guest's re-arm
``reset-adapter``   ``{adapter}``: clear its ISC's suppression state
``attach-eventfd``  ``{device, vector, fdname}``: a ``getfd``'d eventfd
``detach-eventfd``  ``{device, vector}``
``quit``            stop the daemon (pending notifications are finished)
=================== =========================================================
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ..abi import KVM_S390_AIS_MODE_ALL, KVM_S390_AIS_MODE_SINGLE
from ..adapters import Device
from ..memop import MemopError
from .eventfds import EventfdError
from .qmp_server import QmpArgs, QmpCommandError, QmpServer, QmpSession

if TYPE_CHECKING:
    from .service import Service

__all__ = ["FailureBatch", "describe_failure", "failure_message", "register_commands"]

#: Failures a notify reply or a NOTIFY_FAILED event locates one by one.
FIRST_FEW = 5


class NotifyArgs(QmpArgs):
    """``notify``: one vector or several of one device."""

    device: str = Field(min_length=1)
    vector: int | list[int] = Field(description="a vector, or a list of vectors")


class AisModeArgs(QmpArgs):
    """``set-ais-mode``."""

    isc: int = Field(ge=0, le=7)
    mode: Literal["all", "single"]


class AdapterArgs(QmpArgs):
    """``reset-adapter``."""

    adapter: int = Field(ge=0)


class EventfdArgs(QmpArgs):
    """``attach-eventfd``."""

    device: str
    vector: int = Field(ge=0)
    fdname: str = Field(min_length=1)


class DetachArgs(QmpArgs):
    """``detach-eventfd``."""

    device: str
    vector: int = Field(ge=0)


def _generic(message: str) -> QmpCommandError:
    return QmpCommandError(message, "GenericError")


def register_commands(server: QmpServer, service: Service) -> None:
    """Register every daemon command on ``server``."""

    async def notify(args: NotifyArgs, session: QmpSession) -> dict[str, int]:
        vectors = _vectors(args)
        try:
            errors = await service.engine.notify_many([(args.device, v) for v in vectors])
        except ValueError as exc:
            raise _generic(str(exc)) from None
        failed = [error for error in errors if error is not None]
        if failed:
            raise _generic(failure_message(args.device, len(vectors), failed))
        return {"applied": len(vectors)}

    async def query_adapters(_: None, session: QmpSession) -> list[dict[str, Any]]:
        return service.describe_adapters()

    async def query_stats(_: None, session: QmpSession) -> dict[str, Any]:
        return service.describe_stats()

    async def set_ais_mode(args: AisModeArgs, session: QmpSession) -> dict[str, Any]:
        mode = KVM_S390_AIS_MODE_ALL if args.mode == "all" else KVM_S390_AIS_MODE_SINGLE
        try:
            service.engine.set_ais_mode(args.isc, mode)
        except OSError as exc:
            raise _generic(f"isc {args.isc}: the FLIC refused AISM: {exc}") from None
        return {}

    async def reset_adapter(args: AdapterArgs, session: QmpSession) -> dict[str, Any]:
        adapter = service.engine.model.adapters.get(args.adapter)
        if adapter is None:
            known = sorted(service.engine.model.adapters)
            raise _generic(f"unknown adapter {args.adapter}; adapters are {known}")
        try:  # the engine's masks, and the kernel's AIS state when the FLIC suppresses
            service.engine.reset_isc(adapter.isc)
        except OSError as exc:
            raise _generic(f"adapter {adapter.id}: the FLIC refused AISM: {exc}") from None
        return {}

    async def attach_eventfd(args: EventfdArgs, session: QmpSession) -> dict[str, Any]:
        fd = session.take_fd(args.fdname)  # a QmpCommandError names a missing fd
        try:
            service.eventfds.attach(args.device, args.vector, fd, owner=session.credentials.uid)
        except (EventfdError, ValueError) as exc:
            raise _generic(str(exc)) from None
        return {}

    async def detach_eventfd(args: DetachArgs, session: QmpSession) -> dict[str, Any]:
        try:
            service.eventfds.detach(args.device, args.vector, session.credentials.uid)
        except EventfdError as exc:
            raise _generic(str(exc)) from None
        return {}

    async def quit_(_: None, session: QmpSession) -> dict[str, Any]:
        service.request_stop("quit command")
        return {}

    server.register("notify", notify, NotifyArgs, returns="{'applied': int}")
    server.register("query-adapters", query_adapters, returns="[adapter]")
    server.register("query-stats", query_stats, returns="{counters}")
    server.register("set-ais-mode", set_ais_mode, AisModeArgs)
    server.register("reset-adapter", reset_adapter, AdapterArgs)
    server.register("attach-eventfd", attach_eventfd, EventfdArgs)
    server.register("detach-eventfd", detach_eventfd, DetachArgs)
    server.register("quit", quit_)


def _vectors(args: NotifyArgs) -> list[int]:
    """The distinct vectors of a notify, in order (a duplicate is the same bit)."""
    if not isinstance(args.vector, list):
        return [args.vector]
    # Distinct: at most the device's vector count reach the engine (more are out of
    # range and refused before anything is done), whatever the list's length.
    return list(dict.fromkeys(args.vector))


def describe_failure(error: Any) -> dict[str, Any]:
    """One failed notification as data: device, vector, code, where, gaddr, size, key."""
    return {
        "device": error.device,
        "vector": error.vector,
        "code": str(error.code),
        "where": getattr(error, "where", None),  # "dsci" or "summary"
        "gaddr": getattr(error, "gaddr", None),
        "size": getattr(error, "size", None),
        "key": getattr(error, "key", None),
        "errno": getattr(error, "errno", None),
        "desc": str(error),
    }


class FailureBatch:
    """The failures of one device in one batch, kept small: counts and the first few.

    A batch of thousands of failures keeps :data:`FIRST_FEW` errors, not all
    of them; :meth:`summary` is the ``NOTIFY_FAILED`` event's data.
    """

    __slots__ = ("codes", "count", "first")

    def __init__(self) -> None:
        self.count = 0
        self.codes: Counter[str] = Counter()
        self.first: list[Any] = []

    def add(self, error: Any) -> None:
        """Count ``error`` (a NotifyError); keep it if it is one of the first few."""
        self.count += 1
        self.codes[str(error.code)] += 1
        if len(self.first) < FIRST_FEW:
            self.first.append(error)

    def summary(self) -> dict[str, Any]:
        """The first failure's fields, a count per code, the first few failures."""
        return {
            **describe_failure(self.first[0]),
            "count": self.count,
            "codes": dict(self.codes),
            "first": [describe_failure(e) for e in self.first],
        }


def _located(error: Any) -> str:
    """``vector 1: program exception 4 (protection) (code 4) on the dsci at gaddr 0x..
    size 1 key 5``."""
    where = getattr(error, "where", None)
    gaddr = getattr(error, "gaddr", None)
    place = f" on the {where}" if where else ""
    if gaddr is not None:
        size, key = getattr(error, "size", None), getattr(error, "key", None)
        place += f" at gaddr {gaddr:#x} size {size} key {key}"
    return f"vector {error.vector}: {error.desc} (code {error.code}){place}"


def failure_message(device: str, total: int, failed: Sequence[Any]) -> str:
    """A bounded reply for a batch with failures: counts per code, then the first few."""
    codes = Counter(str(e.code) for e in failed)
    counts = ", ".join(f"code {code}: {n}" for code, n in sorted(codes.items()))
    shown = "; ".join(_located(e) for e in failed[:FIRST_FEW])
    more = f"; and {len(failed) - FIRST_FEW} more" if len(failed) > FIRST_FEW else ""
    return (
        f"device {device!r}: {total - len(failed)} of {total} applied, "
        f"{len(failed)} failed ({counts}); {shown}{more}"
    )


def describe_device(device: Device, read: Any) -> dict[str, Any]:
    """A device's config and live bits; ``read(gaddr, size, key)`` reads guest memory."""
    first = min(bit.gaddr for bit in device.dsci)
    last = max(bit.gaddr for bit in device.dsci)
    entry: dict[str, Any] = {
        "name": device.name,
        "kind": device.kind,
        "key": device.key,
        "vectors": device.vectors,
        "summary-test": device.summary_test,
        "config": device.config.model_dump(mode="json"),
    }
    try:
        area = read(first, last - first + 1, device.key)
        summary = read(device.summary.gaddr, 1, device.key)[0]
    except MemopError as exc:
        entry["error"] = str(exc)
        return entry
    entry["indicators-set"] = [
        vector for vector, bit in enumerate(device.dsci) if area[bit.gaddr - first] & bit.mask
    ]
    entry["summary-set"] = bool(summary & device.summary.mask)
    return entry
