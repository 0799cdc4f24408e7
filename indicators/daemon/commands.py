"""The control socket's commands: one table of names, argument schemas and handlers.

Each command's arguments are a :class:`QmpArgs` pydantic model (unknown
arguments are refused, wrong types answered with the field's name), so
``query-commands`` and the JSON Schema describe exactly what is accepted.
:data:`COMMANDS` is the one list of them: the server registers it, the fuzz
harness and the tests read it.

=================== =========================================================
``notify``          ``{device, vector}``: an int or a list (at most the
                    device's vector count, duplicates count once); returns
                    when every bit is in guest memory (``{"applied": n}``),
                    else a GenericError that sums the failures up by code
                    and locates the first few
``query-adapters``  adapters, devices (with their ``lifetime``), live
                    indicator and summary bits, suppression state
``query-stats``     the engine's counters, eventfds, VMM state
``set-ais-mode``    ``{isc, mode: "all" | "single"}``: the guest's re-arm
``reset-adapter``   ``{adapter}``: clear its ISC's suppression state
``attach-eventfd``  ``{device, vector, fdname}``: a ``getfd``'d eventfd
``detach-eventfd``  ``{device, vector}``
``device-add``      one ``[[devices]]`` entry's fields plus ``lifetime``
                    (``"guest"``, the default, or ``"persistent"``):
                    ``{"name", "lifetime"}``; managers only
``device-del``      ``{name}``: ``{}`` once its bits can no longer be
                    written; managers only
``guest-reset``     drop every ``guest`` device, then (with ``[vmm]``)
                    ``system_reset`` and ``cont`` the VM:
                    ``{"dropped": [names]}``; managers only
``quit``            stop the daemon (pending notifications are finished)
=================== =========================================================
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import ConfigDict, Field

from ..abi import KVM_S390_AIS_MODE_ALL, KVM_S390_AIS_MODE_SINGLE
from ..config import ConfigError, DeviceConfig, parse_device
from ..engine import Engine
from .eventfds import EventfdError, EventfdSources
from .qmp_server import QmpArgs, QmpCommandError, QmpServer, QmpSession
from .qmp_session import PeerCredentials
from .registry import DeviceRegistry, RegistryError
from .reports import FailureBatch, describe_failure, failure_message

__all__ = [
    "COMMANDS",
    "CommandSpec",
    "Daemon",
    "FailureBatch",
    "describe_failure",
    "failure_message",
    "register_commands",
]


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


class DeviceAddArgs(QmpArgs):
    """``device-add``: a ``[[devices]]`` entry (checked by the config's own model) and a
    lifetime."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    lifetime: Literal["guest", "persistent"] = "guest"


class DeviceDelArgs(QmpArgs):
    """``device-del``."""

    name: str = Field(min_length=1)


class Daemon(Protocol):
    """What the commands need of the daemon (the service implements it)."""

    engine: Engine
    eventfds: EventfdSources
    registry: DeviceRegistry

    def describe_adapters(self) -> list[dict[str, Any]]:
        """``query-adapters``."""

    def describe_stats(self) -> dict[str, Any]:
        """``query-stats``."""

    def request_stop(self, reason: str) -> None:
        """Stop the daemon."""

    def may_manage(self, peer: PeerCredentials) -> bool:
        """Whether ``peer`` may add and remove devices and reset the guest."""

    async def guest_reset(self, reason: str) -> list[str]:
        """Drop the guest's devices, then reset and continue the VM (when linked)."""


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One command: its name, its arguments' model, what it returns, whether it manages."""

    name: str
    args: type[QmpArgs] | None = None
    returns: str = ""
    #: Only managing peers ([control] manager_uids / manager_gids) may run it.
    manages: bool = False


#: Every daemon command (the server adds the QMP built-ins: qmp_capabilities,
#: query-commands, query-version, getfd, closefd).
COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec("notify", NotifyArgs, "{'applied': int}"),
    CommandSpec("query-adapters", None, "[adapter]"),
    CommandSpec("query-stats", None, "{counters}"),
    CommandSpec("set-ais-mode", AisModeArgs),
    CommandSpec("reset-adapter", AdapterArgs),
    CommandSpec("attach-eventfd", EventfdArgs),
    CommandSpec("detach-eventfd", DetachArgs),
    CommandSpec("device-add", DeviceAddArgs, "{'name': str, 'lifetime': str}", manages=True),
    CommandSpec("device-del", DeviceDelArgs, manages=True),
    CommandSpec("guest-reset", None, "{'dropped': [str]}", manages=True),
    CommandSpec("quit"),
)

Handler = Callable[[Any, QmpSession], Awaitable[object]]


def _generic(message: str) -> QmpCommandError:
    return QmpCommandError(message, "GenericError")


def device_spec(fields: dict[str, Any]) -> DeviceConfig:
    """``fields`` as a ``[[devices]]`` entry; a QmpCommandError in the config check's words."""
    try:
        return parse_device(fields)
    except ConfigError as exc:
        raise _generic("; ".join(f"{where}: {what}" for where, what in exc.errors)) from None


