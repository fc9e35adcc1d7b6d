#!/usr/bin/env bash
# Install the TensorRT type stubs for mypy on machines without TensorRT (CI, laptops).
# --no-deps: their `tensorrt` dependency cannot be installed without a GPU host. The stubs ship five lines that are
# not valid Python (parameters named `in`, a non-default parameter after defaults, in APIs mexport does not use);
# patch them so mypy can read the file. Idempotent.
set -euo pipefail
pip install --no-deps 'tensorrt-stubs==10.13.0.35.1'
stub="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tensorrt_bindings/tensorrt.pyi"
sed -i -E 's/([(,] *)in: /\1in_: /g; s/channel_axis: int\) -> IScaleLayer/channel_axis: int = ...) -> IScaleLayer/' "$stub"
