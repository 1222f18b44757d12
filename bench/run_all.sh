#!/usr/bin/env bash
# Every number in docs/benchmarks.md comes from one of these commands (run from the repository root, with
# ../shared/data present). Each writes JSON (and PNG/Markdown) into bench/results/.
#   bash bench/run_all.sh [SECTION...]     sections: kinds-criteo mlet-criteo mlet-syn1m kinds-syn10m latency
#                                          latency-repeat interleave ort-ops quant-memory compress-10m quickstart
#                                          seq-speed seq-accuracy seq-ranker seq-frontier seq-scaling
#                                          seq-scaling-report (curves from the runs so far) seq-export
#                                          seq-export-beauty seq-ranker-fusion trt-build trt-fusion (both need the
#                                          trt extra) stream-memory (writes up to 20.5 GB under /tmp) load-memory
#                                          (up to 31 GB under /tmp) criteo-reader distributed-train shard-memory upstream-recbole
#                                          upstream-sasrec (needs SASREC_REPO: a
#                                          pmixer/SASRec.pytorch checkout, run as upstream code beside recompress)
#                                          upstream-dlrm (needs DLRM_REPO, a facebookresearch/dlrm checkout, and
#                                          DLRM_PYTHON, an interpreter with numpy 1, scikit-learn, mlperf_logging)
#                                          upstream-torchrec (needs TORCHREC_PYTHON: torchrec 1.9.2, fbgemm-gpu-cpu
#                                          1.8.0 --no-deps, recompress --no-deps -e .)
#                                          upstream-hstu (needs GR_REPO, a facebookresearch/generative-recommenders
#                                          checkout, and HSTU_PYTHON, an interpreter with torch, gin-config, pandas)
#                                          upstream-hstu-accuracy (the same two; upstream trains ~20 min)
#                                          upstream-dlrm-v3 (needs GR_REPO and GR_PYTHON, this project's
#                                          interpreter with TorchRec and gin-config) upstream-dlrm-hstu (the same
#                                          two, GR_PYTHON also with pandas, tensorboard, torchmetrics 1.0.3 and
#                                          lightning-utilities; upstream trains ~7 min) dlrm-hstu-frontier
#                                          (after it: its folder compressed every way by one recompress bench)
#                                          upstream-recbole-models (needs RECBOLE_PYTHON, an interpreter with torch
#                                          2.13, recbole 1.2.1, numpy < 2, pandas < 3; RecBole trains ~20 min)
#                                          upstream-torchrec-bert4rec (needs TORCHREC_REPO, a pytorch/torchrec
#                                          checkout, and B4R_PYTHON, this project's interpreter with TorchRec
#                                          and pandas; the example trains ~20 min) torchrec-bert4rec-frontier
#                                          (after it: its file compressed every way by one recompress bench)
# latency*, interleave, ort-ops, quant-memory, compress-10m, quickstart, seq-speed, seq-export, trt-build and
# stream-memory, load-memory, distributed-train, shard-memory time things: run each
# on an otherwise idle machine. The other seq-* sections run on one thread each and may run two at a time
# (their accuracy does not depend on timing); their epochs are cut to fit a 2-core machine in about 1.5 h.
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
    seq-*) [ -d "$w/${1#seq-}" ] || recompress data sequences "$(seqsrc "${1#seq-}")" -o "$w/${1#seq-}" ;;
  esac
}
seqsrc() {  # real sequence files in ../shared/data (research-only terms: never copied into the repository)
  case $1 in
    Beauty|Sports_and_Outdoors) echo "../shared/data/seq_s3rec_amazon_yelp_lastfm/$1.txt.gz" ;;
    bert4rec_beauty) echo ../shared/data/seq_bert4rec_amazon_beauty/beauty.txt.gz ;;
  esac
}
sections=${*:-kinds-criteo mlet-criteo mlet-syn1m kinds-syn10m latency latency-repeat interleave ort-ops quant-memory compress-10m quickstart seq-speed seq-accuracy seq-ranker seq-frontier seq-scaling seq-export seq-export-beauty seq-ranker-fusion trt-build trt-fusion stream-memory load-memory criteo-reader distributed-train upstream-recbole}
frontier_sweeps="--sweep fp16 --sweep bf16 --sweep freqhash:ratio=8 --sweep hash:ratio=4,16,64 --sweep qr:ratio=32
  --sweep lowrank:rank=8,32 --sweep tt:tt_rank=16,32 --sweep tt,int8:tt_rank=16 --sweep hash,int8:ratio=8"
