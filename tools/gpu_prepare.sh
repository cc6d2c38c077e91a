#!/usr/bin/env bash
# make gpu-check (here, before a lent GPU is used): put into .gpu-wheels/ (git-ignored, carried to
# the GPU machine) what its image lacks, then print the one device call to make.
# The GPU image has Python 3.12, torch 2.11.0+cu130, triton, transformers, einops, msgpack,
# ninja, py-cpuinfo, psutil, numpy, pyyaml, tqdm, matplotlib (KINDS.md); it lacks megatron-core,
# DeepSpeed and DeepSpeed's pydantic / hjson. Versions: megatron-core and DeepSpeed as pinned
# in constraints/cpu.txt, pydantic and its parts as installed in the venv the tests ran with.
# APT itself travels as sources (the working tree; tools/gpu_check.py puts it on PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${APT_PYTHON:-.venv/bin/python}
DIR=.gpu-wheels
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
pin() { grep -E "^$1==" constraints/cpu.txt; }
installed() { "$PY" -c "import importlib.metadata as m; print('$1==' + m.version('$1'))"; }

rm -rf "$DIR"; mkdir -p "$DIR"
# Binary wheels for the GPU machine's CPython 3.12 on x86-64.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DIR" "$(pin megatron-core)" "$(installed pydantic_core)" \
    "$(installed pydantic)" "$(installed annotated_types)" "$(installed typing_inspection)" \
    "$(installed typing_extensions)" "$(installed hjson)"
# DeepSpeed is published as sources only: build its wheel here (pure Python; its ops are
# compiled at first use, and APT uses torch's AdamW, which needs none).
"$PY" -m pip wheel -q --no-deps -w "$DIR" "$(pin deepspeed)"
mib=$(du -sm "$DIR" | cut -f1)
ls -1 "$DIR"
echo "$DIR: ${mib} MiB (the device call carries at most 64 MiB with the working tree)"
[ "$mib" -lt 48 ] || { echo "gpu-check: $DIR is too large to carry" >&2; exit 1; }
cat <<'CALL'

The device call (the tool `run`, from the repository root of the session's checkout):
  command:   bash tools/gpu_check.sh
  carry:     [".gpu-wheels"]
  timeout_s: 540
It installs the wheels into /tmp/apt-gpu-site (pip --no-index --no-deps), runs every section
within 8 minutes and leaves $OUT/gpu_check.json and $OUT/gpu_check.log.
CALL
