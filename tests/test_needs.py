"""What a missing need does: skip on a user's machine, fail with CI set."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import need

HERE = Path(__file__).parent


def test_a_met_need_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "1")
    need(True, "never shown")


def test_a_missing_need_skips_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs a unicorn"):
        need(False, "needs a unicorn")


def test_a_missing_need_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run this test, but: needs a unicorn"):
        need(False, "needs a unicorn")


MARKED = textwrap.dedent(
    """
    import pytest

    @pytest.mark.needs(False, reason="needs a unicorn")
    def test_marked():
        pass
    """
)


@pytest.mark.parametrize(("ci", "outcome"), [("", "1 skipped"), ("1", "1 error")])
def test_the_needs_marker_skips_or_fails_in_ci(tmp_path: Path, ci: str, outcome: str) -> None:
    (tmp_path / "conftest.py").write_text((HERE / "conftest.py").read_text())
    (tmp_path / "test_marked.py").write_text(MARKED)
    env = {"CI": ci, "PATH": "/usr/bin:/bin"}
    # The copied conftest imports the helper modules beside it in tests/.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rsf", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert outcome in result.stdout, result.stdout + result.stderr
    assert "needs a unicorn" in result.stdout
