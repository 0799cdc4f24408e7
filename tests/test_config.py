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


# ------------------------------------------------------- adapter identity


def problems_of(raw: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return info.value.errors


ROUTE_ON_10 = {
    "name": "route10",
    "kind": "kvm-route",
    "ind_addr": 0x8000,
    "summary_addr": 0x9000,
    "adapter_id": 10,  # the zPCI adapter of isc 2 is 1 << 3 | 2 = 10
    "isc": 6,
}


def test_a_route_on_a_zpci_adapter_id_is_refused_naming_both_devices() -> None:
    raw = copy.deepcopy(BASE)
    raw["devices"].append(ROUTE_ON_10)
    [(where, what)] = problems_of(raw)
    assert where == "device 'route10'.adapter_id"
    assert "adapter 10 of device 'pci0'" in what
    assert "zpci adapter 1 << 3 | isc 2 = 10" in what and "isc 6" in what


def test_a_route_on_a_zpci_adapter_id_is_refused_even_with_the_same_isc() -> None:
    raw = copy.deepcopy(BASE)
    raw["devices"].append({**ROUTE_ON_10, "isc": 2})
    [(where, what)] = problems_of(raw)
    assert where == "device 'route10'.adapter_id" and "one kind" in what


def test_routes_on_one_adapter_id_agree_on_the_isc() -> None:
    raw = copy.deepcopy(BASE)
    second = {**raw["devices"][2], "name": "route1", "ind_addr": 0x8000, "summary_addr": 0x9000}
    raw["devices"].append(second)
    assert len(build_model(parse_config(copy.deepcopy(raw))).adapters[17].devices) == 2
    raw["devices"][3]["isc"] = 4
    [(where, what)] = problems_of(raw)
    assert where == "device 'route1'.isc"
    assert "adapter 17 of device 'route0' (kvm-route adapter_id 17, isc 5)" in what


def test_suppressible_and_plain_zpci_functions_need_different_iscs() -> None:
    raw = copy.deepcopy(BASE)
    plain = {**raw["devices"][1], "name": "pci1", "aibv": 0x8000, "aisb": 0x9000}
    raw["devices"].append({**plain, "suppressible": False})
    [(where, what)] = problems_of(raw)
    assert where == "device 'pci1'.suppressible"
    assert "adapter 10 of device 'pci0'" in what and "suppressible = true" in what
    raw["devices"][3]["isc"] = 4  # its own adapter 12
    adapters = build_model(parse_config(raw)).adapters
    assert adapters[10].suppressible and not adapters[12].suppressible


def test_virtio_and_zpci_adapters_never_collide() -> None:
    raw = copy.deepcopy(BASE)
    raw["devices"][1]["isc"] = 3  # virtio isc 3 is adapter 3, zPCI isc 3 is adapter 11
    assert sorted(build_model(parse_config(raw)).adapters) == [3, 11, 17]


# ---------------------------------------------- backend rules, in one pass


@pytest.mark.parametrize(
    ("keys", "where", "what"),
    [
        ({"0x10000": 0x31}, "storage_keys.0x10000", "key 0x31 sets the reserved bit 0x01"),
        ({"0x10000": 0x100}, "storage_keys.0x10000", "key 0x100 is not a key byte"),
        ({"0x10000": -1}, "storage_keys.0x10000", "key -0x1 is not a key byte"),
        ({"page": 0x30}, "storage_keys.page", "page 'page' is not a number"),
        ({"0x100000": 0x30}, "storage_keys.0x100000", "page 0x100000 is outside guest memory"),
        (
            {"0x10800": 0x30},
            "storage_keys.0x10800",
            "not 4 KiB aligned (its page starts at 0x10000",
        ),
        ({"0x10000": "x"}, "storage_keys.0x10000", "valid integer, unable to parse string"),
    ],
)
def test_storage_keys(keys: dict[str, Any], where: str, what: str) -> None:
    text = errors_of(with_change("backend.storage_keys", keys))
    assert f"backend.{where}: " in text and what in text


def test_good_storage_keys_pass() -> None:
    raw = with_change("backend.storage_keys", {"0x10000": 0x30, "4096": 0xFE, "0": 0})
    assert parse_config(raw).backend.storage_keys["0x10000"] == 0x30


def test_ram_auto_needs_the_vmm_link() -> None:
    raw = with_change("backend.ram", "auto")
    assert (
        "backend.ram",
        "'auto' asks the [vmm] link for the RAM file, but there is no [vmm]",
    ) in (problems_of(raw))
    raw["vmm"] = {"qmp_socket": "/run/qemu/guest.qmp"}
    assert parse_config(raw).backend.ram == "auto"


def test_an_existing_ram_file_must_hold_memory_size(tmp_path: Any) -> None:
    ram = tmp_path / "guest.ram"
    raw = with_change("backend.ram", str(ram))
    assert parse_config(copy.deepcopy(raw))  # missing: the backend creates it
    ram.write_bytes(bytes(1 << 20))
    assert parse_config(copy.deepcopy(raw))  # exactly memory_size
    ram.write_bytes(bytes(4096))
    [(where, what)] = problems_of(copy.deepcopy(raw))
    assert where == "backend.ram"
    assert what == f"RAM file {str(ram)!r} has 0x1000 bytes, fewer than memory_size 0x100000"
    raw["backend"]["ram"] = str(tmp_path)
    assert problems_of(raw) == [
        ("backend.ram", f"RAM file {str(tmp_path)!r} is not a regular file")
    ]


def test_field_errors_and_rules_come_in_one_pass() -> None:
    raw = copy.deepcopy(BASE)
    raw["backend"]["storage_keys"] = {"0x10001": 0x30}
    raw["devices"][0]["isc"] = 9  # a field error on net0 ...
    raw["devices"][2]["ind_addr"] = 0x3000  # ... and route0 overlapping pci0
    raw["devices"][1]["colour"] = "red"  # pci0 invalid too: route0 then overlaps nobody
    raw["devices"].append({**ROUTE_ON_10, "isc": 2, "ind_addr": 0x3000, "ind_offset": 4})
    wheres = [where for where, _ in problems_of(raw)]
    assert wheres == [
        "device 'net0'.isc",
        "device 'pci0'.colour",
        "backend.storage_keys.0x10001",
        "device 'route10'.ind_addr",  # overlaps route0, both valid on their own
    ]


@pytest.mark.parametrize(
    ("path", "value", "where", "hint"),
    [
        ("devices.0.vectros", 3, "device 'net0'.vectros", "did you mean 'vectors'?"),
        ("backend.memory_sise", "1M", "backend.memory_sise", "did you mean 'memory_size'?"),
        ("contol", {}, "contol", "did you mean 'control'?"),
        ("devices.1.kind", "zcpi", "device 'pci0'", "did you mean 'zpci'?"),
        ("backend.kind", "kvmm", "backend", "did you mean 'kvm'?"),
    ],
)
def test_a_near_miss_gets_a_did_you_mean(path: str, value: Any, where: str, hint: str) -> None:
    problems = dict(problems_of(with_change(path, value)))
    assert where in problems and problems[where].endswith(hint), problems


def test_field_errors_show_the_value_given() -> None:
    problems = dict(problems_of(with_change("devices.2.ind_addr", -0x10000)))
    assert problems["device 'route0'.ind_addr"].endswith("(given -0x10000)")
    problems = dict(problems_of(with_change("devices.0.summary_test", "word")))
    assert problems["device 'net0'.summary_test"].endswith("(given 'word')")


def test_a_field_spelled_like_a_kind_keeps_its_place_in_the_location() -> None:
    problems = dict(problems_of(with_change("devices.1.zpci", 1)))
    assert "device 'pci0'.zpci" in problems
