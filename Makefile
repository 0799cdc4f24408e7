# The two commands of the README: `make run` and `make test`.
# Both create .venv and install what they need on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint system-deps bench fuzz soak mutations clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/indicators demo

system-deps:
	bash scripts/system-deps.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check indicators tests benchmarks
	$(VENV)/bin/mypy

test: $(STAMP) system-deps lint
	$(VENV)/bin/pytest -q -ra

# Every path next to its floor, ratios against targets; BENCH_ARGS=--quick for a smoke run.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

# The fuzz campaign: atheris (coverage-guided) on the decoder and the config
# loader, hypothesis against a running daemon.  FUZZ_RUNS inputs each.
FUZZ_RUNS ?= 100000
fuzz: $(STAMP)
	$(PY) -m pip install -q atheris
	mkdir -p .fuzz/decoder .fuzz/config
	cd fuzz && ../$(PY) run_atheris.py decoder -runs=$(FUZZ_RUNS) -max_len=4096 -artifact_prefix=../.fuzz/ ../.fuzz/decoder corpus/decoder
	cd fuzz && ../$(PY) run_atheris.py config -runs=$(FUZZ_RUNS) -max_len=4096 -artifact_prefix=../.fuzz/ ../.fuzz/config corpus/config
	INDICATORS_FUZZ_EXAMPLES=$(FUZZ_RUNS) $(VENV)/bin/pytest -q -s tests/test_fuzz.py -k protocol

# Issue 11's regressions applied one by one to a copy of the package: each must
# make its tests fail (a caught/missed table; QEMU for the e2e and soak rows).
mutations: $(STAMP) system-deps
	$(PY) tests/mutations/run.py

# The soak against a real QEMU guest; SOAK_SECONDS (default 10 minutes), then
# the reboot torture: SOAK_REBOOTS guest reboots under load (default 1,000).
SOAK_SECONDS ?= 600
SOAK_REBOOTS ?= 1000
soak: $(STAMP) system-deps
	$(PY) -m indicators.testing.soak --seconds $(SOAK_SECONDS)
	$(PY) -m indicators.testing.reboot --reboots $(SOAK_REBOOTS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
