#!/usr/bin/env bash
# The device check in one line (docs/gpu.md): benchmarks/gpu_check.sh OUTDIR [gpu_check options]
set -euo pipefail; cd "$(dirname "$0")/.."; exec env PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
