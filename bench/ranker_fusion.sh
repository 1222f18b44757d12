#!/usr/bin/env bash
# Benchmark (not a test): the appended-candidate ranker (amortized) against early fusion (the candidate
# concatenated to every history item), trained alike on real Amazon Beauty: same epochs, seed, batches and
# sampled negatives (BCE, 4 per position), evaluated on every test user with the same 100 sampled negatives;
# the concat model's result carries the paired ΔNDCG@10 against the appended one (bootstrap over users).
#   bash bench/ranker_fusion.sh WORK_DIR RESULTS_DIR [EPOCHS]     (WORK_DIR/Beauty: a prepared Beauty set)
set -euo pipefail
w=$1
r=$2/ranker_fusion
epochs=${3:-2}
d=$w/Beauty
mkdir -p "$w/fusion" "$r"
for f in append concat; do
  [ -d "$w/fusion/$f" ] || recompress train --model ranker --fusion "$f" --data "$d" --epochs "$epochs" --dropout 0.5 \
    --seed 0 -o "$w/fusion/$f"
  cp "$w/fusion/$f/spec.json" "$r/$f.spec.json"
done
recompress evaluate "$w/fusion/append" --data "$d" --protocol sampled --no-latency \
  --json "$r/append.json"
recompress evaluate "$w/fusion/concat" --data "$d" --protocol sampled --no-latency \
  --compare "$r/append.json" --json "$r/concat.json"
