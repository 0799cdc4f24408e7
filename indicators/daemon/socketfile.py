"""The control socket's file: created safely, in a directory nobody else can write.

:func:`listen_unix` binds a listening unix socket whose file has its final
mode from the moment it exists (the umask is set around ``bind``; nothing is
chmod-ed by name), after :func:`check_socket_dir` refused a directory
another user could write (who could swap the socket for a symlink or plant
a name in it).  A stale socket nobody listens on is replaced; any other file
under the name is refused.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

__all__ = ["SocketDirError", "check_socket_dir", "listen_unix"]


class SocketDirError(PermissionError):
    """The control socket's directory is writable by other users (or owned by one).

    Anyone who can write the directory can replace the socket or plant a
    name in it; the server refuses to start there.  ``directory``, ``owner``
    and ``mode`` say what was found.
    """

    def __init__(self, directory: str, owner: int, mode: int, why: str) -> None:
        self.directory = directory
        self.owner = owner
        self.mode = mode
        super().__init__(
            errno.EPERM,
            f"control socket directory {directory} (owner uid {owner}, mode {mode:04o}) "
            f"{why}; use a directory only the daemon's user (or root) can write",
        )


def check_socket_dir(directory: str) -> None:
    """Refuse a directory another user could write: they could swap the socket.

    Allowed: owned by this process's uid or root, and not writable by group
    or others, unless it is sticky (``/tmp``-like: others cannot rename or
    remove what is ours).
    """
    st = os.stat(directory)  # a missing directory: the caller names the socket's path
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (0, os.geteuid()):
        raise SocketDirError(directory, st.st_uid, mode, "belongs to another user")
    if mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX:
        raise SocketDirError(directory, st.st_uid, mode, "is writable by other users")


def listen_unix(path: str, mode: int) -> socket.socket:
    """A listening socket at ``path`` created with its final ``mode``.

    The umask is set around ``bind`` so the socket file never exists with
    another mode; nothing is chmod-ed by name afterwards (a name another
    user could have swapped for a symlink in between).
    """
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        try:
            sock.listen(128)
        except BaseException:
            os.unlink(path)
            raise
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket nobody listens on; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
    raise OSError(errno.EADDRINUSE, "another server is listening", path)
