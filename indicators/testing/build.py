"""The rig's toolchain: which binaries it needs, and the guest built once per source.

:func:`skip_reason` says which binaries are missing and how to install them
(a pytest skip message); :func:`build_guest` assembles and links
``guest/airq.S`` once per source hash into ``$XDG_CACHE_HOME/indicators``
(or ``~/.cache/indicators``), so a test session pays for it at most once.

    elf = build_guest()        # ToolsMissingError / BuildError on failure
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from indicators.testing.errors import RigError
from indicators.testing.guest import LINKER_SCRIPT, SOURCE

__all__ = [
    "APT_PACKAGES",
    "ASSEMBLER",
    "LINKER",
    "QEMU",
    "TOOLS",
    "BuildError",
    "ToolsMissingError",
    "build_guest",
    "cache_dir",
    "missing_tools",
    "skip_reason",
]

QEMU = "qemu-system-s390x"
ASSEMBLER = "s390x-linux-gnu-as"
LINKER = "s390x-linux-gnu-ld"
AS_FLAGS = ("-m64", "-march=z13")
APT_PACKAGES = ("qemu-system-misc", "binutils-s390x-linux-gnu")
#: binary -> the Debian package that ships it
TOOLS = {
    QEMU: "qemu-system-misc",
    ASSEMBLER: "binutils-s390x-linux-gnu",
    LINKER: "binutils-s390x-linux-gnu",
}


class ToolsMissingError(RigError):
    """Binaries the rig needs are not on PATH (``missing`` names them)."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = tuple(missing)
        super().__init__(_missing_message(self.missing))


class BuildError(RigError):
    """Assembling or linking the guest failed; ``output`` is the tool's."""

    def __init__(self, command: Sequence[str], output: str) -> None:
        self.command = tuple(command)
        self.output = output
        super().__init__(f"{' '.join(self.command)} failed:\n{output}")


def _missing_message(missing: Sequence[str]) -> str:
    packages = sorted({TOOLS[t] for t in missing})
    return f"missing {', '.join(missing)}; install with: apt-get install -y {' '.join(packages)}"


def missing_tools() -> list[str]:
    """The binaries of :data:`TOOLS` that are not on PATH."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def skip_reason() -> str | None:
    """Why the QEMU rig cannot run here (a pytest skip message), or None."""
    missing = missing_tools()
    return _missing_message(missing) if missing else None


def cache_dir() -> Path:
    """Where built guests are kept: ``$XDG_CACHE_HOME/indicators`` or ``~/.cache/indicators``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "indicators"


def build_guest(cache: Path | None = None) -> Path:
    """The guest ELF, assembled and linked unless the cache has this source's build."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), LINKER_SCRIPT.read_bytes(), " ".join(AS_FLAGS).encode()):
        digest.update(len(part).to_bytes(8, "big") + part)
    cache = cache_dir() if cache is None else cache
    elf = cache / f"airq-{digest.hexdigest()[:16]}.elf"
    if elf.exists():
        return elf
    missing = [t for t in (ASSEMBLER, LINKER) if shutil.which(t) is None]
    if missing:
        raise ToolsMissingError(missing)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        obj, out = Path(tmp) / "airq.o", Path(tmp) / "airq.elf"
        for cmd in (
            [ASSEMBLER, *AS_FLAGS, str(SOURCE), "-o", str(obj)],
            [LINKER, "-T", str(LINKER_SCRIPT), str(obj), "-o", str(out)],
        ):
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise BuildError(cmd, proc.stdout + proc.stderr)
        os.replace(out, elf)  # atomic: concurrent builders agree on the result
    return elf
