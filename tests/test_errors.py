"""One error root: every error the package raises on purpose is an IndicatorsError.

The wiring tests here open real backends (anonymous memory, RAM files in
tmp_path) and check the typed refusals and the undo of a failed start.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from indicators.config import ConfigError, EmulatedBackendConfig
from indicators.daemon.eventfds import EventfdError
from indicators.daemon.privileges import PrivilegeError
from indicators.daemon.wiring import open_backend
from indicators.engine import NotifyError
from indicators.errors import IndicatorsError, ResourceError
from indicators.memop import KvmUnavailableError
from indicators.memop.base import MemopError, ProgramException, TransientError
from indicators.memop.vmfd import VmFdError


@pytest.mark.parametrize(
    ("error", "exit_code", "builtin"),
    [
        (ConfigError, 2, ValueError),
        (ResourceError, 1, OSError),
        (KvmUnavailableError, 1, RuntimeError),
        (VmFdError, 1, OSError),
        (PrivilegeError, 1, PermissionError),
        (EventfdError, 1, ValueError),
        (MemopError, 1, Exception),
        (TransientError, 1, Exception),
        (ProgramException, 1, Exception),
        (NotifyError, 1, Exception),
    ],
)
def test_every_error_is_under_the_root(
    error: type[Exception], exit_code: int, builtin: type[Exception]
) -> None:
    assert issubclass(error, IndicatorsError)
    assert issubclass(error, builtin)  # older `except` clauses keep working
    assert error.exit_code == exit_code  # type: ignore[attr-defined]


def test_the_tree_in_the_docstring_names_every_class() -> None:
    import indicators.errors

    doc = indicators.errors.__doc__ or ""
    for name in ("ConfigError", "ResourceError", "KvmUnavailableError", "VmFdError",
                 "PrivilegeError", "EventfdError", "MemopError", "TransientError",
                 "ProgramException", "NotifyError"):  # fmt: skip
        assert name in doc


def test_resource_error_carries_its_fields() -> None:
    exc = ResourceError.from_os_error(
        "metrics endpoint", "192.0.2.1:9464", OSError(errno.EADDRNOTAVAIL, "Cannot assign"),
        action="bind",
    )  # fmt: skip
    assert (exc.what, exc.where, exc.errno, exc.reason, exc.action) == (
        "metrics endpoint", "192.0.2.1:9464", errno.EADDRNOTAVAIL, "Cannot assign", "bind",
    )  # fmt: skip
    assert str(exc) == "cannot bind the metrics endpoint 192.0.2.1:9464: Cannot assign"


# ---------------------------------------------------------------- wiring


def backend(**fields: object) -> EmulatedBackendConfig:
    """A backend section validated field by field only (not by parse_config's rules)."""
    return EmulatedBackendConfig.model_validate({"kind": "emulated", "memory_size": "1M", **fields})


def test_wiring_refuses_what_the_config_rules_refuse() -> None:
    with pytest.raises(ConfigError) as info:
        open_backend(backend(storage_keys={"0x10010": 0x31}))
    assert [where for where, _ in info.value.errors] == ["backend.storage_keys.0x10010"] * 2
    with pytest.raises(ConfigError, match=r"backend.ram: 'auto' .* no \[vmm\]"):
        open_backend(backend(ram="auto"))


def test_wiring_maps_a_small_ram_file_of_the_vmm_as_a_resource_error(tmp_path: Path) -> None:
    ram = tmp_path / "qemu.ram"
    ram.write_bytes(bytes(4096))
    with pytest.raises(ResourceError) as info:
        open_backend(backend(ram="auto"), str(ram))
    assert (info.value.what, info.value.where) == ("RAM file", str(ram))
    assert "fewer than memory_size 0x100000" in str(info.value)


def test_discard_removes_only_a_ram_file_the_wiring_created(tmp_path: Path) -> None:
    created = tmp_path / "new.ram"
    wiring = open_backend(backend(ram=str(created)))
    assert wiring.created == str(created) and created.stat().st_size == 1 << 20
    wiring.discard()
    assert not created.exists()

    existing = tmp_path / "old.ram"
    existing.write_bytes(bytes(1 << 20))
    wiring = open_backend(backend(ram=str(existing)))
    assert wiring.created is None
    wiring.discard()
    assert existing.exists()


def test_a_ram_file_that_cannot_be_created_is_a_resource_error(tmp_path: Path) -> None:
    path = tmp_path / "no-dir" / "guest.ram"
    with pytest.raises(ResourceError) as info:
        open_backend(backend(ram=str(path)))
    assert info.value.errno == errno.ENOENT and info.value.where == str(path)
