"""Least privilege: give up root once what needs it is open.

Acquiring the VM fd from QEMU (``pid:N`` with ``pidfd_getfd``) may need root
or CAP_SYS_PTRACE; opening the RAM file may need QEMU's uid.  After both, the
daemon needs no privilege at all: :func:`drop_to` switches to the configured
user and group (supplementary groups cleared) before the control socket is
created, so the socket belongs to that user.  Once everything is open,
:func:`forbid_new_privileges` sets ``PR_SET_NO_NEW_PRIVS``: nothing the
daemon could be made to execute afterwards gains privileges (setuid bits
and file capabilities are ignored).  What each VM-fd source needs:

=============== ============================================================
``fd:N``        nothing (the supervisor passes the fd)
``unix:PATH``   permission to connect to PATH
``pid:N``       ptrace rights over the VMM: same uid as QEMU (and Yama
                ptrace_scope 0), or CAP_SYS_PTRACE
emulated        read/write access to the RAM file (QEMU's uid or group)
=============== ============================================================
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd

from ..errors import IndicatorsError

__all__ = ["PrivilegeError", "drop_to", "forbid_new_privileges"]


class PrivilegeError(IndicatorsError, PermissionError):
    """The configured user or group cannot be switched to."""


def drop_to(user: str, group: str | None = None) -> tuple[int, int]:
    """Switch to ``user`` (and ``group``, else the user's primary group); return (uid, gid)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"run_as.user: no user named {user!r}") from None
    if group is None:
        gid = entry.pw_gid
    else:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"run_as.group: no group named {group!r}") from None
    uid = entry.pw_uid
    if (os.getuid(), os.getgid()) == (uid, gid):
        return uid, gid
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except PermissionError as exc:
        raise PrivilegeError(
            f"run_as: cannot switch to {user}:{group or gid} ({exc.strerror}); "
            f"start as root or drop the [run_as] section"
        ) from None
    if os.getuid() != uid or os.geteuid() != uid:
        raise PrivilegeError(f"run_as: still uid {os.geteuid()} after switching to {uid}")
    return uid, gid


_PR_SET_NO_NEW_PRIVS = 38


def forbid_new_privileges() -> None:
    """``prctl(PR_SET_NO_NEW_PRIVS, 1)`` for this process and its children (irreversible)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"PR_SET_NO_NEW_PRIVS failed: {os.strerror(err)}")
