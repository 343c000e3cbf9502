# netshrink — the two commands a newcomer needs: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.netshrink-installed
# torch comes first and pinned: a bare `torch` pulls a multi-GB CUDA build.
TORCH   := torch==2.13.0

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	# .[test] pulls every extra (onnx, lowrank, plot, digits) and hf (transformers>=5, which does not
	# pull torch), so the demo and the whole test suite, transformers models included, run
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/netshrink run recipes/lenet_300_100.yaml --out demo-out --force

test: setup
	$(BIN)/pytest

bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf demo-out runs .pytest_cache
