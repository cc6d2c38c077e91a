# Fresh machine:  make train   (sets up, then trains the tiny profile on CPU)
#                 make test    (sets up, then runs the test suite)
# Before a lent GPU: make gpu-check (wheels + the device call); on CPU: make gpu-check DRY=1
#                 make docker-test (root: builds docker/Dockerfile on a local Debian base)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed compiles its CPU ops once (shm comm ~23 s); keep them between runs.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/apt/torch_extensions

.PHONY: setup train test plan clean gpu-check docker-test

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints/cpu.txt -e ".[test]"
	touch $@

train: setup
	$(PY) launch/train.py --profile tiny

test: setup
	$(PY) -m pytest tests -q --durations=30

plan: setup
	$(PY) -m apt plan --profile 70b --nodes 8 --gpus-per-node 8

# GPU readiness (tools/gpu_check.py): prepare .gpu-wheels/ and print the one device call; with
# DRY=1 run the same check on CPU (tiny model, few steps) into gpu-check-out/.
gpu-check: setup
ifeq ($(DRY),1)
	APT_PYTHON=$(PY) bash tools/gpu_check.sh --dry
else
	APT_PYTHON=$(PY) bash tools/gpu_prepare.sh
endif

docker-test:
	bash tools/docker_test.sh

clean:
	rm -rf $(VENV) runs gpu-check-out .gpu-wheels
