"""``[vmm] libvirt = "NAME"`` and ``indicators libvirt-snippet``: what a domain name stands for.

:mod:`indicators.daemon.libvirt` resolves the second monitor's socket and
QEMU's pid from a libvirt domain name and writes the domain XML that
declares them; tests/test_libvirt.py uses both against a real libvirtd.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import indicators_command, write_config

from indicators.config import parse_config

TIMEOUT = 30.0


def _libvirt_config(vmm: dict[str, Any], backend: dict[str, Any] | None = None) -> Any:
    return parse_config(
        {"backend": backend or {"kind": "emulated", "memory_size": "1M"}, "vmm": vmm}
    )


def test_a_domain_name_stands_for_the_monitor_socket_the_snippet_declares(tmp_path: Path) -> None:
    from indicators.daemon.libvirt import domain_snippet, resolve

    vmm, _ = resolve(_libvirt_config({"libvirt": "my guest"}), run_dir=str(tmp_path))
    assert vmm is not None and vmm.qmp_socket == f"{tmp_path}/my guest.vmm.sock"
    assert f"path={tmp_path}/my guest.vmm.sock,server=on" in domain_snippet(
        "my guest", str(tmp_path)
    )
    explicit = _libvirt_config({"libvirt": "g", "qmp_socket": "/elsewhere.sock"})
    assert resolve(explicit)[0] == explicit.vmm, "an explicit qmp_socket wins"
    plain = _libvirt_config({"qmp_socket": "/q.sock"})
    assert resolve(plain) == (plain.vmm, plain.backend), "no libvirt: nothing changes"


def test_vm_fd_libvirt_is_the_pid_libvirt_wrote(tmp_path: Path) -> None:
    from indicators.daemon.libvirt import LibvirtError, resolve

    kvm = {"kind": "kvm", "memory_size": "1M", "vm_fd": "libvirt", "flic_fd": "libvirt"}
    config = _libvirt_config({"libvirt": "g1"}, kvm)
    with pytest.raises(LibvirtError) as missing:
        resolve(config, libvirt_run_dir=str(tmp_path))
    assert missing.value.domain == "g1" and missing.value.path == f"{tmp_path}/g1.pid"
    assert "not running" in str(missing.value)
    (tmp_path / "g1.pid").write_text("garbage\n")
    with pytest.raises(LibvirtError, match="'garbage', not a pid"):
        resolve(config, libvirt_run_dir=str(tmp_path))
    (tmp_path / "g1.pid").write_text(f"{os.getpid()}\n")
    _, backend = resolve(config, libvirt_run_dir=str(tmp_path))
    assert backend.vm_fd == backend.flic_fd == f"pid:{os.getpid()}"  # type: ignore[union-attr]
    orphan = _libvirt_config({"qmp_socket": "/q.sock"}, kvm)
    with pytest.raises(LibvirtError, match="needs \\[vmm\\] libvirt"):
        resolve(orphan)


def test_names_libvirt_or_a_socket_cannot_take_are_refused() -> None:
    from indicators.config import ConfigError
    from indicators.daemon.libvirt import LibvirtError, monitor_socket

    with pytest.raises(LibvirtError, match="unix socket path"):
        monitor_socket("x" * 120)
    with pytest.raises(ConfigError, match="has a '/'"):
        _libvirt_config({"libvirt": "a/b"})
    with pytest.raises(ConfigError, match=r"give qmp_socket .* or libvirt"):
        _libvirt_config({})


def test_the_snippet_merges_into_a_plain_domain_once(tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    from indicators.daemon.libvirt import QEMU_NS

    plain = tmp_path / "plain.xml"
    plain.write_text(
        "<domain type='kvm'><name>a,b &amp; c</name><memoryBacking><hugepages/>"
        "<source type='memfd'/></memoryBacking><qemu:commandline "
        f"xmlns:qemu='{QEMU_NS}'><qemu:arg value='-trace'/><qemu:arg value='x'/>"
        "</qemu:commandline></domain>"
    )
    first = subprocess.run(
        indicators_command("libvirt-snippet", "a,b & c", "--domain", str(plain)),
        capture_output=True, text=True, check=True, timeout=TIMEOUT,
    ).stdout  # fmt: skip
    merged = tmp_path / "merged.xml"
    merged.write_text(first)
    again = subprocess.run(
        indicators_command("libvirt-snippet", "a,b & c", "--domain", "-"),
        input=first, capture_output=True, text=True, check=True, timeout=TIMEOUT,
    ).stdout  # fmt: skip
    assert again == first, "merging twice changes nothing"
    root = ET.fromstring(first)
    backing = root.find("memoryBacking")
    assert backing is not None
    assert [child.tag for child in backing] == ["hugepages", "source", "access"]
    assert backing.find("source").get("type") == "file"  # type: ignore[union-attr]
    assert backing.find("access").get("mode") == "shared"  # type: ignore[union-attr]
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert args == [
        "-trace", "x", "-chardev",
        "socket,id=indicators,path=/run/indicators/a,,b & c.vmm.sock,server=on,wait=off",
        "-mon", "chardev=indicators,mode=control",
    ]  # fmt: skip


def test_the_snippet_command_explains_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    for text, message in (("<domain>", "does not parse"), ("<network/>", "not <domain>")):
        bad.write_text(text)
        result = subprocess.run(
            indicators_command("libvirt-snippet", "g", "--domain", str(bad)),
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
    bad.write_bytes(b"\x7fELF\x02\x01\x01\xd0\xff")  # not text: the file is named
    result = subprocess.run(
        indicators_command("libvirt-snippet", "g", "--domain", str(bad)),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr.startswith(f"indicators libvirt-snippet: {bad}: not UTF-8 text"), (
        result.stderr
    )
    result = subprocess.run(  # the same through standard input
        indicators_command("libvirt-snippet", "g", "--domain", "-"),
        input=bad.read_bytes(), capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == b"", result.stderr
    assert result.stderr.startswith(b"indicators libvirt-snippet: standard input: not UTF-8")
    result = subprocess.run(
        indicators_command("libvirt-snippet", "g", "--domain", str(tmp_path / "none.xml")),
        capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 1 and "none.xml: No such file" in result.stderr
    result = subprocess.run(
        indicators_command("libvirt-snippet", "a/b"), capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 2 and "has no '/'" in result.stderr


def test_a_daemon_for_a_domain_that_is_not_running_says_so(tmp_path: Path) -> None:
    name = f"no such domain {os.getpid()}"
    raw = {
        "backend": {"kind": "kvm", "memory_size": "1M", "vm_fd": "libvirt"},
        "control": {"socket": str(tmp_path / "control.sock")},
        "vmm": {"libvirt": name},
    }
    config = write_config(tmp_path / "c.toml", raw)
    result = subprocess.run(
        indicators_command("run", "--config", str(config)), capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"libvirt domain {name!r}: /run/libvirt/qemu/{name}.pid" in result.stderr
    assert "the domain is not running" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "control.sock").exists()
