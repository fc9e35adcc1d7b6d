#!/usr/bin/env bash
# The prepared GPU check (bench/device_check.py): <= 8 minutes on one H100/H200-class GPU with PyTorch CUDA;
# TensorRT and onnxruntime-gpu are used when installed, each check they need skipped with a line when not.
# Figures go to one JSON file (schema: docs/device-check.md).
#   bench/device_check.sh [--output device_check.json]      on a GPU host
#   bench/device_check.sh --cpu-smoke --output /tmp/dc.json  anywhere: tiny shapes, a few questions (< 2 min)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$here/device_check.py" "$@"
