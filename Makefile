# cachefs developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# apt as root, sudo otherwise.
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# fuse3: fusermount3 and /dev/fuse; libfuse3-dev + pkg-config + gcc: pyfuse3
# and the cffi module build; qemu-*: qemu-img/qemu-io/qemu-storage-daemon for
# interop tests and benchmarks; fio/strace/attr/util-linux: benches and tests
# (fio jobs, fdatasync counting, getfattr/setfattr, fincore/findmnt/mount);
# liburing-dev: the io_uring engine (--aio io_uring) of the cffi module, which
# without it still builds, with io_uring reported unavailable;
# qemu-system-x86 + busybox-static + cpio: the guest that boots from a cachefs
# file (examples/boot-guest.sh, tests/test_guest.py; it downloads Debian's
# cloud kernel package itself).
DEB_PKGS := fuse3 libfuse3-dev pkg-config qemu-utils qemu-system-common fio \
            strace attr util-linux gcc liburing-dev qemu-system-x86 busybox-static cpio

.PHONY: deps venv test demo bench clean

# Install only what is missing; `apt-get update` only when something is.
# python3 itself is never apt-installed (pyenv or /usr/local provides it);
# a Debian /usr/bin/python3 without ensurepip also gets python3-venv.
deps:
	@missing=""; \
	for p in $(DEB_PKGS); do \
	  dpkg -s "$$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing="$$missing $$p"; \
	done; \
	if ! $(PYTHON) -c 'import ensurepip, venv' 2>/dev/null; then missing="$$missing python3-venv"; fi; \
	if [ -n "$$missing" ]; then \
	  echo "deps: installing$$missing"; \
	  $(SUDO) apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

