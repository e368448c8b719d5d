# Two entry points for a fresh Debian machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Debian packages the test suite drives as real peers: program or file -> package (Ceph:
# one monitor, one OSD and the RADOS Gateway, the S3 server of tests/ceph_util.py; the
# RBD bridge of tests/test_rbd_golden.py: qemu-storage-daemon with QEMU's RBD driver).
TOOLS  := qemu-img:qemu-utils qemu-io:qemu-utils qemu-nbd:qemu-utils \
          nbdinfo:libnbd-bin nbdsh:python3-libnbd nbdcopy:libnbd-bin fio:fio \
          mke2fs:e2fsprogs e2fsck:e2fsprogs debugfs:e2fsprogs nbdkit:nbdkit \
          nginx:nginx-light openssl:openssl systemd-socket-activate:systemd \
          fincore:util-linux-extra \
          ceph-mon:ceph-mon ceph-osd:ceph-osd radosgw:radosgw ceph:ceph-common rbd:ceph-common \
          qemu-storage-daemon:qemu-system-common \
          /usr/lib/*/qemu/block-rbd.so:qemu-block-extra
# The Linux guest of tests/test_guest.py (program or file -> package), installed
# without their recommends (no GUI, no firmware): QEMU's PC emulator, a static
# busybox for its initramfs, and Debian's cloud kernel.
GUEST  := qemu-system-x86_64:qemu-system-x86 busybox:busybox-static \
          /boot/vmlinuz-*-cloud-amd64:linux-image-cloud-amd64

.PHONY: test demo lint venv system-deps bench bench-lifecycle bench-nbd bench-remote bench-handoff \
	clean campaign campaign-sites

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

# Install the apt packages whose programs are missing (needs root, as in CI).
system-deps:
	@set -e; missing=""; for pair in $(TOOLS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || ls $${pair%%:*} >/dev/null 2>&1 || \
	    missing="$$missing $${pair#*:}"; done; \
	guest=""; for pair in $(GUEST); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || ls $${pair%%:*} >/dev/null 2>&1 || \
	    guest="$$guest $${pair#*:}"; done; \
	if [ -n "$$missing$$guest" ]; then \
	  echo "installing:$$missing$$guest"; apt-get update -qq; \
	fi; \
	if [ -n "$$missing" ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi; \
	if [ -n "$$guest" ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $$guest >/dev/null; \
	fi

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src benchmarks
	$(BIN)/mypy --strict src
	$(BIN)/lint-imports --no-cache

# Two workers: most tests wait on real peers (qemu-img, nbdcopy, a guest), not on a core.
test: venv system-deps lint
	$(BIN)/pytest -q -n 2 --dist loadgroup

# The long reliability campaigns (docs/reliability.md): power loss, kill -9,
# faults at every I/O call site, hostile images and names, and (tests/crash/test_nbd_*,
# test_lock_race) the NBD fuzzer, load soak, server faults and the open race; then the
# hostile qcow2 fuzzer (200,000 examples; ADDCOW_QCOW2_FUZZ_EXAMPLES=N for another count).
# Under 30 minutes on 2 cores, plus 16-22 for the qcow2 fuzzer.
campaign: venv system-deps
	ADDCOW_CAMPAIGN=1 $(BIN)/pytest -q -s tests/crash tests/test_hostile_images.py \
		tests/test_backing_root_campaign.py tests/test_backing_root_race.py \
		tests/test_qcow2_hostile.py

# Every I/O call site of the fault-injection campaigns that `make test` strides over
# (tests/crash/test_faults.py, test_lifecycle_faults.py), each failed once with every
# fault it can suffer, and of test_view_kill.py, each killed once (ADDCOW_CAMPAIGN=sites:
# all sites, none of the long random runs).
# About 1 minute on 2 cores; .ci/run runs it after `make test`.
campaign-sites: venv system-deps
	ADDCOW_CAMPAIGN=sites $(BIN)/pytest -q -n 2 tests/crash/test_faults.py \
		tests/crash/test_lifecycle_faults.py tests/crash/test_view_kill.py

demo: venv system-deps
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

# Benchmarks (docs/performance.md): ratios against qemu-img / qemu-nbd / the raw file;
# each run leaves its result file in benchmarks/results/.
bench: venv system-deps
	$(BIN)/python benchmarks/bench_image.py --json

bench-lifecycle: venv system-deps
	$(BIN)/python benchmarks/bench_lifecycle.py --json

bench-nbd: venv system-deps
	$(BIN)/python benchmarks/bench_nbd.py --json

bench-remote: venv system-deps
	$(BIN)/python benchmarks/bench_remote.py --json

bench-handoff: venv system-deps
	$(BIN)/python benchmarks/bench_handoff.py --json

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache .hypothesis
