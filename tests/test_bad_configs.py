"""`indicators config check` and `indicators run` refuse the same configs with the same words.

Every file in tests/bad_configs/ is run through both commands as real
subprocesses in a scratch directory (which holds ``small.ram``, 4 KiB, for
the RAM-file case); both must exit 2 with the same stderr, which names
every ``# expect:`` text of the file and carries no traceback.  A rule that
only ``run`` applied would let ``config check`` pass (exit 0); a rule only
``config check`` applied would let ``run`` start (it would serve until the
timeout, and the test fails).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from daemon_helpers import TIMEOUT, indicators_command

CORPUS = Path(__file__).resolve().parent / "bad_configs"
FILES = sorted(CORPUS.glob("*.toml"))


def expectations(path: Path) -> list[str]:
    """The ``# expect:`` lines of a corpus file."""
    prefix = "# expect: "
    return [
        line[len(prefix) :] for line in path.read_text().splitlines() if line.startswith(prefix)
    ]


def indicators(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        indicators_command(*args),
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,  # ends a hang only: a refused config exits at once
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def test_the_corpus_covers_every_new_rule() -> None:
    names = {path.stem for path in FILES}
    assert {
        "storage-key-reserved-bit",
        "storage-key-page-not-numeric",
        "storage-key-value-not-numeric",
        "storage-key-page-outside-memory",
        "storage-key-page-misaligned",
        "ram-auto-without-vmm",
        "ram-file-too-small",
        "adapter-route-joins-zpci",
        "adapter-routes-disagree-on-isc",
        "adapter-zpci-suppressible-mixed",
        "one-pass-field-and-cross-device",
        "misspelled-field",
    } <= names
    for path in FILES:
        assert expectations(path), f"{path.name} has no '# expect:' line"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_check_and_run_refuse_alike(path: Path, tmp_path: Path) -> None:
    (tmp_path / "small.ram").write_bytes(bytes(4096))
    config = tmp_path / path.name
    config.write_text(path.read_text())
    before = sorted(p.name for p in tmp_path.iterdir())

    checked = indicators(tmp_path, "config", "check", config.name)
    assert checked.returncode == 2, checked.stdout + checked.stderr
    ran = indicators(tmp_path, "run", "--config", config.name)
    assert ran.returncode == 2, ran.stderr
    assert checked.stdout == ran.stdout == ""
    assert ran.stderr == checked.stderr
    assert checked.stderr.startswith(f"indicators: config error: {config.name}: ")
    assert "Traceback" not in checked.stderr
    for text in expectations(path):
        assert text in checked.stderr, f"{text!r} missing from:\n{checked.stderr}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created
    assert (tmp_path / "small.ram").stat().st_size == 4096
