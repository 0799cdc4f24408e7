"""A private libvirtd for the deployment test: installed, confined, torn down.

:class:`PrivateLibvirt` runs a real ``libvirtd`` (Debian's packages, no
systemd) in a mount and pid namespace of its own, so the host's libvirt is
never touched and nothing outlives the test:

- ``unshare --pid --fork --mount-proc --kill-child`` starts this file as the
  namespace's PID 1 (``python libvirt_rig.py reaper DIR``), under
  ``setpriv --pdeathsig KILL``: if the test dies, the namespace's init dies,
  and the kernel kills every process left in it (libvirtd, QEMU, daemons);
- the reaper bind-mounts private copies of /etc/libvirt, /run, /var/lib,
  /var/log and /var/cache from ``DIR``, so the test sees libvirt's files
  (pid files, RAM files, sockets) under ``DIR`` while libvirtd sees them at
  their usual paths;
- it is a child subreaper (and the namespace's init): every orphan, QEMU
  among them, is reaped at once, so ``virsh destroy`` is not held up
  waiting for a zombie (libvirt-rig.md, point 5);
- it makes /run/indicators with the project's tmpfiles entry, as a boot
  would (``systemd-tmpfiles --create``; owner ``libvirt-qemu``);
- it runs ``libvirtd`` as its child and restarts it on ``restart`` read
  from standard input (libvirtd restarted under running guests); EOF or
  ``quit`` ends it all.

:func:`setup_problem` says why the set-up cannot run here (packages, the
``libvirt-qemu`` user, root), installing what is missing when allowed
(``CI`` set, or ``INDICATORS_LIBVIRT_SETUP=1``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

PACKAGES = ("libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients")
OPT_IN = "INDICATORS_LIBVIRT_SETUP"
#: host-side directory name -> the path the namespace sees it at
BINDS = {
    "etc-libvirt": "/etc/libvirt",
    "run": "/run",
    "var-lib": "/var/lib",
    "var-log": "/var/log",
    "var-cache": "/var/cache",
}
QEMU_CONF = """\
# The private libvirtd of the indicators deployment test (no systemd, no
# cgroups, no namespaces of its own: container-safe).
user = "root"
group = "root"
stdio_handler = "file"
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
"""


# ------------------------------------------------------------------- set-up


def _qemu_driver_installed() -> bool:
    return bool(glob.glob("/usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so"))


def _missing_packages() -> list[str]:
    missing = []
    if shutil.which("libvirtd") is None:
        missing.append("libvirt-daemon")
    if not _qemu_driver_installed():
        missing.append("libvirt-daemon-driver-qemu")
    if shutil.which("virsh") is None:
        missing.append("libvirt-clients")
    return missing


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def setup_problem() -> str | None:
    """Why a private libvirtd cannot run here (a skip reason), or None.

    Installs the packages and creates the ``libvirt-qemu`` user (the QEMU
    driver resolves its built-in default user before it reads qemu.conf)
    when allowed: with ``CI`` set or ``INDICATORS_LIBVIRT_SETUP=1``.
    """
    allowed = bool(os.environ.get("CI")) or os.environ.get(OPT_IN) == "1"
    if os.geteuid() != 0:
        return "a private libvirtd needs root (mount and pid namespaces, libvirtd itself)"
    for tool in ("unshare", "setpriv", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is missing"
    missing = _missing_packages()
    if missing:
        if not allowed:
            return (f"missing {' '.join(missing)}; install with: apt-get install -y "
                    f"--no-install-recommends {' '.join(PACKAGES)} (or set {OPT_IN}=1 "
                    f"to let the test install them)")  # fmt: skip
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
        for command in (["apt-get", "update", "-qq"], install):
            result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if result.returncode != 0:
                return f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}"
        if _missing_packages():
            return f"still missing after apt-get install: {' '.join(_missing_packages())}"
    if not _user_exists("libvirt-qemu"):
        if not allowed:
            return (f"no user libvirt-qemu (libvirt's QEMU driver needs it); create it with: "
                    f"groupadd -r libvirt-qemu; useradd -r -g libvirt-qemu -d /var/lib/libvirt "
                    f"-s /usr/sbin/nologin libvirt-qemu (or set {OPT_IN}=1)")  # fmt: skip
        for command in (["groupadd", "-r", "-f", "libvirt-qemu"],
                        ["useradd", "-r", "-g", "libvirt-qemu", "-d", "/var/lib/libvirt",
                         "-s", "/usr/sbin/nologin", "libvirt-qemu"]):  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0 and not _user_exists("libvirt-qemu"):
                return f"{' '.join(command)} failed: {result.stderr.strip()}"
    return None


# ------------------------------------------------------------- the test side


class PrivateLibvirt:
    """A libvirtd in namespaces of its own under ``directory``; :meth:`close` ends it all.

    ``hook`` is installed as its qemu hook before it starts; ``path`` is
    libvirtd's PATH (where the hook finds ``python3`` and QEMU).
    """

    def __init__(self, directory: Path, hook: str, path: str) -> None:
        self.directory = directory
        for name in BINDS:
            (directory / name).mkdir(parents=True, exist_ok=True)
        etc = directory / "etc-libvirt"
        shutil.copytree("/etc/libvirt", etc, dirs_exist_ok=True)
        (etc / "qemu.conf").write_text(QEMU_CONF)
        (etc / "hooks").mkdir(exist_ok=True)
        installed = etc / "hooks" / "qemu"
        installed.write_text(hook)
        installed.chmod(0o755)
        self.log = directory / "var-log" / "libvirt" / "libvirtd.log"
        env = {
            "PATH": path,
            "LIBVIRT_LOG_OUTPUTS": "2:file:/var/log/libvirt/libvirtd.log",
            "LC_ALL": "C",
            # Shows what libvirtd's own environment gives its hooks: nothing of this.
            "INDICATORS_CONFIG_DIR": "/set/for/libvirtd",
        }
        reaper = [sys.executable, str(Path(__file__).resolve()), "reaper", str(directory)]
        with open(directory / "reaper.log", "wb") as log:
            self.process = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--",
                 "unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "--", *reaper],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip

    @property
    def uri(self) -> str:
        """A client URI for this libvirtd, from outside its namespace."""
        return f"qemu+unix:///system?socket={self.directory / 'run/libvirt/libvirt-sock'}"

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``virsh`` against this libvirtd."""
        result = subprocess.run(
            ["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)} failed: {result.stderr}\n{self.tail()}")
        return result

    def wait_answering(self, timeout: float = 60.0) -> None:
        """Wait until libvirtd answers (``libvirtd`` has no useful exit code to wait for)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"the reaper exited ({self.process.returncode})\n{self.tail()}"
                )
            if (self.directory / "run/libvirt/libvirt-sock").exists():
                result = self.virsh("uri", check=False)
                if result.returncode == 0:
                    return
            assert time.monotonic() < deadline, f"libvirtd did not answer\n{self.tail()}"
            time.sleep(0.05)

    def libvirtd_pid(self) -> int | None:
        """libvirtd's pid as the namespace numbers it (the reaper writes it)."""
        with contextlib.suppress(OSError, ValueError):
            return int((self.directory / "libvirtd.pid").read_text())
        return None

    def restart_libvirtd(self) -> None:
        """Stop libvirtd (guests keep running) and start a new one; wait until it answers."""
        before = self.libvirtd_pid()
        self._say("restart")
        deadline = time.monotonic() + 30
        while self.libvirtd_pid() == before:
            assert time.monotonic() < deadline, "the reaper did not restart libvirtd"
            time.sleep(0.02)
        self.wait_answering()

    def _say(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{line}\n".encode())
        self.process.stdin.flush()

    def close(self) -> None:
        """End the namespace: libvirtd, QEMU and every daemon in it.  Idempotent."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self._say("quit")
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()  # --kill-child takes the namespace with it
                self.process.wait()
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()

    def tail(self, lines: int = 30) -> str:
        """The end of libvirtd's and the reaper's logs, for failure messages."""
        parts = []
        qemu_logs = sorted((self.directory / "var-log/libvirt/qemu").glob("*.log"))
        for path in (self.directory / "reaper.log", self.log, *qemu_logs):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts)


# ------------------------------------------------------ probes the tests share


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll until ``condition()`` holds; the timeout only ends a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def processes_with(text: str) -> list[int]:
    """Host pids (this one left out) whose command line contains ``text``."""
    found = []
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" "):
                found.append(int(entry))
    return found


def accepts(path: Path) -> bool:
    """Whether a unix socket at ``path`` accepts connections (it exists a moment before)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


# ------------------------------------------------------- inside the namespace


def _reaper(directory: Path) -> int:
    """PID 1 of the namespace: private mounts, libvirtd as a child, reap everything."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER (implied for a pid namespace's init)
    for name, target in BINDS.items():
        subprocess.run(["mount", "--bind", str(directory / name), target], check=True)
    for path in ("/var/log/libvirt/qemu", "/var/lib/libvirt"):
        os.makedirs(path, mode=0o755, exist_ok=True)
    # /run/indicators as the project's tmpfiles entry makes it at boot (in this /run).
    tmpfiles = shutil.which("systemd-tmpfiles")
    entry = Path(__file__).resolve().parent.parent / "deploy" / "indicators.tmpfiles.conf"
    if tmpfiles is not None:
        subprocess.run([tmpfiles, "--create", str(entry)], check=True)
    else:
        import pwd

        os.makedirs("/run/indicators", mode=0o750)
        os.chown("/run/indicators", pwd.getpwnam("libvirt-qemu").pw_uid, 0)
    libvirtd: list[subprocess.Popen[bytes]] = []
    exited = threading.Event()

    def start() -> None:
        exited.clear()
        with open("/var/log/libvirt/libvirtd.stdout", "ab") as log:
            libvirtd.append(subprocess.Popen(["libvirtd"], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=log))  # fmt: skip
        (directory / "libvirtd.pid").write_text(str(libvirtd[-1].pid))

    def reap() -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                time.sleep(0.01)  # nothing to reap until libvirtd forks again
                continue
            if libvirtd and pid == libvirtd[-1].pid:
                libvirtd[-1].returncode = 0  # reaped here: Popen must not wait for it
                exited.set()

    def stop() -> None:
        current = libvirtd[-1]
        if not exited.is_set():
            os.kill(current.pid, signal.SIGTERM)
            if not exited.wait(20):
                os.kill(current.pid, signal.SIGKILL)
                exited.wait(5)

    threading.Thread(target=reap, daemon=True).start()
    start()
    for line in sys.stdin:
        if line.strip() == "restart":
            stop()
            start()
        elif line.strip() == "quit":
            break
    stop()
    return 0  # leaving kills what is left in the namespace


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "reaper":
        sys.exit(_reaper(Path(sys.argv[2])))
    sys.exit(f"usage: {sys.argv[0]} reaper DIRECTORY")
