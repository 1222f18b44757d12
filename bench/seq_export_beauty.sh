#!/usr/bin/env bash
# Benchmark (not a test): SASRec, HSTU and the ranker trained on real Amazon Beauty (short training: this
# checks exports, not accuracy), exported to ONNX in every form, each export scored by ONNX Runtime and by
# the checkpoint in torch on the same test users (paired ΔNDCG@10 with a 95% interval; ranks are
# tie-broken with the same seed, so identical scores give Δ = 0 exactly). SASRec and HSTU: full ranking of
# every test user; the ranker: 100 sampled negatives, 2,000 users; naive and per-row graphs: sampled, 500 users.
#   bash bench/seq_export_beauty.sh WORK_DIR RESULTS_DIR ["NAME ..."]  (WORK_DIR/Beauty: a prepared Beauty set;
#   NAMEs: re-make only these exports, e.g. "ranker ranker-decomposed", keeping the others' results)
set -euo pipefail
w=$1
r=$2/seq_export_beauty
mkdir -p "$w/exp" "$r"
d=$w/Beauty
only=${3:-}
[ -d "$w/exp/sasrec" ] || recompress train --model sasrec --data "$d" --epochs 3 --dropout 0.5 -o "$w/exp/sasrec"
[ -d "$w/exp/hstu" ] || recompress train --model hstu --data "$d" --epochs 3 --dropout 0.5 -o "$w/exp/hstu"
[ -d "$w/exp/ranker" ] || recompress train --model ranker --data "$d" --epochs 1 --dropout 0.5 -o "$w/exp/ranker"
[ -d "$w/exp/sasrec-int8" ] || recompress checkpoint "$w/exp/sasrec" --method int8 -o "$w/exp/sasrec-int8"
[ -d "$w/exp/sasrec-tt" ] || recompress checkpoint "$w/exp/sasrec" --method tt --tt-rank 16 -o "$w/exp/sasrec-tt"
run() {  # name checkpoint "evaluate options" [export options...]
  local name=$1 ck=$2 ev=$3
  shift 3
  [ -z "$only" ] || [[ " $only " == *" $name "* ]] || return 0
  recompress export "$ck" --data "$d" -o "$w/exp/$name.onnx" --overwrite "$@"
  cp "$w/exp/$name.onnx/manifest.json" "$r/$name.manifest.json"
  # shellcheck disable=SC2086
  recompress evaluate "$w/exp/$name.onnx" --data "$d" --no-latency $ev --json "$r/$name.json"
}
all="--users 22363"          # every Beauty test user, full ranking
few="--protocol sampled --users 500"   # the naive graph: one history pass per candidate
[ -n "$only" ] || rm -f "$r"/*.json  # this script's own results, re-made below
run sasrec "$w/exp/sasrec" "$all"
run sasrec-decomposed "$w/exp/sasrec" "$all" --attention decomposed
run sasrec-per-row "$w/exp/sasrec" "$few" --candidates-layout per-row
run sasrec-naive "$w/exp/sasrec" "$few" --scoring naive
run sasrec-int8 "$w/exp/sasrec-int8" "$all"
run sasrec-tt "$w/exp/sasrec-tt" "$all"
run hstu "$w/exp/hstu" "$all"
run hstu-custom "$w/exp/hstu" "$all" --attention custom
run ranker "$w/exp/ranker" "--users 2000"
run ranker-decomposed "$w/exp/ranker" "--users 2000" --attention decomposed
python - "$r" <<'EOF'
import json, sys
from pathlib import Path
r = Path(sys.argv[1])
rows = ["| export | protocol | ops | opset | parity max abs diff | file bytes | NDCG@10 ORT | NDCG@10 torch | Δ ORT − torch (95% CI) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|"]
for m in sorted(r.glob("*.manifest.json")):
    name = m.name[: -len(".manifest.json")]
    man, res = json.loads(m.read_text()), json.loads((r / f"{name}.json").read_text())
    d = res["export_vs_checkpoint"]
    ops = ", ".join([o for o in ("Attention", "Softmax") if o in man["ops"]] + list(man.get("custom_ops", {})))
    acc = res["accuracy"]
    rows.append(f"| {name} ({man['options']['scoring']}, {'/'.join(man['attention']) or '-'}) | {res['data']['protocol']} | "
                f"{ops or '-'} | {man['opset']} | {man['parity']['max_abs_diff']:.1e} | {res['bytes']['file']:,} | "
                f"{acc['onnxruntime']['ndcg@10']:.4f} | {acc['torch']['ndcg@10']:.4f} | "
                f"{d['delta']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] |")
(r / "summary.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
EOF
