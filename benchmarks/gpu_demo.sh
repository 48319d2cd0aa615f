#!/bin/sh
# The demo and the GPU tests on a GPU machine, each with its wall time, into OUT:
#   sh benchmarks/gpu_demo.sh OUT
# OUT/demo.json (the demo's rows), OUT/demo.log (its table and summary), OUT/times.txt (wall seconds of each),
# OUT/gpu_tests.log (pytest -m gpu).
set -u
out=${1:?usage: sh benchmarks/gpu_demo.sh OUT}
mkdir -p "$out"
start=$(date +%s)
python3 -m einflash demo --json > "$out/demo.json" 2> "$out/demo.log"
rc=$?
echo "demo: $(( $(date +%s) - start )) s, exit $rc" >> "$out/times.txt"
python3 - "$out/demo.json" >> "$out/demo.log" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
for r in rows:
    print(f"{r['name']:22} {str(r.get('status')):12} ok={r['ok']} grad_ok={r['grad_ok']} {r.get('seconds', 0):6.1f} s  "
          f"{(r.get('reason') or r.get('grad_reason') or '')[:100]}")
print(len(rows), "rows")
PY
start=$(date +%s)
python3 -m pytest -m gpu -q -p no:cacheprovider tests > "$out/gpu_tests.log" 2>&1
echo "pytest -m gpu: $(( $(date +%s) - start )) s, exit $?" >> "$out/times.txt"
cat "$out/times.txt"
tail -3 "$out/gpu_tests.log"