def _handlers(daemon: Daemon) -> dict[str, Handler]:
    """The handler of each command of :data:`COMMANDS`, by name."""

    async def notify(args: NotifyArgs, session: QmpSession) -> dict[str, int]:
        vectors = _vectors(args)
        try:  # an idle engine answers at once: no coroutine of notify_many to go through
            outcome = daemon.engine.notify_nowait([(args.device, v) for v in vectors])
        except ValueError as exc:
            raise _generic(str(exc)) from None
        errors = outcome if isinstance(outcome, list) else await outcome
        failed = [error for error in errors if error is not None]
        if failed:
            raise _generic(failure_message(args.device, len(vectors), failed))
        return {"applied": len(vectors)}

    async def query_adapters(_: None, session: QmpSession) -> list[dict[str, Any]]:
        return daemon.describe_adapters()

    async def query_stats(_: None, session: QmpSession) -> dict[str, Any]:
        return daemon.describe_stats()

    async def set_ais_mode(args: AisModeArgs, session: QmpSession) -> dict[str, Any]:
        mode = KVM_S390_AIS_MODE_ALL if args.mode == "all" else KVM_S390_AIS_MODE_SINGLE
        try:
            daemon.engine.set_ais_mode(args.isc, mode)
        except OSError as exc:
            raise _generic(f"isc {args.isc}: the FLIC refused AISM: {exc}") from None
        return {}

    async def reset_adapter(args: AdapterArgs, session: QmpSession) -> dict[str, Any]:
        adapter = daemon.engine.model.adapters.get(args.adapter)
        if adapter is None:
            known = sorted(daemon.engine.model.adapters)
            raise _generic(f"unknown adapter {args.adapter}; adapters are {known}")
        try:  # the engine's masks, and the kernel's AIS state when the FLIC suppresses
            daemon.engine.reset_isc(adapter.isc)
        except OSError as exc:
            raise _generic(f"adapter {adapter.id}: the FLIC refused AISM: {exc}") from None
        return {}

    async def attach_eventfd(args: EventfdArgs, session: QmpSession) -> dict[str, Any]:
        fd = session.take_fd(args.fdname)  # a QmpCommandError names a missing fd
        try:
            daemon.eventfds.attach(args.device, args.vector, fd, owner=session.credentials.uid)
        except (EventfdError, ValueError) as exc:
            raise _generic(str(exc)) from None
        return {}

    async def detach_eventfd(args: DetachArgs, session: QmpSession) -> dict[str, Any]:
        try:
            daemon.eventfds.detach(args.device, args.vector, session.credentials.uid)
        except ValueError as exc:  # an EventfdError, or an unknown device or vector
            raise _generic(str(exc)) from None
        return {}

    async def device_add(args: DeviceAddArgs, session: QmpSession) -> dict[str, Any]:
        spec = device_spec(dict(args.model_extra or {}))
        try:
            daemon.registry.add(spec, args.lifetime)
        except RegistryError as exc:
            raise _generic(str(exc)) from None
        return {"name": spec.name, "lifetime": args.lifetime}

    async def device_del(args: DeviceDelArgs, session: QmpSession) -> dict[str, Any]:
        try:
            await daemon.registry.remove(args.name, "device-del")
        except RegistryError as exc:
            raise _generic(str(exc)) from None
        return {}

    async def guest_reset(_: None, session: QmpSession) -> dict[str, Any]:
        try:
            return {"dropped": await daemon.guest_reset("guest-reset")}
        except (RuntimeError, OSError) as exc:
            # The devices are gone by then (that step cannot fail): say so.
            raise _generic(
                f"guest-reset: the guest's devices were dropped, but resetting the VM failed: {exc}"
            ) from None

    async def quit_(_: None, session: QmpSession) -> dict[str, Any]:
        daemon.request_stop("quit command")
        return {}

    return {
        "notify": notify,
        "query-adapters": query_adapters,
        "query-stats": query_stats,
        "set-ais-mode": set_ais_mode,
        "reset-adapter": reset_adapter,
        "attach-eventfd": attach_eventfd,
        "detach-eventfd": detach_eventfd,
        "device-add": device_add,
        "device-del": device_del,
        "guest-reset": guest_reset,
        "quit": quit_,
    }


def _managing(name: str, handler: Handler, daemon: Daemon) -> Handler:
    """``handler``, refused to peers that may connect but not manage."""

    async def guarded(args: Any, session: QmpSession) -> object:
        peer = session.credentials
        if not daemon.may_manage(peer):
            raise _generic(
                f"{name}: uid {peer.uid} gid {peer.gid} may use the control socket but not "
                f"manage devices (see [control] manager_uids / manager_gids)"
            )
        return await handler(args, session)

    return guarded


def register_commands(server: QmpServer, daemon: Daemon) -> None:
    """Register every command of :data:`COMMANDS` on ``server``."""
    handlers = _handlers(daemon)
    assert handlers.keys() == {spec.name for spec in COMMANDS}, "the table and the handlers"
    for spec in COMMANDS:
        handler = handlers[spec.name]
        if spec.manages:
            handler = _managing(spec.name, handler, daemon)
        server.register(spec.name, handler, spec.args, returns=spec.returns)


def _vectors(args: NotifyArgs) -> list[int]:
    """The distinct vectors of a notify, in order (a duplicate is the same bit)."""
    if not isinstance(args.vector, list):
        return [args.vector]
    # Distinct: at most the device's vector count reach the engine (more are out of
    # range and refused before anything is done), whatever the list's length.
    return list(dict.fromkeys(args.vector))
