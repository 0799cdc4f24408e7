"""Config loading: every rule refuses a bad config with an error naming device and field."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from indicators.adapters import Bit, build_model
from indicators.config import Config, ConfigError, load_config, parse_config

BASE: dict[str, Any] = {
    "backend": {"kind": "emulated", "memory_size": "1M"},
    "devices": [
        {
            "name": "net0",
            "kind": "virtio-ccw",
            "summary_indicator": 0x1000,
            "device_indicator": 0x2000,
            "ind_bit": 0,
            "vectors": 3,
            "isc": 3,
            "key": 3,
        },
        {
            "name": "pci0",
            "kind": "zpci",
            "aibv": 0x3000,
            "aibvo": 4,
            "aisb": 0x4000,
            "aisbo": 9,
            "noi": 16,
            "isc": 2,
        },
        {
            "name": "route0",
            "kind": "kvm-route",
            "ind_addr": 0x5000,
            "ind_offset": 3,
            "summary_addr": 0x6000,
            "summary_offset": 1,
            "adapter_id": 17,
            "isc": 5,
            "vectors": 2,
        },
    ],
}


def with_change(path: str, value: Any) -> dict[str, Any]:
    """BASE with one field changed; ``devices.1.isc`` style paths."""
    raw = copy.deepcopy(BASE)
    node: Any = raw
    *parents, last = path.split(".")
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value
    return raw


def errors_of(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return str(info.value)


def test_valid_config_resolves_addresses_msb0() -> None:
    model = build_model(parse_config(copy.deepcopy(BASE)))
    net = model.device("net0")
    assert net.dsci == [Bit(0x2000, 0x80), Bit(0x2000, 0x40), Bit(0x2000, 0x20)]
    assert net.summary == Bit(0x1000, 0x01), "virtio ORs 0x01 into the summary byte"
    assert net.summary_test == "byte" and net.key == 3
    pci = model.device("pci0")
    assert pci.dsci[0] == Bit(0x3000, 0x08), "aibvo 4 -> bit 4 of the first byte"
    assert pci.dsci[4] == Bit(0x3001, 0x80)
    assert pci.summary == Bit(0x4001, 0x40), "aisbo 9 -> byte 1, mask 0x40"
    assert pci.adapter.suppressible and pci.adapter.id == 1 << 3 | 2
    route = model.device("route0")
    assert route.dsci == [Bit(0x5000, 0x10), Bit(0x5000, 0x08)]
    assert route.summary == Bit(0x6000, 0x40)
    assert route.summary_test == "bit", "KVM routes test the summary bit"
    assert route.adapter.id == 17
    assert net.adapter.id == 3, "virtio adapter id = 0 << 3 | isc"


def test_devices_of_one_type_and_isc_share_an_adapter() -> None:
    raw = copy.deepcopy(BASE)
    raw["devices"].append({**raw["devices"][0], "name": "net1", "device_indicator": 0x2100})
    model = build_model(parse_config(raw))
    assert model.device("net0").adapter is model.device("net1").adapter
    assert len(model.adapters) == 3


@pytest.mark.parametrize(
    ("path", "value", "where", "what"),
    [
        ("devices.0.isc", 8, "device 'net0'.isc", "less than or equal to 7"),
        ("devices.1.isc", -1, "device 'pci0'.isc", "greater than or equal to 0"),
        ("devices.0.key", 16, "device 'net0'.key", "less than or equal to 15"),
        ("devices.2.key", -1, "device 'route0'.key", "greater than or equal to 0"),
        ("devices.0.vectors", 0, "device 'net0'.vectors", "greater than or equal to 1"),
        ("devices.0.colour", "red", "device 'net0'.colour", "Extra inputs are not permitted"),
        ("backend.memory_size", "12Q", "backend.memory_size", "is not a size"),
        ("backend.memory_size", 4097, "backend.memory_size", "multiple of 4 KiB"),
        ("devices.1.kind", "scsi", "device 'pci0'", "kind 'scsi' is not one of"),
        ("devices.0.summary_test", "word", "device 'net0'.summary_test", "'byte' or 'bit'"),
    ],
)
def test_field_rules_name_the_device_and_field(
    path: str, value: Any, where: str, what: str
) -> None:
    text = errors_of(with_change(path, value))
    assert where in text, f"error should name {where!r}: {text}"
    assert what in text, f"error should say {what!r}: {text}"


def test_indicator_bits_outside_memory() -> None:
    raw = with_change("devices.0.device_indicator", (1 << 20) - 1)
    raw["devices"][0]["vectors"] = 9  # the ninth bit is in the byte past the end
    text = errors_of(raw)
    assert "device 'net0'.device_indicator" in text and "past guest memory" in text


def test_summary_outside_memory() -> None:
    text = errors_of(with_change("devices.1.aisb", 1 << 20))
    assert "device 'pci0'.aisb" in text and "past guest memory" in text


def test_overlapping_indicator_bits() -> None:
    raw = with_change("devices.2.ind_addr", 0x2000)
    raw["devices"][2]["ind_offset"] = 2  # net0 has bits 0..2 of that byte
    text = errors_of(raw)
    assert "device 'route0'.ind_addr" in text and "overlaps device 'net0'" in text


def test_indicator_overlapping_a_summary() -> None:
    text = errors_of(with_change("devices.0.device_indicator", 0x4001))
    assert "device 'net0'.device_indicator" in text and "summary" in text


def test_duplicate_names() -> None:
    raw = copy.deepcopy(BASE)
    raw["devices"].append({**raw["devices"][0], "device_indicator": 0x7000})
    text = errors_of(raw)
    assert "device 'net0'.name" in text and "duplicate" in text


def test_shared_summary_with_different_isc() -> None:
    raw = copy.deepcopy(BASE)
    raw["devices"].append({**raw["devices"][0], "name": "net1", "device_indicator": 0x7000,
                           "isc": 4})  # fmt: skip
    text = errors_of(raw)
    assert "device 'net1'.isc" in text and "shares its summary" in text


def test_odd_keys_are_quoted_in_errors() -> None:
    text = errors_of({**copy.deepcopy(BASE), "": 0, "a b": 1})
    assert "'': Extra inputs are not permitted" in text  # found by the config fuzzer
    assert "'a b': Extra inputs" in text


def test_unknown_top_level_field() -> None:
    text = errors_of({**copy.deepcopy(BASE), "colour": "red"})
    assert "colour" in text and "Extra inputs" in text


def test_kvm_backend_vm_fd_forms() -> None:
    raw = {**copy.deepcopy(BASE), "backend": {"kind": "kvm", "memory_size": "1M", "vm_fd": "pid:1"}}
    assert parse_config(raw).backend.kind == "kvm"
    raw["backend"]["vm_fd"] = "socket"
    assert "backend.vm_fd" in errors_of(raw)


def test_load_config_reads_toml(tmp_path: Any) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[backend]\nkind = "emulated"\nmemory_size = "64K"\n\n'
        '[[devices]]\nname = "d"\nkind = "virtio-ccw"\nsummary_indicator = 0x100\n'
        "device_indicator = 0x200\nvectors = 2\n"
    )
    config = load_config(path)
    assert config.backend.memory_size == 65536 and config.devices[0].isc == 3
    path.write_text("[backend\n")
    with pytest.raises(ConfigError, match="toml"):
        load_config(path)
    with pytest.raises(ConfigError, match="file"):
        load_config(tmp_path / "missing.toml")


def test_schema_is_json() -> None:
    schema = Config.model_json_schema()
    text = json.dumps(schema)
    assert "virtio-ccw" in text and "zpci" in text and "kvm-route" in text
