"""The root of every error ``indicators`` raises on purpose.

Callers catch one type, :class:`IndicatorsError`, and branch on its
subclasses and their fields, never on message text.  The command line maps
it to one line on stderr and the subclass's :attr:`IndicatorsError.exit_code`
(2: the config or the command line is wrong; 1: the config is fine but
something at run time failed).  Anything else that escapes is a bug.

The tree (module that defines each class, and the fields it carries)::

    IndicatorsError                     exit_code
     +-- ConfigError (2)                errors (re-exported by config): source,
     |                                  errors [(where, what)]
     +-- ResourceError (1)              errors: what, where, errno, reason
     |                                  (RAM file, control socket, metrics
     |                                  address, a daemon's socket; also an
     |                                  OSError)
     +-- KvmUnavailableError (1)        memop.kvm: the host cannot run the
     |                                  KVM backend (not s390x, no /dev/kvm,
     |                                  no cmpxchg memop)
     +-- VmFdError (1)                  memop.vmfd: the VM or FLIC fd source
     |                                  (also an OSError)
     +-- PrivilegeError (1)             daemon.privileges: run_as user/group
     |                                  (also a PermissionError)
     +-- EventfdError (1)               daemon.eventfds: an eventfd that
     |                                  cannot be attached (also a ValueError)
     +-- MemopError (1)                 memop.base: errno, reason, gaddr,
     |    |                             size, key, old
     |    +-- TransientError            -EAGAIN, retry
     |    +-- ProgramException          code (4 protection, 5 addressing)
     +-- NotifyError (1)                engine: device, vector, code, desc,
                                        gaddr, size, key, cause

Several subclasses also derive from the builtin they replaced (OSError,
PermissionError, ValueError) so that older ``except`` clauses keep working.
"""

from __future__ import annotations

import os
from typing import ClassVar

__all__ = ["ConfigError", "IndicatorsError", "ResourceError"]


class IndicatorsError(Exception):
    """Something ``indicators`` refused or could not do; the message says what and where."""

    #: The process exit code of the command line for this error.
    exit_code: ClassVar[int] = 1

    def one_line(self) -> str:
        """The error as the command line prints it after ``indicators: ``."""
        return str(self)


class ResourceError(IndicatorsError, OSError):
    """An OS resource the service needs could not be opened, created or bound.

    ``what`` says which resource (``"RAM file"``, ``"control socket"``,
    ``"metrics endpoint"``, ``"daemon socket"``), ``where`` its path or
    address as the config or the command line gave it, ``action`` what was
    tried (``"map"``, ``"create"``, ``"bind"``, ``"reach"``), ``errno`` the
    OS error number when there was one and ``reason`` why, in words.
    """

    def __init__(
        self,
        what: str,
        where: str,
        reason: str,
        *,
        action: str = "open",
        errno: int | None = None,
    ) -> None:
        super().__init__(f"cannot {action} the {what} {where}: {reason}")
        self.what = what
        self.where = where
        self.reason = reason
        self.action = action
        self.errno = errno

    @classmethod
    def from_os_error(
        cls, what: str, where: str, exc: OSError, *, action: str = "open"
    ) -> ResourceError:
        """Wrap ``exc`` (its strerror, not its repr) for the resource at ``where``."""
        reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
        return cls(what, where, reason or type(exc).__name__, action=action, errno=exc.errno)


class ConfigError(IndicatorsError, ValueError):
    """A config that cannot be used; ``errors`` lists ``(where, what)`` pairs.

    ``where`` names the section or device and the field (``device 'net0'.isc``,
    ``backend.storage_keys.0x10000``), ``what`` the rule and the value given.
    """

    exit_code = 2

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {where}: {what}" for where, what in errors)
        super().__init__(f"{source}: {len(errors)} error(s)\n{lines}")

    def one_line(self) -> str:
        # One line per problem: a config may have several, all reported at once.
        return f"config error: {self}"
