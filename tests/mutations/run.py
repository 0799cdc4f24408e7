"""Mutation check: does the suite catch the regressions issue 11 lists?

Each mutation is a textual patch (exact search -> replace) of one file of
the package.  For each, the package and the tests are copied to a
temporary directory, the patch is applied to the copy (a search string
that no longer matches exactly as often as expected fails loudly as
"pattern not found": re-target it, do not let it pass), and the test
files that should catch it run against the copy (``PYTHONPATH`` at the
copy, so ``indicators run`` subprocesses run the mutant too).  A mutation
is caught when those tests fail.  First the same tests run once on an
unpatched copy: they must pass there, or a "caught" would mean nothing.

    python tests/mutations/run.py              # all, with the baseline
    python tests/mutations/run.py -k reload    # those whose name contains "reload"
    python tests/mutations/run.py --list
    make mutations

Exit status 0 when every mutation was caught (and the baseline passed).
It is not part of the regular suite (pytest collects no file here).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Per pytest run: generous, it only ends a hang (a hang counts as caught, and says so).
TIMEOUT = 900.0
#: The QEMU soak, shortened for the mutation check (two warm-up rounds, then two).
SOAK = {"INDICATORS_SOAK_SECONDS": "45"}


@dataclass(frozen=True)
class Patch:
    """Replace ``search`` by ``replace`` in ``path``; ``count``: how often it must occur."""

    path: str
    search: str
    replace: str
    count: int = 1


@dataclass(frozen=True)
class Mutation:
    """A regression and the tests that must catch it (pytest arguments)."""

    name: str
    patches: tuple[Patch, ...]
    tests: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


SERVICE = "indicators/daemon/service.py"
ENGINE = "indicators/engine.py"
BATCH = "indicators/batch.py"
BITOR = "indicators/bitor.py"
SESSION = "indicators/daemon/qmp_session.py"
GUEST = "indicators/testing/guest/airq.S"
HOOKS = "indicators/daemon/guesthooks.py"

ACK_WITHOUT_WRITE = Patch(
    BATCH,
    "    for target in counts:\n        lead = target.lead\n",
    "    for target in counts:\n"
    "        globals()['_MUTANT'] = globals().get('_MUTANT', 0) + 1\n"
    "        if globals()['_MUTANT'] % 500 == 0:\n"
    "            continue  # acknowledged, never written\n"
    "        lead = target.lead\n",
)

#: Issue 10: a batch is atomic per device (no summary without its dsci, no dsci left without
#: its summary) and reset-adapter reaches the kernel's FLIC.
ISSUE_10: tuple[Mutation, ...] = (
    Mutation(
        "issue 10: summary stores not checked before the dsci is written (atomic)",
        (
            Patch(
                BATCH,
                "                refused = self._refuse(batch, work, where, refusal, refused)\n",
                "                pass\n",
            ),
        ),
        ("tests/test_engine_atomic.py",),
    ),
    Mutation(
        "issue 10: summary stores not checked before the dsci is written (engine)",
        (
            Patch(
                BATCH,
                "                refused = self._refuse(batch, work, where, refusal, refused)\n",
                "                pass\n",
            ),
        ),
        ("tests/test_engine.py",),
    ),
    Mutation(
        "issue 10: dsci bits not undone when the summary store fails (atomic)",
        (Patch(BATCH, "            notes = await self._undo(lost, written)\n", "            notes = {}\n"),),
        ("tests/test_engine_atomic.py",),
    ),
    Mutation(
        "issue 10: dsci bits not undone when the summary store fails (engine)",
        (Patch(BATCH, "            notes = await self._undo(lost, written)\n", "            notes = {}\n"),),
        ("tests/test_engine.py",),
    ),
    Mutation(
        "issue 10: reset-adapter does not reach the kernel's FLIC",
        (
            Patch(
                ENGINE,
                "        if self.sink.handles_suppression:\n            self.sink.reset_ais(isc)\n",
                "",
            ),
        ),
        ("tests/test_sinks.py",),
    ),
)

MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "ack-without-write-every-500th: daemon",
        (ACK_WITHOUT_WRITE,),
        ("tests/test_service_config.py::test_every_acknowledged_notify_reached_the_guest",),
    ),
    Mutation(
        "ack-without-write-every-500th: engine",
        (ACK_WITHOUT_WRITE,),
        ("tests/test_engine.py", "-k", "consumed_and_a_failed_one"),
    ),
    Mutation("ack-without-write-every-500th: demo", (ACK_WITHOUT_WRITE,), ("tests/test_demo.py",)),
    Mutation(
        "ack-without-write-every-500th: e2e (QEMU)",
        (ACK_WITHOUT_WRITE,),
        ("tests/test_e2e.py", "-k", "million or stop_and_cont"),
    ),
    Mutation(
        "ack-without-write-every-500th: soak (QEMU)",
        (ACK_WITHOUT_WRITE,),
        ("tests/test_soak.py",),
        SOAK,
    ),
    Mutation(
        "no backoff on -EAGAIN",
        (
            Patch(
                BITOR,
                "            await asyncio.sleep(delay * (0.5 + self._random.random() / 2))\n",
                "            pass\n",
            ),
        ),
        ("tests/test_retry.py",),
    ),
    Mutation(
        "no-exchange bound removed",
        (
            Patch(
                BITOR,
                "            if rounds >= self.policy.max_no_xchg_rounds:\n",
                "            if False:\n",
            ),
        ),
        ("tests/test_retry.py",),
    ),
    Mutation(
        "one token bucket shared by all clients",
        (
            Patch(
                SESSION,
                "        self._tokens = self._rate or 0.0\n"
                "        self._last = self._loop.time()\n",
                "        if not hasattr(QmpSession, 'shared_tokens'):\n"
                "            QmpSession.shared_tokens = self._rate or 0.0\n"
                "            QmpSession.shared_last = self._loop.time()\n",
            ),
            Patch(SESSION, "self._tokens", "QmpSession.shared_tokens", count=4),
            # not self._last_input, the idle timer's
            Patch(SESSION, "self._last ", "QmpSession.shared_last ", count=2),
            Patch(SESSION, "self._last)", "QmpSession.shared_last)", count=1),
        ),
        ("tests/test_service_config.py", "-k", "greedy"),
    ),
    Mutation(
        "rate limit not wired from the config",
        (
            Patch(
                SERVICE,
                "            max_rate=control.max_rate if control else None,\n",
                "            max_rate=None,\n",
            ),
        ),
        ("tests/test_service_config.py", "-k", "greedy"),
    ),
    Mutation(
        "every peer admitted by default",
        (
            Patch(
                SERVICE,
                "            uids = {0, os.getuid()}\n"
                "        return peer.uid in uids or peer.gid in gids  # the server logs a "
                "refusal\n",
                "            return True\n"
                "        return peer.uid in uids or peer.gid in gids  # the server logs a "
                "refusal\n",
            ),
        ),
        ("tests/test_service_config.py", "-k", "peer_policy"),
    ),
    Mutation(
        "write guard removed from the service's wiring",
        (
            Patch(
                SERVICE,
                "self.model, self.registry.confine(self.wiring.backend), self.wiring.sink,",
                "self.model, self.wiring.backend, self.wiring.sink,",
            ),
        ),
        ("tests/test_service_config.py", "-k", "write_guard"),
    ),
    Mutation(
        "global max_eventfds ignored",
        (
            Patch(
                SERVICE,
                "            control.max_eventfds if control else 1024,\n",
                "            1024,\n",
            ),
        ),
        ("tests/test_service_config.py", "-k", "eventfd_limit_in_all"),
    ),
    Mutation(
        "disconnect_grace timer never fires",
        (
            Patch(
                "indicators/daemon/vmm.py",
                "                self.grace, self.hooks.unavailable,",
                "                self.grace + 1e9, self.hooks.unavailable,",
            ),
        ),
        ("tests/test_service_vmm.py", "-k", "grace"),
    ),
    Mutation(
        "periodic dump-skeys refresh not started",
        (
            Patch(
                SERVICE,
                "        if self.vmm is not None and self.config.vmm and "
                "self.config.vmm.skeys_refresh:\n",
                "        if False:\n",
            ),
        ),
        ("tests/test_service_vmm.py", "-k", "periodic"),
    ),
    Mutation(
        "refresh on re-attach skipped",
        (
            Patch(
                SERVICE,
                "        if vmm.skeys_refresh:\n            await self.refresh_storage_keys()\n",
                "        pass\n",
            ),
        ),
        ("tests/test_service_vmm.py", "-k", "reattach"),
    ),
    Mutation(
        "listeners lost on reload",
        (
            Patch(
                SERVICE,
                "        self.engine.policy = new.retry\n",
                "        self.engine.policy = new.retry\n        self.engine._listeners.clear()\n",
            ),
        ),
        ("tests/test_service_reload.py", "-k", "listeners"),
    ),
    Mutation(
        "suppression state lost on reload",
        (
            Patch(
                SERVICE,
                "        self.engine.policy = new.retry\n",
                "        self.engine.policy = new.retry\n        self.engine.reset_suppression()\n",
            ),
        ),
        ("tests/test_service_reload.py", "-k", "suppression"),
    ),
    Mutation(
        "retry policy lost on reload",
        (Patch(SERVICE, "        self.engine.policy = new.retry\n", ""),),
        ("tests/test_service_reload.py", "-k", "retry_policy"),
    ),
    Mutation(
        "holds lost on reload",
        (
            Patch(
                SERVICE,
                "        self.engine.policy = new.retry\n",
                "        self.engine.policy = new.retry\n        self.engine.resume()\n",
            ),
        ),
        ("tests/test_service_reload.py", "-k", "holds"),
    ),
    Mutation(
        "a reload keeps the eventfds of a removed device",
        (
            Patch(
                "indicators/daemon/registry.py",
                "                self.eventfds.detach_device(name)\n",
                "                pass\n",
            ),
        ),
        ("tests/test_service_reload.py", "-k", "eventfd"),
    ),
    Mutation(
        "reload refused while notifications are pending",
        (
            Patch(
                SERVICE,
                "        self.engine.policy = new.retry\n",
                "        self.engine.policy = new.retry\n"
                "        if self.engine.pending:\n"
                "            return self._reload_refused('notifications are pending')\n",
            ),
        ),
        ("tests/test_service_reload.py", "-k", "pending"),
    ),
    Mutation(
        "most notifications fail (the soak must say so)",
        (
            Patch(
                BITOR,
                "        where = gaddr << 5 | size\n"
                "        current = self._seen.get(where, 0) & ~bits\n",
                "        where = gaddr << 5 | size\n"
                "        current = self._seen.get(where, 0) & ~bits\n"
                "        if self._random.random() < 0.75:\n"
                "            raise OrFailure('EIO', 'mutant', gaddr, size, key)\n",
            ),
        ),
        ("tests/test_soak.py",),
        SOAK,
    ),
    Mutation(
        "10 KiB leaked per request (the soak must say so)",
        (
            Patch(SESSION, "\nclass QmpSession", "\n_LEAK: list = []\n\n\nclass QmpSession"),
            Patch(
                SESSION,
                "        command = self._commands.get(request.command)\n",
                "        _LEAK.append(bytes(range(256)) * 40)\n"
                "        command = self._commands.get(request.command)\n",
            ),
        ),
        ("tests/test_soak.py",),
        SOAK,
    ),
    Mutation(
        "reboot: guest devices dropped after the VM runs again (QEMU)",
        (
            Patch(
                HOOKS,
                '        self.holds.hold("guest-reset")\n'
                "        try:\n"
                "            names, narrowing = self.registry.drop_guest(reason)\n",
                "        try:\n"
                "            if self.vmm is not None:\n"
                "                await self.vmm.reset_and_continue()\n"
                "            names, narrowing = self.registry.drop_guest(reason)\n",
            ),
            Patch(
                HOOKS,
                "            if self.vmm is not None:\n"
                "                await self.vmm.reset_and_continue()\n"
                "        finally:\n"
                '            self.holds.release("guest-reset")\n',
                "        finally:\n            pass\n",
            ),
            Patch(
                HOOKS,
                '        """The guest was reset: drop its devices, clear suppression state."""\n'
                '        self.registry.drop_guest("guest-reset")\n',
                '        """The guest was reset: drop its devices, clear suppression state."""\n',
            ),
        ),
        ("tests/test_reboot.py", "-k", "torture"),
    ),
    Mutation(
        "reboot: the guest does not count what the previous boot left set (QEMU)",
        (Patch(GUEST, "15:     brasl   %r14,scan\n", "15:     nopr    %r7\n"),),
        ("tests/test_reboot.py", "-k", "torture"),
    ),
    Mutation(
        "reboot: the guest does not zero its new areas (QEMU)",
        (Patch(GUEST, "18:     mvcle   %r2,%r4,0\n        jo      18b\n", ""),),
        ("tests/test_reboot.py", "-k", "torture"),
    ),
    *ISSUE_10,
)


class PatternNotFound(Exception):
    """A mutation's search string no longer matches the code: re-target it."""


