"""Mutation check: does the suite catch the regressions of issues 10, 11, 12 and 14?

Each mutation is a textual patch (exact search -> replace) of one file of
the package.  For each, the package and the tests are copied to a
temporary directory, the patch is applied to the copy (a search string
that no longer matches exactly as often as expected fails loudly as
"pattern not found": re-target it, do not let it pass), and the test
files that should catch it run against the copy (``PYTHONPATH`` at the
copy, so ``indicators run`` subprocesses run the mutant too).  A mutation
is caught when those tests fail.  First the same tests run once on an
unpatched copy: they must pass there, or a "caught" would mean nothing.

The rows come in groups; a group's names share a prefix, for ``-k``:

- ``issue 10:`` atomic failure: the summary stores' check before any dsci
  bit is written skipped, the undo of the dsci bits after a failed summary
  store skipped (each against test_engine_atomic.py and test_engine.py),
  reset-adapter no longer reaching the kernel's FLIC;
- issue 11, no prefix: an acknowledged notification never written (daemon,
  engine, demo, and under QEMU), the retry bounds, one rate limit for all
  clients, peer policy, write guard and eventfd limit unwired, the VMM
  link's timers and refreshes, state lost on reload, and two regressions
  the soak must report;
- ``reboot:`` a guest reboot under QEMU (the torture test);
- ``issue 12:`` least trust: each fix of the trust model reverted as simply
  as possible (the guest RAM and dump-skeys files, the control socket and
  its directory, per-client and per-uid caps and timeouts, fds, eventfds,
  the write guard's sizes, close-on-exec, no_new_privs, metrics), against
  the attacker test that must catch it;
- ``issue 14:`` the two kernel generations of the memop emulation and the
  KVM fake: each generation-specific rule made to behave as the other
  generation's, and KvmBackend's EINTR retry removed.

Rows whose name ends in "(QEMU)" or "(the soak must say so)" boot a guest
(minutes each); the others run in seconds.

    python tests/mutations/run.py              # all, with the baseline
    python tests/mutations/run.py -k reload    # those whose name contains "reload"
    python tests/mutations/run.py -k "issue 12"
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
PASSEDFDS = "indicators/daemon/passedfds.py"
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

NO_SUMMARY_CHECK = Patch(
    BATCH, "                refused = self._refuse(batch, work, where, refusal, refused)\n",
    "                pass\n",
)  # fmt: skip
NO_UNDO = Patch(
    BATCH, "            notes = await self._undo(lost, written)\n", "            notes = {}\n"
)

#: Issue 10: a batch is atomic per device (no summary without its dsci, no dsci left without
#: its summary) and reset-adapter reaches the kernel's FLIC.
ISSUE_10: tuple[Mutation, ...] = (
    Mutation(
        "issue 10: summary stores not checked before the dsci is written (atomic)",
        (NO_SUMMARY_CHECK,),
        ("tests/test_engine_atomic.py",),
    ),
    Mutation(
        "issue 10: summary stores not checked before the dsci is written (engine)",
        (NO_SUMMARY_CHECK,),
        ("tests/test_engine.py",),
    ),
    Mutation(
        "issue 10: dsci bits not undone when the summary store fails (atomic)",
        (NO_UNDO,),
        ("tests/test_engine_atomic.py",),
    ),
    Mutation(
        "issue 10: dsci bits not undone when the summary store fails (engine)",
        (NO_UNDO,),
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

HOSTFILES = "indicators/daemon/hostfiles.py"
SOCKETFILE = "indicators/daemon/socketfile.py"
SERVER = "indicators/daemon/qmp_server.py"
EVENTFDS = "indicators/daemon/eventfds.py"
COMMANDS = "indicators/daemon/commands.py"
GUARD = "indicators/memop/guard.py"
VMFD = "indicators/memop/vmfd.py"
METRICS = "indicators/metrics.py"
HOSTFILE_TESTS = "tests/test_attack_hostfiles.py"
SKEYS_TESTS = "tests/test_attack_skeys.py"
SOCKET_TESTS = "tests/test_attack_socket.py"
CLIENT_TESTS = "tests/test_attack_clients.py"
EVENTFD_TESTS = "tests/test_attack_eventfds.py"
BY_NAME = "            fd = os.open(path, os.O_RDWR | _OPEN_FLAGS)\n"


def _if_false(path: str, condition: str) -> Patch:
    """``if CONDITION:`` (exactly once in ``path``) -> ``if False:``: the check is gone."""
    return Patch(path, f"if {condition}:\n", "if False:\n")


#: Issue 12: least trust.  One row per fix, reverted as simply as possible,
#: with the attacker test that must catch it.
ISSUE_12: tuple[Mutation, ...] = (
    Mutation(
        "issue 12: guest RAM opened by name without O_NOFOLLOW",
        (
            Patch(
                HOSTFILES,
                BY_NAME,
                "            fd = os.open(path, os.O_RDWR | (_OPEN_FLAGS & ~os.O_NOFOLLOW))\n",
            ),
        ),
        (HOSTFILE_TESTS, "-k", "opening_by_name"),
    ),
    Mutation(
        "issue 12: guest RAM opened by name may be created",
        (Patch(HOSTFILES, BY_NAME, BY_NAME.replace("O_RDWR", "O_RDWR | os.O_CREAT")),),
        (HOSTFILE_TESTS, "-k", "opening_by_name"),
    ),
    Mutation(
        "issue 12: guest RAM size not checked",
        (_if_false(HOSTFILES, "info.st_size != size"),),
        (HOSTFILE_TESTS, "-k", "opening_by_name"),
    ),
    Mutation(
        "issue 12: guest RAM owner not checked",
        (_if_false(HOSTFILES, "uid is not None and info.st_uid != uid"),),
        (HOSTFILE_TESTS, "-k", "opening_by_name"),
    ),
    Mutation(
        "issue 12: guest RAM not required to be a regular file",
        (_if_false(HOSTFILES, "not stat.S_ISREG(info.st_mode)"),),
        (HOSTFILE_TESTS, "-k", "opening_by_name"),
    ),
    Mutation(
        "issue 12: dump-skeys read without a size cap",
        (
            _if_false(HOSTFILES, "info.st_size > self.cap"),
            Patch(
                HOSTFILES,
                "        data = os.pread(self._fd, self.cap + 1, 0)\n"
                "        if len(data) > self.cap:\n",
                "        data = os.pread(self._fd, info.st_size, 0)\n        if False:\n",
            ),
        ),
        (SKEYS_TESTS, "-k", "junk"),
    ),
    Mutation(
        "issue 12: host files opened without O_NONBLOCK",
        (Patch(HOSTFILES, " | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY", " | os.O_CLOEXEC"),),
        (HOSTFILE_TESTS, "-k", "opening_by_name"),
    ),
    Mutation(
        "issue 12: dump-skeys without a timeout",
        (
            Patch(
                "indicators/daemon/vmm.py",
                "async with asyncio.timeout(self.skeys_timeout):",
                "async with asyncio.timeout(None):",
            ),
        ),
        (SKEYS_TESTS, "-k", "never_comes"),
    ),
    Mutation(
        "issue 12: control socket chmod-ed by name after bind (no umask)",
        (
            Patch(SOCKETFILE, "os.umask(0o777 & ~mode)", "os.umask(0o022)"),
            Patch(
                SOCKETFILE,
                "            sock.bind(path)\n",
                "            sock.bind(path)\n            os.chmod(path, mode)\n",
            ),
        ),
        (SOCKET_TESTS, "-k", "born_with_its_mode"),
    ),
    Mutation(
        "issue 12: a socket directory others can write is accepted",
        (
            _if_false(
                SOCKETFILE, "mode & (stat.S_IWGRP | stat.S_IWOTH) and not mode & stat.S_ISVTX"
            ),
        ),
        (SOCKET_TESTS, "-k", "others_can_write"),
    ),
    Mutation(
        "issue 12: a socket directory of another user is accepted",
        (_if_false(SOCKETFILE, "st.st_uid not in (0, os.geteuid())"),),
        (SOCKET_TESTS, "-k", "of_another_user"),
    ),
    Mutation(
        "issue 12: stored fds not capped per client",
        (_if_false(PASSEDFDS, "name not in stored and len(stored) >= self.limit"),),
        (CLIENT_TESTS, "-k", "stored_fds"),
    ),
    Mutation(
        "issue 12: clients of one uid not capped",
        (_if_false(SERVER, "mine >= self.max_sessions_per_uid"),),
        (CLIENT_TESTS, "-k", "connections_of_one_uid"),
    ),
    Mutation(
        "issue 12: clients in all not capped",
        (_if_false(SERVER, "len(self._sessions) >= self.max_sessions"),),
        (CLIENT_TESTS, "-k", "connections_in_all"),
    ),
    Mutation(
        "issue 12: negotiation timeout never armed",
        (
            Patch(
                SESSION,
                "                if timeout is not None:\n"
                "                    self._deadline = self._loop.call_later(",
                "                if False:\n"
                "                    self._deadline = self._loop.call_later(",
            ),
        ),
        (CLIENT_TESTS, "-k", "never_negotiate"),
    ),
    Mutation(
        "issue 12: no negotiation timeout by default",
        (
            Patch(
                "indicators/config.py",
                '        default=30.0, gt=0, description="seconds a client has for qmp_',
                '        default=None, gt=0, description="seconds a client has for qmp_',
            ),
        ),
        (CLIENT_TESTS, "-k", "negotiate_by_default"),
    ),
    Mutation(
        "issue 12: an fd not tied to the message that carried it",
        (
            Patch(
                SESSION,
                "            await self._run_handler(command, arguments, echo, reply)\n"
                "        finally:\n"
                "            close_all(fds)\n",
                "            await self._run_handler(command, arguments, echo, reply)\n"
                "        finally:\n"
                "            self._passed.wait_for_message(fds)  # left for whichever is next\n",
            ),
        ),
        (CLIENT_TESTS, "-k", "belongs_to_the_message"),
    ),
    Mutation(
        "issue 12: a notify's vector list not de-duplicated",
        (Patch(COMMANDS, "return list(dict.fromkeys(args.vector))", "return list(args.vector)"),),
        (CLIENT_TESTS, "-k", "each_vector_once"),
    ),
    Mutation(
        "issue 12: one NOTIFY_FAILED event per failed item, not per batch",
        (
            Patch(
                SERVICE,
                "            batch = self._failed.get(event.error.device)\n",
                "            batch = None\n",
            ),
            Patch(
                SERVICE,
                "batch = self._failed[event.error.device] = FailureBatch()",
                "batch = self._failed[id(event.error)] = FailureBatch()",
            ),
        ),
        (CLIENT_TESTS, "-k", "huge_failing_vector_list"),
    ),
    Mutation(
        "issue 12: refused peers logged without a rate limit",
        (
            Patch(
                SERVER,
                "            _LIMITER.warning(\n"
                "                logger,\n"
                '                "refused-peer",\n',
                "            logger.warning(\n",
            ),
        ),
        (CLIENT_TESTS, "-k", "flood_of_refused"),
    ),
    Mutation(
        "issue 12: a semaphore eventfd accepted",
        (_if_false(EVENTFDS, "semaphore"),),
        (EVENTFD_TESTS, "-k", "semaphore_eventfd_is_refused"),
    ),
    Mutation(
        "issue 12: a semaphore eventfd not caught by its reads (no fdinfo)",
        (_if_false(EVENTFDS, "source.ones >= _SEMAPHORE_READS"),),
        (EVENTFD_TESTS, "-k", "without_fdinfo"),
    ),
    Mutation(
        "issue 12: a blocking eventfd made non-blocking instead of refused",
        (
            Patch(
                EVENTFDS,
                "            if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK:\n"
                "                raise EventfdError(\n",
                "            if not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK:\n"
                "                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL)"
                " | os.O_NONBLOCK)\n"
                "            if False:\n"
                "                raise EventfdError(\n",
            ),
        ),
        (EVENTFD_TESTS, "-k", "blocking_eventfd"),
    ),
    Mutation(
        "issue 12: eventfd limit per connection, not per uid",
        (Patch(COMMANDS, "owner=session.credentials.uid", "owner=id(session)"),),
        (EVENTFD_TESTS, "-k", "reconnecting"),
    ),
    Mutation(
        "issue 12: detach-eventfd by any client",
        (Patch(EVENTFDS, "and source.owner not in (None, requester)", "and False"),),
        (EVENTFD_TESTS, "-k", "detached_only_by"),
    ),
    Mutation(
        "issue 12: the guard forwards a cmpxchg size it cannot check",
        (_if_false(GUARD, "size not in _CMPXCHG_SIZES"),),
        ("tests/test_guard.py", "-k", "cmpxchg_of_a_size"),
    ),
    Mutation(
        "issue 12: the guard forwards a write size it cannot check",
        (_if_false(GUARD, "not 0 < len(data) <= 16"),),
        ("tests/test_guard.py", "-k", "write_of_a_size"),
    ),
    Mutation(
        "issue 12: the guard lets a store check of a size it cannot check pass",
        (_if_false(GUARD, "store and not 0 < size <= 16"),),
        ("tests/test_guard.py", "-k", "store_check_of_a_size"),
    ),
    Mutation(
        "issue 12: a VM fd received over unix is not close-on-exec",
        (Patch(VMFD, "fds.itemsize), socket.MSG_CMSG_CLOEXEC", "fds.itemsize), 0"),),
        ("tests/test_vmfd.py", "-k", "received_over_unix"),
    ),
    Mutation(
        "issue 12: an inherited VM fd is duplicated inheritable",
        (
            Patch(
                VMFD,
                "        duplicate = os.dup(fd)\n",
                "        duplicate = os.dup(fd)\n        os.set_inheritable(duplicate, True)\n",
            ),
        ),
        ("tests/test_vmfd.py", "-k", "inherited_is_close_on_exec"),
    ),
    Mutation(
        "issue 12: PR_SET_NO_NEW_PRIVS not set",
        (Patch(SERVICE, "            forbid_new_privileges()\n", "            pass\n"),),
        ("tests/test_privileges.py", "-k", "drops_to_the_user"),
    ),
    Mutation(
        "issue 12: metrics connections without a socket timeout",
        (Patch(METRICS, "    timeout = TIMEOUT\n", "    timeout = None\n"),),
        ("tests/test_metrics.py", "-k", "silent_connection"),
    ),
    Mutation(
        "issue 12: metrics threads not bounded",
        (
            Patch(
                METRICS,
                "threading.BoundedSemaphore(MAX_HANDLERS)",
                "threading.BoundedSemaphore(1 << 20)",
            ),
        ),
        ("tests/test_metrics.py", "-k", "pile_up"),
    ),
)

EMULATED = "indicators/memop/emulated.py"
KERNEL = "indicators/memop/kernel.py"
GENERATIONS = "indicators/memop/generations.py"
GENERATION_TESTS = ("tests/test_kernel_generations.py", "tests/test_memop_conformance.py")
KVM_TESTS = "tests/test_kvm_backend.py"
ALIGNED_THEN_BACKED = (
    "            self._check_mask_aligned(gaddr, size, key, old)\n"
    "            self._check_backed(gaddr, size, key, old)\n"
)

#: Issue 14: the two kernel generations of the memop.  One row per rule that
#: depends on the generation, made to behave as the other generation's.
ISSUE_14: tuple[Mutation, ...] = (
    Mutation(
        "issue 14: 6.3 checks the alignment before the memslot (7.0's order)",
        (Patch(EMULATED, '        if self.kernel == "6.3":\n', "        if False:\n"),),
        GENERATION_TESTS,
    ),
    Mutation(
        "issue 14: 7.0 checks the memslot before the alignment (6.3's order)",
        (
            Patch(
                EMULATED,
                ALIGNED_THEN_BACKED,
                "            self._check_backed(gaddr, size, key, old)\n"
                "            self._check_mask_aligned(gaddr, size, key, old)\n",
            ),
        ),
        GENERATION_TESTS,
    ),
    Mutation(
        "issue 14: 6.3 fails with the fault-in errors of 7.0",
        (
            Patch(
                EMULATED,
                'if self.kernel == "7.0" and faults is not None:',
                "if faults is not None:",
            ),
        ),
        GENERATION_TESTS,
    ),
    Mutation(
        "issue 14: 7.0 has no fault-in errors (as 6.3)",
        (Patch(EMULATED, 'if self.kernel == "7.0" and faults is not None:', "if False:"),),
        GENERATION_TESTS,
    ),
    Mutation(
        "issue 14: the 7.0 fault-in before the alignment and memslot checks",
        (
            Patch(
                EMULATED,
                ALIGNED_THEN_BACKED,
                "            if self.faults is not None and (code := self.faults.faultin()):\n"
                "                raise MemopError(\n"
                "                    code, _FAULTIN_REASONS[code], gaddr=gaddr, size=size,\n"
                "                    key=key,\n"
                "                )\n" + ALIGNED_THEN_BACKED,
            ),
        ),
        GENERATION_TESTS,
    ),
    Mutation(
        "issue 14: the KVM fake writes the old buffer back on 7.0 as on 6.3",
        (Patch(KERNEL, 'every_path = self.backend.kernel == "7.0"', "every_path = False"),),
        (KVM_TESTS, "-k", "old_buffer"),
    ),
    Mutation(
        "issue 14: the KVM fake writes the old buffer back on 6.3 as on 7.0",
        (Patch(KERNEL, 'every_path = self.backend.kernel == "7.0"', "every_path = True"),),
        (KVM_TESTS, "-k", "old_buffer"),
    ),
    Mutation(
        "issue 14: the 6.3 KVM fake writes the old buffer back after addressing",
        (Patch(KERNEL, "exc.code != abi.PGM_ADDRESSING", "True"),),
        (KVM_TESTS, "-k", "old_buffer"),
    ),
    Mutation(
        "issue 14: the 6.3 KVM fake does not write the old buffer back after protection",
        (Patch(KERNEL, "(every_path or exc.code != abi.PGM_ADDRESSING)", "every_path"),),
        (KVM_TESTS, "-k", "old_buffer"),
    ),
    Mutation(
        "issue 14: the KVM fake reports a 6.3 release whatever its generation",
        (Patch(KERNEL, 'return f"{self.backend.kernel}.0-emulated"', 'return "6.3.0-emulated"'),),
        (KVM_TESTS, "-k", "generation"),
    ),
    Mutation(
        "issue 14: a 7.0 release taken for 6.3",
        (Patch(GENERATIONS, "if version >= (7, 0):", "if version >= (7, 1):"),),
        (KVM_TESTS, "-k", "generation"),
    ),
    Mutation(
        "issue 14: a 6.3 release given no generation",
        (Patch(GENERATIONS, "if version >= (6, 3):", "if version >= (6, 4):"),),
        (KVM_TESTS, "-k", "generation"),
    ),
    Mutation(
        "issue 14: KvmBackend does not retry -EINTR",
        (
            Patch(
                "indicators/memop/kvm.py",
                "            if exc.errno != errno.EINTR:\n"
                "                raise\n"
                "        for attempt in range(2, EINTR_ATTEMPTS + 1):\n",
                "            raise\n        for attempt in range(2, EINTR_ATTEMPTS + 1):\n",
            ),
        ),
        (KVM_TESTS, "-k", "eintr"),
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
    *ISSUE_12,
    *ISSUE_14,
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
