# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install the pinned
# package first (pip only: uv/poetry would fetch multi-GB CUDA wheels).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export WANDB_MODE := disabled

.PHONY: demo test install synthetic clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(PY) scripts/demo.py

synthetic: install
	$(PY) scripts/make_synthetic.py

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs multirun data/synthetic
