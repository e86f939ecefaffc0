# The two commands of the README, each doing its own set-up on first use:
#   make demo   pretrain the tiny MAE on the embedded photos, then the linear probe
#   make test   the test suite on CPU (the Triton kernels run in Triton's interpreter)
# Both build .venv once (and again when requirements-dev.txt, setup.py or the C++/CUDA sources
# change). The venv's python is named explicitly: nothing here needs an activated venv.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.mae_fast-installed
RUN    ?= runs/mae-demo
ARGS   ?=

.PHONY: all venv demo test bench bench-quick info clean distclean
all: test

venv: $(STAMP)

# The editable install compiles mae_fast._C (C++ CPU kernels, plus the CUDA kernels wherever nvcc
# and a CUDA build of torch are found: no GPU needed). Its inputs are the prerequisites here.
$(STAMP): requirements-dev.txt setup.py pyproject.toml $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip || echo "pip not upgraded (offline?): continuing"
	$(PY) -m pip install -q -r requirements-dev.txt
	MAX_JOBS=2 $(PY) -m pip install -q -e . --no-build-isolation
	$(PY) -m mae_fast.info
	touch $@

# --overwrite: a rerun starts the demo folder afresh instead of refusing it.
demo: $(STAMP)
	$(VENV)/bin/mae-fast pretrain --output-dir $(RUN) --overwrite $(ARGS)
	$(VENV)/bin/mae-fast probe $(RUN)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(ARGS)

# The benchmark suites (on a GPU: the real measurements; on CPU only the ratios mean anything).
bench: $(STAMP)
	$(PY) -m pytest benchmarks/ $(ARGS)

# Tiny shapes and few rounds: checks that the harness runs, measures nothing.
bench-quick: $(STAMP)
	$(PY) -m pytest benchmarks/ --bench-quick -q $(ARGS)

info: $(STAMP)
	$(PY) -m mae_fast.info

# clean: caches. distclean: also the build and the venv. Neither touches runs/ (your training runs).
clean:
	rm -rf .pytest_cache .benchmarks .hypothesis
	find mae_fast kernels tests benchmarks -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf build *.egg-info mae_fast/_C*.so mae_fast/_build_info.json $(VENV)
