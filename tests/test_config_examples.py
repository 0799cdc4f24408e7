"""Every example config in config/ is valid; demo.toml is the embedded default."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from indicators.config import load_config
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
