"""Fuzzing: the control protocol against a running daemon, the decoder and the config loader.

Short runs here; ``make fuzz`` runs the campaign (INDICATORS_FUZZ_EXAMPLES,
atheris on the decoder and the config loader).  Every reply must be
well-formed, the daemon must keep answering, and its memory must stay bounded.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import Daemon, daemon_config, running_daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "fuzz"))
import harness

from indicators.daemon.qmp_server import QmpServer

EXAMPLES = int(os.environ.get("INDICATORS_FUZZ_EXAMPLES", "300"))
CORPUS = Path(__file__).resolve().parent.parent / "fuzz" / "corpus"

# The daemon's command table and the server's built-ins: a new command is fuzzed.
COMMANDS = [*harness.MODELS, *QmpServer.BUILTINS, "no-such-command", ""]
NAMES = ["device", "vector", "isc", "mode", "adapter", "fdname", "extra", "name", "kind",
         "lifetime", "vectors", "summary_indicator", "device_indicator", ""]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["net0", "pci0", "route0", "all", "single"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
messages = st.fixed_dictionaries(
    {"execute": st.sampled_from(COMMANDS) | st.text(max_size=12)},
    optional={
        "arguments": st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=6), values,
                                     max_size=4) | values,
        "id": values,
        "unexpected": values,
    },
)  # fmt: skip


class RawClient:
    """A blocking, negotiated QMP connection that reads one reply per request."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")
        assert "QMP" in json.loads(self.reader.readline())
        assert "return" in self.ask(b'{"execute": "qmp_capabilities"}')

    def ask(self, line: bytes) -> dict[str, Any]:
        self.sock.sendall(line + b"\n")
        while True:
            reply = json.loads(self.reader.readline())
            if "event" not in reply:
                return reply  # type: ignore[no-any-return]

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("fuzz")
    raw = daemon_config(directory / "control.sock")
    with running_daemon(directory, raw) as running:
        yield running


def test_protocol_fuzz_every_reply_well_formed(daemon: Daemon) -> None:
    client = RawClient(daemon.socket)
    counts = {"return": 0, "error": 0}
    warm: list[int] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(message=messages)
    def one(message: dict[str, Any]) -> None:
        if message.get("execute") in ("quit", "qmp_capabilities"):
            return
        message["id"] = ["fuzz", counts["return"] + counts["error"]]
        reply = client.ask(json.dumps(message).encode())
        assert reply.get("id") == message["id"], f"id not echoed: {reply}"
        assert ("return" in reply) != ("error" in reply), reply
        if "error" in reply:
            assert set(reply["error"]) == {"class", "desc"} and reply["error"]["desc"], reply
            counts["error"] += 1
        else:
            counts["return"] += 1
        if not warm and counts["error"] + counts["return"] == 50:
            warm.append(rss_kib(daemon.process.pid))

    one()
    assert counts["error"] > 0, "the fuzzer should reach error paths"
    assert client.ask(b'{"execute": "query-version"}')["return"]["qemu"]
    client.close()
    if warm:
        growth = rss_kib(daemon.process.pid) - warm[0]
        assert growth < 16 * 1024, f"daemon RSS grew by {growth} KiB over {EXAMPLES} inputs"
    print(f"\nprotocol fuzz: {sum(counts.values())} inputs, {counts}")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=512))
def test_decoder_answers_any_bytes(data: bytes) -> None:
    harness.decoder(data)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(message=messages)
def test_decoder_answers_any_message(message: dict[str, Any]) -> None:
    assert harness.decoder(json.dumps(message).encode()) == 1


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=512) | st.text(max_size=400).map(str.encode))
def test_config_loader_refuses_cleanly(data: bytes) -> None:
    harness.config(data)


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*/*")), ids=lambda p: p.name)
def test_corpus_entries(path: Path) -> None:
    if path.parent.name == "decoder":
        assert harness.decoder(path.read_bytes()) >= 1
    else:
        harness.config(path.read_bytes())
