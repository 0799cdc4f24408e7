"""The control socket's commands: argument schemas and handlers.

Each command's arguments are a :class:`QmpArgs` pydantic model (unknown
arguments are refused, wrong types answered with the field's name), so
``query-commands`` and the JSON Schema describe exactly what is accepted.

=================== =========================================================
``notify``          ``{device, vector}``: an int or a list; returns when
                    every bit is in guest memory (``{"applied": n}``), else
                    a GenericError that lists each failure
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

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ..abi import KVM_S390_AIS_MODE_ALL, KVM_S390_AIS_MODE_SINGLE
from ..adapters import Device
from ..memop import MemopError
from .eventfds import EventfdError
from .qmp_server import QmpArgs, QmpCommandError, QmpServer, QmpSession

if TYPE_CHECKING:
    from .service import Service

__all__ = ["register_commands"]


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
        vectors = args.vector if isinstance(args.vector, list) else [args.vector]
        try:
            errors = await service.engine.notify_many((args.device, v) for v in vectors)
        except ValueError as exc:
            raise _generic(str(exc)) from None
        failed = [error for error in errors if error is not None]
        if failed:
            applied = len(vectors) - len(failed)
            details = "; ".join(f"vector {e.vector}: {e.desc} (code {e.code})" for e in failed)
            raise _generic(
                f"device {args.device!r}: {applied} of {len(vectors)} applied; {details}"
            )
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
            service.eventfds.attach(args.device, args.vector, fd, owner=session.number)
        except (EventfdError, ValueError) as exc:
            raise _generic(str(exc)) from None
        return {}

    async def detach_eventfd(args: DetachArgs, session: QmpSession) -> dict[str, Any]:
        try:
            service.eventfds.detach(args.device, args.vector)
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
