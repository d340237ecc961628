#!/usr/bin/env bash
# The Python packages the device check needs that the GPU machine's image lacks (open_clip_torch and the two pure
# Python packages it needs beyond what is there: ftfy, wcwidth), as Python 3.12 wheels in .whl/ (git-ignored).
# Run once here, where pip reaches PyPI; the device tool then carries .whl/ (see benchmarks/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d .whl open_clip_torch ftfy wcwidth
ls -l .whl
