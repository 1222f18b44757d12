#!/usr/bin/env bash
# Benchmark (not a test): ONNX Runtime CPU vs torch eager latency, same run, 2 threads each, for a
# Criteo-shaped DLRM (26 tables from real Criteo rows, dlrm's Kaggle MLPs 13-512-256-64-16 / 512-256-1).
#   bash bench/latency_criteo.sh [WORKDIR]     -> WORKDIR/latency_{base,mlet4}.json
set -euo pipefail
w=${1:-/tmp/recompress-latency}
src=../shared/data/criteo_kaggle_head10k/criteo_train_head10k.txt.gz
mkdir -p "$w"
[ -d "$w/criteo10k" ] || recompress data criteo "$src" -o "$w/criteo10k"
recompress train --data "$w/criteo10k" --dim 16 --bottom 512,256,64 --top 512,256 --epochs 2 --lr 0.003 \
  --batch-size 128 -o "$w/base" --overwrite
recompress checkpoint "$w/base" --method mlet --dim 4 --data "$w/criteo10k" --epochs 1 --lr 0.001 \
  --batch-size 128 -o "$w/mlet4" --overwrite
for m in base mlet4; do
  recompress export "$w/$m" --target onnx --data "$w/criteo10k" -o "$w/$m.onnx" --overwrite
  recompress evaluate "$w/$m.onnx" --data "$w/criteo10k" --threads 2 --repeats 1000 --json "$w/latency_$m.json"
done