def copy_tree(destination: Path) -> None:
    """The package, the tests and the project config, as they are in the worktree."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis")
    shutil.copytree(ROOT / "indicators", destination / "indicators", ignore=ignore)
    shutil.copytree(ROOT / "tests", destination / "tests", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", destination / "pyproject.toml")


def apply(copy: Path, patch: Patch) -> None:
    """Apply ``patch`` to the copy; PatternNotFound unless it matches ``count`` times."""
    path = copy / patch.path
    text = path.read_text()
    found = text.count(patch.search)
    if found != patch.count:
        raise PatternNotFound(
            f"pattern not found {patch.count} time(s) in {patch.path} (found {found}): "
            f"{patch.search.strip()[:70]!r}"
        )
    path.write_text(text.replace(patch.search, patch.replace))


def run_tests(copy: Path, tests: tuple[str, ...], env: dict[str, str]) -> tuple[str, float, str]:
    """Run pytest on the copy: ("passed" | "failed" | "error N" | "timeout", seconds, tail)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    environment = {**os.environ, **env, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.monotonic()
    process = subprocess.Popen(
        command, cwd=copy, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True, text=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # our own session: pytest and its daemons
        output, _ = process.communicate()
        return "timeout", time.monotonic() - started, output[-2000:]
    seconds = time.monotonic() - started
    tail = "\n".join(output.strip().splitlines()[-15:])
    if process.returncode == 0:
        return "passed", seconds, tail
    if process.returncode == 1 and re.search(r"\b\d+ failed\b", output):
        return "failed", seconds, tail  # tests ran and failed (not pytest itself missing)
    return f"error {process.returncode}", seconds, tail


def check(mutation: Mutation, verbose: bool) -> tuple[str, float]:
    """Run one mutation; its verdict ("caught", "MISSED", ...) and seconds."""
    with tempfile.TemporaryDirectory(prefix="indicators-mutant-") as directory:
        copy = Path(directory)
        copy_tree(copy)
        try:
            for patch in mutation.patches:
                apply(copy, patch)
        except PatternNotFound as exc:
            return f"PATTERN NOT FOUND: {exc}", 0.0
        outcome, seconds, tail = run_tests(copy, mutation.tests, mutation.env)
    if verbose or outcome not in ("failed", "passed"):
        print(tail, file=sys.stderr)
    verdict = {"failed": "caught", "passed": "MISSED", "timeout": "caught (by a hang!)"}
    return verdict.get(outcome, f"ERROR ({outcome})"), seconds


def baseline(mutations: list[Mutation]) -> list[str]:
    """Run each distinct test selection unmutated; the ones that do not pass."""
    broken = []
    with tempfile.TemporaryDirectory(prefix="indicators-baseline-") as directory:
        copy = Path(directory)
        copy_tree(copy)
        for tests, env in {(m.tests, tuple(sorted(m.env.items()))): None for m in mutations}:
            outcome, seconds, tail = run_tests(copy, tests, dict(env))
            print(f"  baseline {' '.join(tests)}: {outcome} ({seconds:.0f} s)", flush=True)
            if outcome != "passed":
                print(tail, file=sys.stderr)
                broken.append(" ".join(tests))
    return broken


def main() -> int:
    """Run the mutations; print the caught/missed table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each test tail")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.k.lower() in m.name.lower()]
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name}: {' '.join(mutation.tests)}")
        return 0
    broken = [] if args.no_baseline else baseline(chosen)
    rows = []
    for mutation in chosen:
        verdict, seconds = check(mutation, args.verbose)
        rows.append((mutation.name, " ".join(mutation.tests), verdict, seconds))
        print(f"  {verdict:<8} {mutation.name} ({seconds:.0f} s)", flush=True)
    width = max(len(r[0]) for r in rows)
    print(f"\n{'mutation':<{width}}  {'result':<8}  seconds  tests")
    for name, tests, verdict, seconds in rows:
        print(f"{name:<{width}}  {verdict:<8}  {seconds:7.0f}  {tests}")
    caught = sum(r[2].startswith("caught") for r in rows)
    print(f"\n{caught} of {len(rows)} caught" + (f"; baseline broken: {broken}" if broken else ""))
    return 0 if caught == len(rows) and not broken else 1


if __name__ == "__main__":
    raise SystemExit(main())
