"""Coverage-guided fuzzing of the harness targets with atheris (``make fuzz``).

python fuzz/run_atheris.py decoder -runs=100000 fuzz/corpus/decoder
python fuzz/run_atheris.py config -runs=100000 fuzz/corpus/config
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import harness

    import indicators.config
    import indicators.daemon.qmp_wire  # noqa: F401

TARGETS = {"decoder": harness.decoder, "config": harness.config}


def main() -> None:
    target = TARGETS[sys.argv[1]]

    def one(data: bytes) -> None:
        target(data)

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
