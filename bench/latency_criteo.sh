#!/usr/bin/env bash
# Benchmark (not a test): ONNX Runtime CPU vs torch eager latency, same run, 2 threads each, for a
# Criteo-shaped DLRM (26 tables from real Criteo rows, dlrm's Kaggle MLPs 13-512-256-64-16 / 512-256-1):
# the d = 16 baseline, post-training MLET to d = 4, and the baseline with int8 dense layers (--dense int8).
#   bash bench/latency_criteo.sh [WORKDIR] [RESULTS]    -> RESULTS/latency_{base,mlet4,base_dense_int8}.json
set -euo pipefail
w=${1:-/tmp/recompress-latency}
out=${2:-bench/results}
src=../shared/data/criteo_kaggle_head10k/criteo_train_head10k.txt.gz
[ -d "$w/criteo10k" ] || recompress data criteo "$src" -o "$w/criteo10k"
recompress train --data "$w/criteo10k" --dim 16 --bottom 512,256,64 --top 512,256 --epochs 2 --lr 0.003 \
  --batch-size 128 -o "$w/base" --overwrite
recompress checkpoint "$w/base" --method mlet --dim 4 --data "$w/criteo10k" --epochs 1 --lr 0.001 \
  --batch-size 128 -o "$w/mlet4" --overwrite
recompress export "$w/base" --target onnx --data "$w/criteo10k" -o "$w/base.onnx" --overwrite
recompress export "$w/mlet4" --target onnx --data "$w/criteo10k" -o "$w/mlet4.onnx" --overwrite
recompress export "$w/base" --target onnx --dense int8 --data "$w/criteo10k" -o "$w/base_dense_int8.onnx" --overwrite
recompress evaluate "$w/base.onnx" --data "$w/criteo10k" --threads 2 --repeats 1000 --json "$out/latency_base.json"
for m in mlet4 base_dense_int8; do
  recompress evaluate "$w/$m.onnx" --data "$w/criteo10k" --threads 2 --repeats 1000 --json "$out/latency_$m.json"
done
for m in mlet4 base_dense_int8; do  # ΔAUC against the baseline on the same test rows, paired bootstrap CI
  recompress evaluate "$w/$m.onnx" --data "$w/criteo10k" --no-latency --compare "$out/latency_base.json" \
    --json "$out/latency_${m}_vs_base.json"
done
