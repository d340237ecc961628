#!/usr/bin/env bash
# The device check, for a session lent a GPU (one H100/H200), in stages that each have their own time limit and
# write their output to $OUT as they finish, so a bad first run still leaves what ran before it. Under 9 minutes.
#
#   here, once:   bash benchmarks/gpu_wheels.sh          # open_clip & co. as wheels in .whl/ (not on the GPU image)
#   device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
#   1 smoke      (90 s)  every fused kernel once on small inputs against NumPy      -> smoke.txt
#   2 GPU tests  (130 s) the CuPy kernels, the fused kernels, the device path      -> gpu_tests.txt
#   3 benchmark  (270 s) python -m benchmarks.gpu, each kernel fused and generic    -> gpu_benchmark.txt, gpu.json
#
# device.txt says what the machine is; stages.txt has one line per stage (exit status, seconds). The project is
# used from the working tree (PYTHONPATH), not installed: the GPU image's torch and CuPy are the ones to measure.
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
timeout 30 python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)" \
    >> "$out/device.txt" 2>&1
: > "$out/stages.txt"
status=0

# stage NAME SECONDS FILE COMMAND...: run one stage under its own limit, its output straight into $out/FILE
stage() {
    local name=$1 limit=$2 file=$3 start rc
    shift 3
    start=$SECONDS
    echo "== $name (limit ${limit}s)" >&2
    timeout --kill-after=10 "$limit" "$@" > "$out/$file" 2>&1
    rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s$([ $rc -eq 124 ] && echo ' (time limit)')" \
        | tee -a "$out/stages.txt" >&2
    tail -n 5 "$out/$file" >&2
    [ $rc -eq 0 ] || status=1
}

# GPU_CHECK_LIMITS="smoke tests benchmark" in seconds overrides the limits (the CPU test of this script uses it)
read -r smoke_s tests_s bench_s <<< "${GPU_CHECK_LIMITS:-90 130 270}"
pytest_q=(python3 -m pytest -q -p no:cacheprovider -rs)
stage smoke "$smoke_s" smoke.txt "${pytest_q[@]}" tests/test_cuda_kernels.py -k gpu
stage gpu_tests "$tests_s" gpu_tests.txt "${pytest_q[@]}" tests/test_cuda_kernels.py tests/test_kernels.py \
    tests/test_device_path.py
stage benchmark "$bench_s" gpu_benchmark.txt python3 -m benchmarks.gpu --json "$out/gpu.json"
exit $status
