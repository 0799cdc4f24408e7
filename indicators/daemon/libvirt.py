"""Deployment next to libvirt: where a domain's QEMU, its second monitor and its RAM are.

libvirt decides at every start of a domain what an ``indicators`` daemon
needs to know: QEMU's pid (in ``/run/libvirt/qemu/NAME.pid``) and the RAM
file (``/var/lib/libvirt/qemu/ram/DOMID-NAME/s390.ram``, DOMID new each
time).  It also owns QEMU's own QMP monitor, so the daemon's VMM link needs a
second one that the domain XML declares.  With ``[vmm] libvirt = "NAME"`` in
a config, :func:`resolve` turns the name into those facts:

- the VMM link's socket: :func:`monitor_socket` (``/run/indicators/NAME.vmm.sock``),
  the path :func:`domain_snippet` declares in the domain, unless the config
  names ``qmp_socket`` itself;
- ``vm_fd = "libvirt"`` (and ``flic_fd``) on a KVM host: ``pid:N`` with the
  pid libvirt wrote for the running QEMU (:func:`qemu_pid`);
- the RAM file: ``ram = "auto"`` already asks the VMM link (``qom-get`` of
  the memory backend's ``mem-path``, ``s390.ram`` under libvirt).

``indicators libvirt-snippet NAME`` prints :func:`domain_snippet`, or with
``--domain FILE`` the whole domain XML with it merged in (:func:`merge_into`).

    vmm, backend = resolve(config)     # LibvirtError names the domain and the file
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from xml.sax.saxutils import quoteattr

from ..config import Config, EmulatedBackendConfig, KvmBackendConfig, VmmConfig

__all__ = [
    "FROM_LIBVIRT",
    "LIBVIRT_RUN_DIR",
    "QEMU_NS",
    "RUN_DIR",
    "LibvirtError",
    "add_snippet_command",
    "check_name",
    "domain_snippet",
    "merge_into",
    "monitor_socket",
    "qemu_pid",
    "resolve",
]

#: Where the daemons' sockets are (the unit's RuntimeDirectory, the tmpfiles entry).
RUN_DIR = "/run/indicators"
#: Where libvirt's QEMU driver writes ``NAME.pid`` for each running domain.
LIBVIRT_RUN_DIR = "/run/libvirt/qemu"
#: The namespace of libvirt's ``<qemu:commandline>``.
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: The value of ``vm_fd``/``flic_fd`` that means "from libvirt's QEMU".
FROM_LIBVIRT = "libvirt"
_CHARDEV_ID = "indicators"
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path less the terminating NUL


class LibvirtError(OSError):
    """A libvirt domain's facts cannot be found: ``domain``, ``path`` and ``reason`` say why."""

    def __init__(self, domain: str, path: str, reason: str) -> None:
        self.domain = domain
        self.path = path
        self.reason = reason
        super().__init__(f"libvirt domain {domain!r}: {path}: {reason}")


def check_name(domain: str) -> str:
    """``domain`` if libvirt could name a domain so; LibvirtError otherwise."""
    if not domain or "/" in domain or "\0" in domain:
        raise LibvirtError(domain, "(name)", "a libvirt domain name is not empty and has no '/'")
    return domain


def monitor_socket(domain: str, run_dir: str = RUN_DIR) -> str:
    """The second QMP monitor's socket that :func:`domain_snippet` declares for ``domain``."""
    path = os.path.join(run_dir, f"{check_name(domain)}.vmm.sock")
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        raise LibvirtError(domain, path, f"longer than a unix socket path may be "
                           f"({_SUN_PATH_MAX} bytes): use a shorter domain name")  # fmt: skip
    return path


def qemu_pid(domain: str, libvirt_run_dir: str = LIBVIRT_RUN_DIR) -> int:
    """The pid of the domain's running QEMU, from the file libvirt keeps for it."""
    path = os.path.join(libvirt_run_dir, f"{check_name(domain)}.pid")
    try:
        with open(path) as file:
            text = file.read().strip()
    except FileNotFoundError:
        raise LibvirtError(domain, path, "no such file: the domain is not running") from None
    except OSError as exc:
        raise LibvirtError(domain, path, exc.strerror or str(exc)) from None
    if not text.isdigit() or int(text) <= 0:
        raise LibvirtError(domain, path, f"holds {text[:32]!r}, not a pid")
    pid = int(text)
    if not os.path.exists(f"/proc/{pid}"):
        raise LibvirtError(domain, path, f"QEMU pid {pid} is not running (a stale pid file)")
    return pid


def resolve(
    config: Config,
    *,
    run_dir: str = RUN_DIR,
    libvirt_run_dir: str = LIBVIRT_RUN_DIR,
) -> tuple[VmmConfig | None, EmulatedBackendConfig | KvmBackendConfig]:
    """The ``[vmm]`` and ``[backend]`` sections with what ``[vmm] libvirt`` stands for filled in.

    Without ``libvirt`` both come back unchanged.
    """
    vmm, backend = config.vmm, config.backend
    domain = vmm.libvirt if vmm is not None else None
    if isinstance(backend, KvmBackendConfig) and FROM_LIBVIRT in (backend.vm_fd, backend.flic_fd):
        if domain is None:
            raise LibvirtError("", "backend.vm_fd", "'libvirt' needs [vmm] libvirt = \"NAME\"")
        source = f"pid:{qemu_pid(domain, libvirt_run_dir)}"
        update = {"vm_fd": source} if backend.vm_fd == FROM_LIBVIRT else {}
        if backend.flic_fd == FROM_LIBVIRT:
            update["flic_fd"] = source
        backend = backend.model_copy(update=update)
    if vmm is not None and domain is not None and not vmm.qmp_socket:
        vmm = vmm.model_copy(update={"qmp_socket": monitor_socket(domain, run_dir)})
    return vmm, backend


