#!/usr/bin/env bash
# Benchmark (not a test): wall time and peak memory of the README's quickstart on this machine, from a
# fresh run folder, then of a re-run that reuses every cached step.
#   bash bench/quickstart_time.sh [RESULTS_JSON]      -> bench/results/quickstart_time.json
#                                                        and the fresh run's report as quickstart_report.md
set -euo pipefail
out=${1:-bench/results/quickstart_time.json}
w=$(mktemp -d)
measure() {  # $1 = label; prints one JSON object from /usr/bin/time -v
  /usr/bin/time -v recompress run quickstart -o "$w/run" > "$w/$1.out" 2> "$w/$1.err"
  python3 - "$1" "$w/$1.err" "$w/$1.out" <<'PY'
import json, re, sys
err = open(sys.argv[2]).read()
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", err).group(1).split(":")
seconds = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall)))
rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1))
print(json.dumps({"run": sys.argv[1], "wall_seconds": round(seconds, 1), "peak_rss_gb": round(rss_kb / 1e6, 3),
                  "summary": open(sys.argv[3]).read().strip().splitlines()[-1]}))
PY
}
{ measure fresh; cp "$w/run/report.md" "$(dirname "$out")/quickstart_report.md"; measure rerun; } | python3 -c "import json,sys; print(json.dumps([json.loads(l) for l in sys.stdin], indent=2))" > "$out"
cat "$out"
rm -rf "$w"
