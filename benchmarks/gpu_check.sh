#!/usr/bin/env bash
# The device check, for a session lent a GPU (one H100/H200): the GPU tests, then benchmarks/gpu.py. About 8 minutes.
#
#   here, once:   bash benchmarks/gpu_wheels.sh          # open_clip & co. as wheels in .whl/ (not on the GPU image)
#   device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# Writes $OUT (or out/gpu_check): device.txt, gpu_tests.txt, gpu_benchmark.txt, gpu.json. The project is used from
# the working tree (PYTHONPATH), not installed: the GPU image's torch and CuPy are the ones to measure.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-out/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/device.txt" 2>&1
python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)" >> "$out/device.txt" 2>&1
status=0
timeout 180 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda_kernels.py tests/test_kernels.py \
    tests/test_device_path.py 2>&1 | tee "$out/gpu_tests.txt" || status=1
timeout 330 python3 -m benchmarks.gpu --json "$out/gpu.json" 2>&1 | tee "$out/gpu_benchmark.txt" || status=1
exit $status