# ----------------------------------------------------------------- domain XML


def _chardev(domain: str, run_dir: str) -> str:
    # QEMU's option syntax: a comma in a value is written twice.
    path = monitor_socket(domain, run_dir).replace(",", ",,")
    return f"socket,id={_CHARDEV_ID},path={path},server=on,wait=off"


def domain_snippet(domain: str, run_dir: str = RUN_DIR) -> str:
    """The XML a libvirt domain needs for an ``indicators`` daemon, with comments."""
    chardev = quoteattr(_chardev(domain, run_dir))
    return f"""\
<!-- For the indicators daemon of domain {check_name(domain).replace("--", "- -")}:
     add both elements inside <domain>, whose start tag must declare the
     QEMU namespace:
       <domain type='kvm' xmlns:qemu='{QEMU_NS}'>
     (or run: indicators libvirt-snippet NAME --domain FILE) -->

<!-- Guest RAM in a shared file the daemon maps (ram = "auto" finds it). -->
<memoryBacking>
  <source type='file'/>
  <access mode='shared'/>
</memoryBacking>

<!-- A second QMP monitor for the daemon's VMM link (libvirt owns the first);
     [vmm] libvirt = "NAME" looks for exactly this socket. -->
<qemu:commandline>
  <qemu:arg value='-chardev'/>
  <qemu:arg value={chardev}/>
  <qemu:arg value='-mon'/>
  <qemu:arg value='chardev={_CHARDEV_ID},mode=control'/>
</qemu:commandline>
"""


def merge_into(domain_xml: str, domain: str | None = None, run_dir: str = RUN_DIR) -> str:
    """``domain_xml`` with the shared file memory backing and the second monitor added.

    ``domain`` defaults to the XML's ``<name>``.  Existing ``<memoryBacking>``
    source and access are replaced, other children kept; an earlier
    ``indicators`` monitor is replaced, other ``<qemu:commandline>`` args kept.
    Raises ValueError for XML that is no libvirt domain.
    """
    ET.register_namespace("qemu", QEMU_NS)
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError as exc:
        raise ValueError(f"the domain XML does not parse: {exc}") from None
    if root.tag != "domain":
        raise ValueError(f"the XML's root element is <{root.tag}>, not <domain>")
    name = domain if domain is not None else (root.findtext("name") or "").strip()
    if not name:
        raise ValueError("the domain XML has no <name>: give the domain name")
    backing = root.find("memoryBacking")
    if backing is None:
        backing = ET.SubElement(root, "memoryBacking")
    for tag in ("source", "access"):
        for old in backing.findall(tag):
            backing.remove(old)
    ET.SubElement(backing, "source", type="file")
    ET.SubElement(backing, "access", mode="shared")
    q = f"{{{QEMU_NS}}}"
    commandline = root.find(f"{q}commandline")
    if commandline is None:
        commandline = ET.SubElement(root, f"{q}commandline")
    _drop_own_monitor(commandline, q)
    monitor = f"chardev={_CHARDEV_ID},mode=control"
    for value in ("-chardev", _chardev(name, run_dir), "-mon", monitor):
        ET.SubElement(commandline, f"{q}arg", value=value)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def _drop_own_monitor(commandline: ET.Element, q: str) -> None:
    """Remove the ``-chardev``/``-mon`` pairs an earlier merge added."""
    args = commandline.findall(f"{q}arg")
    values = [arg.get("value", "") for arg in args]
    mine = (f"id={_CHARDEV_ID},", f"chardev={_CHARDEV_ID},")
    for index in range(len(args) - 1):
        if values[index] in ("-chardev", "-mon") and any(m in values[index + 1] for m in mine):
            commandline.remove(args[index])
            commandline.remove(args[index + 1])


# ------------------------------------------------------------------ command line


def add_snippet_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``indicators libvirt-snippet NAME [--domain FILE]``."""
    parser = subparsers.add_parser(
        "libvirt-snippet",
        help="the XML a libvirt domain needs for a daemon",
        description="Print the domain XML elements an indicators daemon with "
        "[vmm] libvirt = NAME needs; with --domain, print that domain XML with them merged in.",
    )
    parser.add_argument("name", help="the libvirt domain name")
    parser.add_argument(
        "--domain", metavar="FILE", help="a domain's XML (virsh dumpxml NAME; '-' for stdin)"
    )
    parser.set_defaults(func=_snippet_command)


def _snippet_command(args: argparse.Namespace) -> int:
    try:
        if args.domain is None:
            sys.stdout.write(domain_snippet(args.name))
            return 0
        if args.domain == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.domain, "rb") as file:
                data = file.read()
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            source = "standard input" if args.domain == "-" else args.domain
            where = f"{exc.reason} at byte {exc.start}"
            raise ValueError(
                f"{source}: not UTF-8 text ({where}): give the XML of virsh dumpxml"
            ) from None
        sys.stdout.write(merge_into(text, args.name))
    except (ValueError, LibvirtError) as exc:
        print(f"indicators libvirt-snippet: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"indicators libvirt-snippet: {args.domain}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