scaling_args="--data $w/bert4rec_beauty --sizes 16/1/1,24/1/1,32/2/1,48/2/1,64/2/2 --seeds 0,1,2 --epochs 3
  --batch-size 256 --lr 0.002 --threads 1 --out $r/scaling.json"
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
    seq-speed) data seq-Beauty; python bench/sequential.py --data "$w/Beauty" --models sasrec,hstu --seeds 0 --epochs 1 \
                 --threads 2 --out $r/sequential_speed.json ;;
    seq-accuracy) data seq-Beauty; data seq-Sports_and_Outdoors
                  python bench/sequential.py --data "$w/Beauty" --data "$w/Sports_and_Outdoors" --models sasrec,hstu \
                    --seeds 0,1,2 --epochs 6 --threads 1 --out $r/sequential_accuracy.json ;;
    seq-ranker) data seq-Beauty; data seq-Sports_and_Outdoors
                python bench/sequential.py --data "$w/Beauty" --data "$w/Sports_and_Outdoors" --models ranker \
                  --seeds 0,1,2 --epochs 1 --full-users 500 --threads 1 --out $r/sequential_ranker.json ;;
    seq-frontier) OMP_NUM_THREADS=1 recompress bench sasrec-beauty -o "$w/sasrec-beauty" --set train.epochs=6 \
                    --set evaluate.threads=1 --set evaluate.repeats=30 $frontier_sweeps
                  mkdir -p $r/frontier_sasrec_beauty
                  cp "$w/sasrec-beauty"/{summary.json,report.md,results.csv,*.png} $r/frontier_sasrec_beauty/ ;;
    seq-scaling) data seq-bert4rec_beauty; python bench/scaling.py $scaling_args ;;
    seq-scaling-report) python bench/scaling.py $scaling_args --report-only ;;
    seq-export) python bench/seq_export.py --out $r/seq_export.json ;;
    seq-export-beauty) data seq-Beauty; OMP_NUM_THREADS=1 bash bench/seq_export_beauty.sh "$w" $r ;;
    seq-ranker-fusion) data seq-Beauty; bash bench/ranker_fusion.sh "$w" $r 2 ;;
    trt-build) python bench/trt_build.py --out $r/trt_build.json ;;
    trt-fusion) python bench/trt_fusion.py --out $r/trt_fusion.json ;;
    upstream-sasrec) python bench/upstream_sasrec.py --repo "${SASREC_REPO:?set SASREC_REPO to a pmixer/SASRec.pytorch checkout (its python folder)}" \
                       --data ../shared/data/seq_sasrec_amazon_video_games/Video.txt.gz --out $r/upstream_sasrec.json ;;
    upstream-dlrm) python bench/upstream_dlrm.py --repo "${DLRM_REPO:?set DLRM_REPO to a facebookresearch/dlrm checkout}" \
                     --python "${DLRM_PYTHON:?set DLRM_PYTHON to a python with numpy 1, scikit-learn, mlperf_logging}" \
                     --data "$criteo" --out $r/upstream_dlrm.json ;;
    upstream-torchrec) "${TORCHREC_PYTHON:?set TORCHREC_PYTHON to a python with torchrec and recompress}" \
                         bench/upstream_torchrec.py --out $r/upstream_torchrec.json ;;
    upstream-dlrm-v3) "${GR_PYTHON:?set GR_PYTHON to a python with torchrec, gin-config and recompress}" \
                        bench/upstream_dlrm_v3.py "${GR_REPO:?set GR_REPO to a generative-recommenders checkout}" \
                        --out $r/upstream_dlrm_v3.json ;;
    upstream-dlrm-hstu) python bench/upstream_dlrm_hstu.py \
                          --repo "${GR_REPO:?set GR_REPO to a generative-recommenders checkout}" \
                          --python "${GR_PYTHON:?set GR_PYTHON to a python with torchrec, gin-config, pandas, tensorboard}" \
                          --movielens ../shared/data/movielens_latest_small --out $r/upstream_dlrm_hstu.json \
                          --work "$w/dlrm_hstu" ;;
    dlrm-hstu-frontier)  # after upstream-dlrm-hstu: compress its folder every way, one command
        recompress bench bench/dlrm_hstu_frontier.toml --set data.path="$w/dlrm_hstu/recompress_data" \
            --set baseline.checkpoint="$(ls -d "$w"/dlrm_hstu/ckpt/*/ | head -1)" -o "$w/dlrm_hstu_frontier"
        mkdir -p $r/frontier_dlrm_hstu
        cp "$w/dlrm_hstu_frontier"/{summary.json,report.md,results.csv,*.png} $r/frontier_dlrm_hstu/ ;;
    upstream-recbole) python bench/upstream_recbole.py --out $r/upstream_recbole.json ;;
    upstream-torchrec-bert4rec)
        "${B4R_PYTHON:?set B4R_PYTHON to a python with torchrec, fbgemm-gpu-cpu, pandas and recompress}" \
            bench/upstream_torchrec_bert4rec.py \
            --repo "${TORCHREC_REPO:?set TORCHREC_REPO to a pytorch/torchrec checkout}/examples/bert4rec" \
            --ratings ../shared/data/movielens_latest_small/ratings.csv.gz --out $r/upstream_torchrec_bert4rec.json \
            --upstream-dir "$w/torchrec_bert4rec" ;;
    torchrec-bert4rec-frontier)  # after upstream-torchrec-bert4rec: compress its file every way, one command
        recompress data sequences ../shared/data/movielens_latest_small/ratings.csv.gz --layout torchrec \
            -o "$w/ml_torchrec" --overwrite
        OMP_NUM_THREADS=1 recompress bench bench/torchrec_bert4rec_frontier.toml --set data.path="$w/ml_torchrec" \
            --set baseline.checkpoint="$w/torchrec_bert4rec/epoch_10_model.pth" --set evaluate.threads=1 \
            -o "$w/torchrec_bert4rec_frontier"
        mkdir -p $r/frontier_torchrec_bert4rec
        cp "$w/torchrec_bert4rec_frontier"/{summary.json,report.md,results.csv,*.png} $r/frontier_torchrec_bert4rec/ ;;
    upstream-recbole-models)
        "${RECBOLE_PYTHON:?set RECBOLE_PYTHON to an interpreter with recbole 1.2.1 (see bench/upstream_recbole_build.py)}" \
            bench/upstream_recbole_build.py --out "$w/recbole_runs"
        python bench/upstream_recbole.py --runs "$w/recbole_runs" --out $r/upstream_recbole_models.json ;;
    upstream-hstu) python bench/upstream_hstu.py --repo "${GR_REPO:?set GR_REPO to a facebookresearch/generative-recommenders checkout}" \
                     --python "${HSTU_PYTHON:?set HSTU_PYTHON to an interpreter with torch, gin-config and pandas}" \
                     --out $r/upstream_hstu.json ;;
    upstream-hstu-accuracy) python bench/upstream_hstu_accuracy.py \
                     --repo "${GR_REPO:?set GR_REPO to a facebookresearch/generative-recommenders checkout}" \
                     --python "${HSTU_PYTHON:?set HSTU_PYTHON to an interpreter with torch, gin-config and pandas}" \
                     --movielens ../shared/data/movielens_latest_small --out $r/upstream_hstu_accuracy.json ;;
    stream-memory) python bench/stream_memory.py --out $r/stream_memory.json
                   python bench/stream_memory.py --out $r/stream_memory_lowrank_hash.json --methods lowrank,hash,qr
                   python bench/stream_memory.py --out $r/stream_memory_qr.json --rows 1000000,10000000,40000000 \
                     --methods qr --in-memory-up-to 0 --zeros
                   python bench/stream_memory.py --out $r/stream_larger_than_ram.json --rows 130000000 --dim 64 \
                     --methods int8 --in-memory-up-to 0 --zeros
                   python bench/stream_memory.py --out $r/stream_memory_dcp.json --source dcp
                   python bench/stream_memory.py --out $r/stream_memory_dcp_vs_native.json --source native,dcp \
                     --rows 10000000 --in-memory-up-to 0 --repeats 2
                   python bench/stream_memory.py --out $r/stream_memory_dcp_vs_native_40m.json --source native,dcp \
                     --rows 40000000 --in-memory-up-to 0
                   python bench/stream_memory.py --out $r/stream_memory_dcp_final.json --source dcp --rows 10000000 \
                     --in-memory-up-to 0
                   python bench/stream_memory.py --out $r/stream_memory_hash.json --methods hash --in-memory-up-to 0
                   python bench/stream_memory.py --out $r/stream_memory_nvidia.json --source nvidia --methods int8,tt \
                     --rows 1000000,10000000
                   python bench/inspect_memory.py --out $r/inspect_dcp.json --baseline bfe3d5c ;;
    criteo-reader) python bench/criteo_reader.py --out $r/criteo_reader.json --baseline 9952826 --repeats 2
                   python bench/criteo_reader.py --out $r/criteo_reader_profile.json --profile --rows 1000000 ;;
    distributed-train) python bench/distributed_train.py --out $r/distributed_train.json ;;
    shard-memory) python bench/shard_memory.py --out $r/shard_memory.json ;;  # needs TorchRec (docs/scale.md)
    load-memory) python bench/load_memory.py --out $r/load_memory.json --baseline 1b092bd --rows 1000,1000000,10000000
                 python bench/load_memory.py --out $r/load_larger_than_ram.json --rows 130000000 --zeros \
                   --checkpoints fp32 --commands evaluate --repeats 1
                 python bench/load_memory.py --out $r/load_memory_upstream.json --baseline c7d5a35 \
                   --source dlrm,nvidia --checkpoints fp32 --rows 1000,1000000,10000000
                 python bench/load_memory.py --out $r/export_stacked_file.json --baseline b81b7bd --rows 1000,10000000 \
                   --commands export
                 python bench/load_memory.py --out $r/export_stacked_file_40m.json --rows 40000000 --checkpoints fp32 \
                   --repeats 1
                 python bench/load_memory.py --out $r/trt_build_memory.json --baseline 32be0b1 --rows 1000,10000000 \
                   --checkpoints fp32 --commands export-trt --repeats 1  # needs tensorrt-rtx (pip install -e ".[trt]")
                 python bench/load_memory.py --out $r/finetune_memory.json --checkpoints fp32 \
                   --commands finetune-adam,finetune-rowwise-adagrad --rows 1000,10000000
                 python bench/load_memory.py --out $r/keep_best_memory.json --baseline 64507bf --checkpoints fp32 \
                   --commands finetune-rowwise-adagrad-keep-best --rows 1000,10000000
                 python bench/load_memory.py --out $r/load_memory_fp16.json --baseline 8907405 \
                   --source dlrm-fp16 --checkpoints fp32 --rows 1000,10000000
                 # root and cgroup v1 (bench/measure.py MemoryLimit): each command held to 2 GiB, page cache included
                 python bench/load_memory.py --out $r/export_over_memory_limit.json --baseline b81b7bd \
                   --rows 20000000 --zeros --checkpoints fp32 --commands evaluate,export --repeats 1 --memory-limit-gb 2
                 python bench/load_memory.py --out $r/export_dense_int8_over_memory_limit.json --baseline 927c8ef \
                   --rows 20000000 --zeros --checkpoints fp32 --commands export-dense-int8 --repeats 1 --memory-limit-gb 2
                 python bench/load_memory.py --out $r/export_larger_than_ram.json --rows 100000000 --zeros \
                   --checkpoints fp32 --commands export --repeats 1
                 # the same with vm.overcommit_memory=1 (root), so that ONNX Runtime may map it; set back after
                 was=$(cat /proc/sys/vm/overcommit_memory); echo 1 > /proc/sys/vm/overcommit_memory
                 if ! python bench/load_memory.py --out $r/export_larger_than_ram_overcommit1.json --rows 100000000 \
                      --zeros --checkpoints fp32 --commands export --repeats 1; then
                   echo "$was" > /proc/sys/vm/overcommit_memory; exit 1
                 fi
                 echo "$was" > /proc/sys/vm/overcommit_memory ;;
    *) echo "unknown section $s" >&2; exit 2 ;;
  esac
done
