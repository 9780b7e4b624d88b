# Everything a fresh Debian + Python 3.11 machine needs, set up by the targets themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Debian packages the test suite and the kernel lab use (installed only when root);
# prometheus for promtool (rule unit tests, metrics lint), its server is left disabled;
# tinyproxy is the real HTTP CONNECT proxy of the TLS-path tests and the proxy_only preset;
# redis-server is the gateway cluster's directory in its tests and the cluster lab.
DEBS   := coturn nftables iproute2 procps miniupnpd-nftables prometheus tinyproxy redis-server

.PHONY: demo test lint lab bench fuzz venv debs clean

# The product (macula) and, beside it, the lab and benchmarks (macula-lab, lab/pyproject.toml).
$(STAMP): pyproject.toml lab/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet -e './lab[plot]'
	touch $(STAMP)

venv: $(STAMP)

# apt only when root and only for what is missing, so a warm machine pays nothing.
debs:
	@if [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	  systemctl disable --now coturn prometheus tinyproxy redis-server >/dev/null 2>&1 || true; \
	else echo "not root: skipping apt-get (kernel-lab and coturn tests will skip)"; fi

demo: $(STAMP)
	$(VENV)/bin/macula demo

test: lint debs
	$(PY) -m pytest -q -p no:cacheprovider

# Types (strict, on the product) and style (product, lab and tests), pinned in the test extra.
lint: $(STAMP)
	$(PY) -m ruff check src tests fuzz
	$(PY) -m mypy --strict src/macula

# The long kernel runs `make test` leaves out: every kernel test, then the full matrix at
# 10 ms per uplink without and with a TURN server (coturn in the lab's server namespace),
# with hard-NAT guessing on, the IPv6 firewall preset, networks that drop UDP, and the
# gateway cluster (3 gateways and a redis-server, 24 nodes) with each of its faults.
lab: $(STAMP) debs
	MACULA_LAB_FULL=1 $(PY) -m pytest -q -p no:cacheprovider -m kernel
	$(VENV)/bin/macula lab matrix --kernel --trials 1 --latency-ms 10
	$(VENV)/bin/macula lab matrix --kernel --turn --trials 1 --latency-ms 10
	$(VENV)/bin/macula lab matrix --kernel --hard-nat --turn --trials 1 --latency-ms 10
	$(VENV)/bin/macula lab matrix --kernel --nat ipv6_firewall,port_restricted --trials 3 --latency-ms 10
	$(VENV)/bin/macula lab matrix --kernel --turn --nat udp_blocked,proxy_only,port_restricted,symmetric --trials 1 --latency-ms 10
	$(VENV)/bin/macula lab cluster --kernel --gateways 3 --nodes 24
	$(VENV)/bin/macula lab cluster --kernel --gateways 3 --nodes 24 --kill 1
	$(VENV)/bin/macula lab cluster --kernel --gateways 3 --nodes 24 --drain 1
	$(VENV)/bin/macula lab cluster --kernel --gateways 3 --nodes 24 --redis-down 10

# Every parser's oracle (fuzz/oracles.py) for 100k coverage-guided inputs under atheris;
# where atheris has no wheel, fuzz/run.py runs the same oracles under hypothesis instead.
fuzz: $(STAMP)
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install --quiet -e '.[fuzz]' \
	  || echo "atheris did not install: fuzzing with the hypothesis engine"
	$(PY) fuzz/run.py --runs 100000

bench: $(STAMP)
	$(VENV)/bin/macula bench --quick

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
