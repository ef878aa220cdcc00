# `make test` and `make demo` work on a fresh Python 3.11 machine: they create .venv when missing.
PY ?= python3.11
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-all test-fast demo finetune-demo lint format bench clean

$(STAMP): requirements.txt requirements-dev.txt
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (set PY=...)"; exit 1; }
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -r requirements.txt -r requirements-dev.txt
	# bigvgan (test-only reference): its declared extras (auraloss, nnaudio, pesq, ...) do not
	# install cleanly and are unused; it needs only torch, librosa and huggingface_hub.
	$(PYTHON) -m pip install -q --no-deps bigvgan==2.4.1
	@touch $(STAMP)

venv: $(STAMP)

# The CI suite, 2 worker processes (pytest-xdist): slow tests included, the multi-minute
# end-to-end runs (marker `nightly`: kill/restart, multi-process training) left to `test-all`.
test: $(STAMP)
	$(PYTHON) -m pytest -q -n 2 --durations=15 -m "not nightly" tests

# Everything, nightly runs included (about 30 more minutes on 2 cores).
test-all: $(STAMP)
	$(PYTHON) -m pytest -q -n 2 --durations=15 tests

# Skip tests marked slow.
test-fast: $(STAMP)
	$(PYTHON) -m pytest -q -n 2 -m "not slow" tests

# Builds a tiny random checkpoint in the released layout, converts it, and runs the main job on it.
demo: $(STAMP)
	$(PYTHON) -m experiments.demo --workdir demo_out

lint: $(STAMP)
	$(VENV)/bin/ruff check kimia_jax tools experiments tests data
	$(VENV)/bin/ruff format --check kimia_jax tools experiments tests data
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format kimia_jax tools experiments tests data
	$(VENV)/bin/ruff check --fix kimia_jax tools experiments tests data

# Benchmarks print ratios against the PyTorch references measured in the same run (README).
bench: $(STAMP)
	$(PYTHON) -m tools.bench_llm
	$(PYTHON) -m tools.bench_generate --ttfa
	$(PYTHON) -m tools.bench_tokenizer --size=tiny
	$(PYTHON) -m tools.bench_detokenizer --preset=tiny

clean:
	rm -rf demo_out .pytest_cache

# Fine-tunes the tiny model on two real LibriSpeech clips until greedy ASR returns their
# transcripts (WER before / after, steps, seconds, exported checkpoint). Minutes on 2 cores.
finetune-demo: $(STAMP)
	$(PYTHON) -m experiments.finetune_demo --workdir finetune_demo_out
