# Fresh machine:  make train   (sets up, then trains the tiny profile on CPU)
#                 make test    (sets up, then runs the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed compiles its CPU ops once (shm comm ~23 s); keep them between runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/apt/torch_extensions

.PHONY: setup train test plan clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints/cpu.txt -e ".[test]"
	touch $@

train: setup
	$(PY) launch/train.py --profile tiny

test: setup
	$(PY) -m pytest tests -q

plan: setup
	$(PY) -m apt plan --profile 70b --nodes 8 --gpus-per-node 8

clean:
	rm -rf $(VENV) runs
