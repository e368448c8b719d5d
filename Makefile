# Two entry points for a fresh Debian machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Debian packages the test suite drives as real peers: program -> package.
TOOLS  := qemu-img:qemu-utils qemu-io:qemu-utils qemu-nbd:qemu-utils \
          nbdinfo:libnbd-bin nbdsh:python3-libnbd nbdcopy:libnbd-bin fio:fio

.PHONY: test demo lint venv system-deps bench bench-lifecycle bench-nbd clean campaign

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

# Install the apt packages whose programs are missing (needs root, as in CI).
system-deps:
	@missing=""; for pair in $(TOOLS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src
	$(BIN)/mypy --strict src

test: venv system-deps lint
	$(BIN)/pytest -q

# The long reliability campaigns (docs/reliability.md): power loss, kill -9,
# faults at every I/O call site, hostile images and names, and (tests/crash/test_nbd_*,
# test_lock_race) the NBD fuzzer, load soak, server faults and the open race.
# Under 30 minutes on 2 cores.
campaign: venv system-deps
	ADDCOW_CAMPAIGN=1 $(BIN)/pytest -q -s tests/crash tests/test_hostile_images.py \
		tests/test_backing_root_campaign.py tests/test_backing_root_race.py

demo: venv system-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

# Benchmarks (docs/performance.md): ratios against qemu-img / qemu-nbd / the raw file.
bench: venv system-deps
	$(BIN)/python benchmarks/bench_image.py

bench-lifecycle: venv system-deps
	$(BIN)/python benchmarks/bench_lifecycle.py

bench-nbd: venv system-deps
	$(BIN)/python benchmarks/bench_nbd.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache .hypothesis
