"""Scale and contention now and before issue 13, measured side by side in one run.

"No worse than now" cannot be judged against figures stored on another day:
on this shared 2-CPU machine the contention case alone swings 2x with the
neighbours' load.  So ``run_all.py`` exports the package as it was before
issue 13's changes (commit :data:`REFERENCE`, with ``git archive``) into a
temporary directory and runs the same ``bench_scale.py`` against it and
against the working tree, alternately, ``runs`` times each.  Per
configuration the best single and burst figures count (as within
``bench_scale.py``); for contention the medians.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: The last commit before issue 13's changes.
REFERENCE = "a3ad8ca"


def export(commit: str, into: Path) -> bool:
    """Write ``indicators/`` as of ``commit`` under ``into``; False without git history."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", commit, "indicators"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return True


def _scale(pythonpath: str, seconds: str, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    command = [sys.executable, str(HERE / "bench_scale.py"), "--seconds", seconds]
    subprocess.run([*command, "--json", str(out)], env=env, check=True, stdout=subprocess.DEVNULL)
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best scale figures per configuration, the median contention run."""
    scale = []
    for rows in zip(*(run["scale"] for run in runs), strict=True):
        best = dict(rows[0])
        for key in ("startup_s", "rss_kib", "single_us", "burst_us"):
            best[key] = min(row[key] for row in rows)
        scale.append(best)
    contention = [run["contention"] for run in runs]
    median = dict(contention[0])
    for key in ("per_second", "per_cpu_second", "no_xchg_per_notify"):
        median[key] = statistics.median(c[key] for c in contention)
    return {"scale": scale, "contention": median}


def scale_now_and_before(seconds: str, runs: int, out: Path) -> dict[str, Any] | None:
    """``{"now": ..., "before": ...}`` from alternating runs; None if the export failed."""
    with tempfile.TemporaryDirectory(prefix="bench-reference-") as tmp:
        if not export(REFERENCE, Path(tmp)):
            return None
        current = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        sides: dict[str, list[dict[str, Any]]] = {"now": [], "before": []}
        for number in range(runs):
            what = f"now and at {REFERENCE} ({number + 1}/{runs})"
            print(f"== bench_scale.py --seconds {seconds}: {what}", flush=True)
            sides["now"].append(_scale(current, seconds, out))
            sides["before"].append(_scale(tmp, seconds, out))
    result = {side: combine(found) for side, found in sides.items()}
    result["reference"] = REFERENCE
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result
