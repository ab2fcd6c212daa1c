# The two commands of the README: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-arm64 lint typecheck unit bench clean

# One environment with the host side, the TFLite extra and the dev tools.
# torch==2.13.0 is pinned in the `host` extra: pip takes the CPU wheel that is on disk.
$(BIN)/.edgefl-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[host,tflite,dev]'
	touch $@

demo: $(BIN)/.edgefl-installed
	$(BIN)/edgefl demo --out build/demo

lint: $(BIN)/.edgefl-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@# One concept per module: none in the package grows past 500 lines.
	@find edgefl -name '*.py' -exec wc -l {} + | awk '$$2 != "total" && $$1 > 500 \
		{ print "over 500 lines: " $$2 " (" $$1 ")"; bad = 1 } END { exit bad }'

typecheck: $(BIN)/.edgefl-installed
	$(BIN)/mypy

unit: $(BIN)/.edgefl-installed
	$(BIN)/pytest

test: lint typecheck unit

# edgefl on an emulated Raspberry Pi: a Debian bookworm arm64 root file system (debootstrap,
# cached in $${EDGEFL_ARM64_CACHE:-~/.cache/edgefl/arm64}) under qemu-user; an offline install
# from `edgefl flash`, a signed deploy, 3 rounds beside x86 agents, a round on the jetson bundle.
# As root, with debootstrap, qemu-user-static, binfmt-support and mosquitto (.ci/run installs them).
test-arm64: $(BIN)/.edgefl-installed
	PYTHON=$(BIN)/python boards/arm64/test.sh

bench: $(BIN)/.edgefl-installed
	$(BIN)/python benchmarks/compress.py
	$(BIN)/python benchmarks/fl.py
	$(BIN)/python benchmarks/fl_digits.py

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
