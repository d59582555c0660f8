#!/usr/bin/env bash
# Run the CUDA test suite (tests/test_cuda.py, every test marked `cuda`) on a machine with a GPU.
#
#   tools/run_cuda_tests.sh                 # uses `python` from PATH (the env with adapters-reft installed)
#   PYTHON=/path/to/venv/bin/python tools/run_cuda_tests.sh -x -k bf16   # extra args go to pytest
#
# Fails early (exit 2) when torch sees no CUDA device: the tests would otherwise all be skipped and "pass".
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

"$PYTHON" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    print(f"torch {torch.__version__} sees no CUDA device; the cuda tests would all be skipped", file=sys.stderr)
    sys.exit(2)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: {torch.cuda.get_device_name(0)}")
PY

exec "$PYTHON" -m pytest -m cuda -v tests/test_cuda.py "$@"
