# Two entry points for a fresh machine: `make demo` and `make test`. Both start with `make venv`.
PY        ?= python3
VENV      := .venv
VPY       := $(VENV)/bin/python
PIP       := $(VPY) -m pip
WORLD     ?= 4
NATIVE_SRC := $(shell find csrc -name '*.cpp' -o -name '*.h' 2>/dev/null) setup.py

.PHONY: venv build demo test lint bench clean

# torch is pinned to the CPU wheel (an open range resolves to a multi-GB CUDA build); every other
# package is installed against constraints.txt so nothing can move torch.
$(VENV)/.stamp-deps: requirements-dev.txt constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "torch==2.13.0"
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -r requirements-dev.txt
	touch $@

# The native extension is rebuilt (ninja, incremental) when a C++ source or setup.py changes.
$(VENV)/.stamp-build: $(VENV)/.stamp-deps $(NATIVE_SRC) pyproject.toml
	$(PIP) install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

venv: $(VENV)/.stamp-build

demo: venv
	$(VPY) examples/demo.py --world-size $(WORLD)

test: venv
	$(VPY) -m pytest -q tests

lint: venv
	$(VPY) -m ruff check longmoe tests benchmarks examples

bench: venv
	$(VPY) benchmarks/attention_core.py

clean:
	rm -rf build $(VENV) *.egg-info longmoe/_C*.so
