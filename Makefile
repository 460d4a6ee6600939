# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch is installed first, so a GPU user's own torch build is kept
# (the package itself only declares a range).
TORCH_SPEC ?= torch==2.13.0
# On a small shared CPU box, OpenMP threads that spin while waiting slow everything else down.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup demo test docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,data,log,crf]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/wsss demo --out runs/demo

test: setup
	$(PY) -m pytest -q

# The documentation site (docs/, mkdocs.yml) into site/; --strict turns every warning into an error.
$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e ".[docs]"
	touch $@

docs: $(VENV)/.docs-installed
	$(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs build site src/*.egg-info
