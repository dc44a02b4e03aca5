#!/bin/bash
# Run `deltaserve bench agents` one target at a time, in the order given, and print each run's median turn (over
# all turns of all agents) and wall, with torch's 2048^3 bf16 matmul rate (the roofline bench's `matmul_rate`) just
# before it: on a VM whose speed moves, alternating targets (e.g. deltaserve-stateful vllm-ngram ...) brackets the
# drift.
#   bash scripts/bracket_agents.sh WORKFLOW TARGET...      e.g. bash scripts/bracket_agents.sh 6 deltaserve-stateful vllm-ngram
set -euo pipefail
W=$1; shift
PY=${PY:-.venv/bin/python}
i=0
for t in "$@"; do
  i=$((i + 1))
  out=bench_out/bracket-w$W-$i-$t
  rate=$("$PY" -c "import torch; torch.set_num_threads(2)
from deltaserve_bench.roofline_bench import matmul_rate
print(int(matmul_rate(torch.bfloat16) / 1e9))")
  "$PY" -m deltaserve.cli bench agents --workflow "$W" --agents 4 --max-tokens 32 --ignore-eos --seed 0 --targets "$t" \
    --no-progress --out "$out" > "$out.log" 2>&1
  "$PY" - "$out" "$t" "$rate" <<'PY'
import json, sys
r = json.load(open(sys.argv[1] + "/report.json"))["targets"][sys.argv[2]]
print(f"{sys.argv[2]:22s} median turn {r['latency_median_all']:.3f} s  wall {r['wall_s']:.1f} s"
      f"  (bf16 matmul before: {sys.argv[3]} GFLOP/s)", flush=True)
PY
done