# Rebuilt when the packaging, the native module's build script or its C sources change.
$(STAMP): pyproject.toml setup.py cachefs/native/build.py $(wildcard cachefs/native/*.c cachefs/native/*.h) | deps
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q -e '.[test]'
	@touch $@

# mount(8) looks for /sbin/mount.fuse.cachefs before anything else (strace of
# util-linux 2.38: newfstatat("/sbin/mount.fuse.cachefs"), then /sbin/mount.fuse).
# The same program is umount.fuse.cachefs, which umount(8) runs for a cachefs
# mount (cachefs/fuse/utab.py): it returns once the daemon has flushed and exited.
# Both are machine-wide, so only `make install-helper` points them at this tree's
# venv (issue 20 defect 11: `make venv` did, for whichever checkout ran last).
# `make test` does too: the tests of mount -t fuse.cachefs, fstab and umount(8)
# run the helper, and must run the tree under test (CI tests a fresh clone).
HELPER := /sbin/mount.fuse.cachefs
UHELPER := /sbin/umount.fuse.cachefs
.PHONY: install-helper mount-helper
install-helper: $(STAMP)
	@if [ "$$(id -u)" = 0 ]; then ln -sfn "$(CURDIR)/$(VENV)/bin/mount.fuse.cachefs" $(HELPER) && \
	  ln -sfn "$(CURDIR)/$(VENV)/bin/mount.fuse.cachefs" $(UHELPER) && \
	  echo "install-helper: $(HELPER) and $(UHELPER) run $(CURDIR)/$(VENV)/bin/mount.fuse.cachefs"; \
	else echo "install-helper: not root, $(HELPER) and $(UHELPER) not linked (mount -t fuse.cachefs, fstab and umount(8) need them)"; fi
mount-helper: install-helper  # the old name

venv: $(STAMP)

test: deps venv install-helper
	$(VPY) -m pytest -q

# Issue 19: every power-cut simulation over thousands of seeds, each fixing a workload and
# its task interleaving (tests/soak.py, tests/interleaving.py). About SOAK_SECONDS (600);
# replay a failure with SOAK_ONLY=CASE SOAK_SEEDS=SEED (e.g. fastalloc-c-heavy, 119).
SOAK_SECONDS ?= 600
.PHONY: soak
soak: venv
	SOAK_SECONDS=$(SOAK_SECONDS) $(VPY) tests/soak.py

demo: deps venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo.sh

$(VENV)/.bench: $(STAMP)
	$(VPY) -m pip install -q -e '.[bench]'
	@touch $@

# Issues 5 and 11: the side-by-side benchmark. The same fio jobs on the host file,
# the FUSE ceiling probe (../shared/bench/fuse-ceiling, built into WORK), qemu-storage-daemon,
# and cachefs with the data plane on (one target per ENGINES, default io_uring native), off
# (DPOFF_ENGINES, default io_uring) and on a raw image; writes docs/benchmarks.md (with issue
# 11's target table), docs/bench-*.png and docs/bench-results.json. Needs root; about an hour
# with the defaults, on a quiet machine. Settings are variables (RUNTIME ROUNDS REGION IMG_SIZE
# TARGETS ENGINES DPOFF_ENGINES JOBS COUNT WORK DOCS PROBE_DIR CACHEFS; see bench/sidebyside.py),
# e.g. a quick run of a few minutes that leaves docs/ alone:
#   make bench RUNTIME=3 ROUNDS=1 REGION=256M JOBS=randread4k-qd32,overwrite4k-qd32 DOCS=/var/tmp/benchsmoke
# Only the report, from saved results: `make bench-report [RESULTS=file.json]`.
# bench-modes and bench-metaqueue are the older, separate benchmarks, and bench/dataplane.sh
# the data plane's quick raw-image comparison (their results are in docs/benchmark-history.md).
bench: deps venv $(VENV)/.bench
	-bash ../shared/bench/qsd11.sh setup >/dev/null 2>&1  # the second peer (target qsd11); skipped if it fails
	$(VPY) bench/sidebyside.py

RESULTS ?= docs/bench-results.json
.PHONY: bench-report
bench-report: venv $(VENV)/.bench
	$(VPY) bench/sidebyside.py --report-only $(RESULTS)

# Issue 4: allocating writes with flushes, fdatasyncs per flush, cachefs vs
# qemu-storage-daemon (about 10 minutes).
.PHONY: bench-metaqueue
bench-metaqueue: deps venv
	$(VPY) bench/metaqueue.py

# Seed 001: one flush-heavy fio job in every cache mode, on the host file,
# qemu-storage-daemon and cachefs (about 15 minutes; needs root). Its
# settings are variables, e.g. a quick run: `make bench-modes RUNTIME=3 ROUNDS=1`.
.PHONY: bench-modes
bench-modes: deps venv
	bash bench/cache_modes.sh

# Issue 19: fuzz every parser of untrusted bytes with atheris (fuzz/main.py: header, tables, check,
# engine), FUZZ_RUNS executions in all, shared equally, one target at a time (one core). New inputs
# go to FUZZ_WORK, never into the seed corpus fuzz/corpus/; a crash is written to
# FUZZ_WORK/TARGET-crash-* and stops the run. `make fuzz-smoke`: CI's 30-second run and corpus replay.
FUZZ_TARGETS := header tables check engine
FUZZ_RUNS ?= 1000000
FUZZ_WORK ?= /var/tmp/cachefs-fuzz
FUZZ_OPTS ?= -timeout=10 -rss_limit_mb=1024 -print_final_stats=1
.PHONY: fuzz fuzz-smoke
fuzz: venv
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_WORK)/$$t && \
	  $(VPY) -m fuzz.main $$t -runs=$$(( $(FUZZ_RUNS) / $(words $(FUZZ_TARGETS)) )) $(FUZZ_OPTS) \
	    -artifact_prefix=$(FUZZ_WORK)/$$t- $(FUZZ_WORK)/$$t fuzz/corpus/$$t || exit 1; \
	done

fuzz-smoke: venv
	$(VPY) -m pytest -q tests/test_fuzz_smoke.py

clean:
	@if [ "$$(readlink $(HELPER))" = "$(CURDIR)/$(VENV)/bin/mount.fuse.cachefs" ]; then rm -f $(HELPER); fi
	@if [ "$$(readlink $(UHELPER))" = "$(CURDIR)/$(VENV)/bin/mount.fuse.cachefs" ]; then rm -f $(UHELPER); fi
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis tmp
	rm -f cachefs/native/_cachefs_native.c cachefs/native/_cachefs_native*.so cachefs/native/_cachefs_native*.o
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Issue 20: examples/cachefs@.service into UNITDIR (under DESTDIR), its ExecStart= and ExecStop=
# naming this install's cachefs (CACHEFS_BIN: the venv's, which `make venv` builds); then
# `systemctl daemon-reload` where systemd runs and DESTDIR is empty. E.g. into a scratch root:
#   make install-unit DESTDIR=/tmp/root
UNITDIR ?= /etc/systemd/system
CACHEFS_BIN ?= $(CURDIR)/$(VENV)/bin/cachefs
.PHONY: install-unit
install-unit:
	@test -x "$(CACHEFS_BIN)" || { echo "install-unit: no $(CACHEFS_BIN); run make venv first, or give CACHEFS_BIN="; exit 1; }
	install -d "$(DESTDIR)$(UNITDIR)"
	sed 's|/usr/local/bin/cachefs|$(CACHEFS_BIN)|g' examples/cachefs@.service > "$(DESTDIR)$(UNITDIR)/.cachefs@.service.tmp"
	chmod 644 "$(DESTDIR)$(UNITDIR)/.cachefs@.service.tmp"
	mv "$(DESTDIR)$(UNITDIR)/.cachefs@.service.tmp" "$(DESTDIR)$(UNITDIR)/cachefs@.service"
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "install-unit: $(DESTDIR)$(UNITDIR)/cachefs@.service runs $(CACHEFS_BIN)"

# Issue 19: power cuts of the real daemon (tests/test_powercut_daemon.py) at length: more crash
# states per cache mode, directsync too, small clusters too (512 B: new L2 tables, refcount blocks
# and a moved refcount table all the time), one run per seed and cluster size (about 25 minutes
# with the defaults). A failure names its seed and state. E.g.
#   make soak-daemon DAEMON_SEEDS="1 2 3" DAEMON_STATES=3000 DAEMON_CLUSTERS=65536
DAEMON_SEEDS    ?= 1 2 3
DAEMON_STATES   ?= 1000
DAEMON_MODES    ?= writeback,none,writethrough,directsync,switching
DAEMON_CLUSTERS ?= 65536 4096 512
.PHONY: soak-daemon
soak-daemon: venv
	@for seed in $(DAEMON_SEEDS); do for cs in $(DAEMON_CLUSTERS); do \
	  echo "soak-daemon: POWERCUT_SEED=$$seed POWERCUT_DAEMON_CLUSTER=$$cs"; \
	  POWERCUT_SEED=$$seed POWERCUT_DAEMON_CLUSTER=$$cs POWERCUT_DAEMON_STATES=$(DAEMON_STATES) \
	    POWERCUT_DAEMON_MODES=$(DAEMON_MODES) $(VPY) -m pytest -q -p no:cacheprovider tests/test_powercut_daemon.py \
	    || exit 1; \
	done; done
