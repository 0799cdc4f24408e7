"""Every example config in config/ loads and validates against the schema; demo.toml is the
embedded default; the schema says what the loader does."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from indicators.config import ConfigError, load_config, parse_config
from indicators.demo import DEMO_CONFIG, demo_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
EXAMPLES = sorted(CONFIG_DIR.glob("*.toml"))


def test_there_are_examples_of_each_kind() -> None:
    names = {path.stem for path in EXAMPLES}
    assert {"demo", "virtio-ccw", "zpci", "kvm"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(path: Path) -> None:
    config = load_config(path)
    assert config.devices, f"{path.name} configures no device"


def test_demo_file_matches_the_embedded_default() -> None:
    raw = tomllib.loads((CONFIG_DIR / "demo.toml").read_text())
    from_file = load_config(CONFIG_DIR / "demo.toml")
    embedded = demo_config(raw["control"]["socket"])
    assert from_file == embedded
    assert len(DEMO_CONFIG["devices"]) == len(from_file.devices)


# ------------------------------------------------ the schema, true to the loader


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    """The validator of what ``indicators config schema`` prints (a real subprocess)."""
    result = subprocess.run(
        [sys.executable, "-m", "indicators.cli", "config", "schema"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    schema = json.loads(result.stdout)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_against_the_schema(path: Path, validator: Draft202012Validator) -> None:
    raw = tomllib.loads(path.read_text())
    problems = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(raw)]
    assert problems == []


SIZES = ["16M", "1GiB", " 64 k ", "8KB", "4096", 4096, 1 << 20, "12Q", "16 megs", "", 0, -4096]


@pytest.mark.parametrize("size", SIZES, ids=repr)
def test_schema_and_loader_agree_on_sizes(size: object, validator: Draft202012Validator) -> None:
    raw = {"backend": {"kind": "emulated", "memory_size": size}}
    try:
        parse_config(raw)
        loads = True
    except ConfigError:
        loads = False
    assert validator.is_valid(raw) == loads


def test_the_schema_advertises_no_default_for_a_kind(validator: Draft202012Validator) -> None:
    # `kind` tells the union members apart: the loader needs it written, so a
    # default in the schema would promise what the loader does not do.
    tagged = {
        name: definition
        for name, definition in validator.schema["$defs"].items()
        if "kind" in definition.get("properties", {})
    }
    assert len(tagged) == 5  # two backends, three device kinds
    for name, definition in tagged.items():
        assert "default" not in definition["properties"]["kind"], name
        assert "kind" in definition["required"], name
    assert not validator.is_valid({"backend": {"memory_size": "16M"}})
    with pytest.raises(ConfigError, match="backend"):
        parse_config({"backend": {"memory_size": "16M"}})
