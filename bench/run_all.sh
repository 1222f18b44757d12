#!/usr/bin/env bash
# Every number in docs/benchmarks.md comes from one of these commands (run from the repository root, with
# ../shared/data present). Each writes JSON (and PNG/Markdown) into bench/results/.
#   bash bench/run_all.sh [SECTION...]     sections: kinds-criteo mlet-criteo mlet-syn1m kinds-syn10m latency
#                                          latency-repeat interleave ort-ops quant-memory compress-10m quickstart
# The last three time whole commands in seconds: run them on an otherwise idle machine.
set -euo pipefail
w=${BENCH_WORK:-/tmp/recompress-bench}
r=bench/results
mkdir -p "$w" "$r"
criteo=../shared/data/criteo_kaggle_head10k/criteo_train_head10k.txt.gz
data() {  # $1 = name
  case $1 in
    criteo10k) [ -d "$w/criteo10k" ] || recompress data criteo "$criteo" -o "$w/criteo10k" ;;
    syn1m) [ -d "$w/syn1m" ] || recompress data synthetic -o "$w/syn1m" --samples 400000 --zipf 1.2 \
             --tables 2000000,1000000,200000,50000,10000,1000,100,10 ;;
    syn10m) [ -d "$w/syn10m" ] || recompress data synthetic -o "$w/syn10m" --samples 300000 --zipf 1.2 \
              --tables 5000000,3000000,1500000,400000,100000,10000,1000,100 ;;
  esac
}
sections=${*:-kinds-criteo mlet-criteo mlet-syn1m kinds-syn10m latency latency-repeat interleave ort-ops quant-memory compress-10m quickstart}
for s in $sections; do
  echo "== $s ($(date +%H:%M:%S))"
  case $s in
    kinds-criteo) data criteo10k; python bench/table_kinds.py --data "$w/criteo10k" --out $r/kinds_criteo10k.json --seeds 0,1,2 ;;
    mlet-criteo) data criteo10k; python bench/mlet_sweep.py --data "$w/criteo10k" --out $r/mlet_criteo10k.json ;;
    mlet-syn1m) data syn1m; python bench/mlet_sweep.py --data "$w/syn1m" --out $r/mlet_synthetic1m.json --batch-size 512 --epochs 1 ;;
    kinds-syn10m) data syn10m; python bench/table_kinds.py --data "$w/syn10m" --out $r/kinds_synthetic10m.json --seeds 0,1,2 \
                    --epochs 1 --batch-size 512 --lr 0.003 --min-rows 10000 ;;
    latency) bash bench/latency_criteo.sh "$w/latency" $r ;;
    latency-repeat) [ -d "$w/latency/base.onnx" ] || bash bench/latency_criteo.sh "$w/latency" $r
                    for i in 1 2 3; do for m in base base_dense_int8; do  # the same exports, three more runs
                      recompress evaluate "$w/latency/$m.onnx" --data "$w/latency/criteo10k" --threads 2 --repeats 1000 \
                        --batch-sizes 1,512 --json $r/latency_repeat${i}_$m.json; done; done ;;
    interleave) [ -d "$w/latency/base.onnx" ] || bash bench/latency_criteo.sh "$w/latency" $r
                python bench/interleave.py --export "$w/latency/base.onnx" --ckpt "$w/latency/base" \
                  --data "$w/latency/criteo10k" --out $r/interleave.json ;;
    ort-ops) python bench/ort_ops.py --out $r/ort_ops.json ;;
    quant-memory) python bench/quant_memory.py --out $r/quant_memory.json ;;
    compress-10m) python bench/compress_10m.py --out $r/compress_10m.json ;;
    quickstart) bash bench/quickstart_time.sh $r/quickstart_time.json ;;
    *) echo "unknown section $s" >&2; exit 2 ;;
  esac
done
