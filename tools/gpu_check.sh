#!/usr/bin/env bash
# GPU readiness in one call (issue 15). On the lent GPU machine, from the repository root, after
# `make gpu-check` prepared .gpu-wheels/ here and printed the device call:
#     bash tools/gpu_check.sh            -> $OUT/gpu_check.json, $OUT/gpu_check.log (< 8 min)
#     bash tools/gpu_check.sh --dry      the same sections on CPU (make gpu-check DRY=1, tests)
# Sections, budgets and the JSON fields: tools/gpu_check.py's docstring.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${APT_PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/apt/torch_extensions}
# Bounded as a whole (8 minutes on the GPU; the dry run's sections have wider budgets) even if
# a child hangs.
limit=480
for arg in "$@"; do [ "$arg" = --dry ] && limit=1260; done
exec timeout --kill-after=10 "${GPU_CHECK_TIMEOUT:-$limit}" "$PY" -u tools/gpu_check.py "$@"
