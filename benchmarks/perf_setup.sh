#!/usr/bin/env bash
# perf_analyzer for benchmarks/perf_analyzer.py: the binary from tritonclient 2.51's wheel and libcudart from
# nvidia-cuda-runtime-cu12 into .perf/ (git-ignored), libb64 from Debian. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! ldconfig -p | grep -q libb64; then
    (apt-get install -y -q libb64-0d || (apt-get update -q && apt-get install -y -q libb64-0d)) > /dev/null
fi
if [ ! -x .perf/bin/perf_analyzer ]; then
    "$python" -m pip install -q --no-deps --target .perf tritonclient==2.51.0 nvidia-cuda-runtime-cu12
fi
LD_LIBRARY_PATH=.perf/nvidia/cuda_runtime/lib .perf/bin/perf_analyzer --version
