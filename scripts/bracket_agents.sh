#!/bin/bash
# Run `deltaserve bench agents` one target at a time, in the order given, and print each run's median turn (over
# all turns of all agents) and wall, with torch's 2048^3 bf16 matmul rate (the roofline bench's `matmul_rate`) just
# before it: on a VM whose speed moves, alternating targets (e.g. deltaserve-stateful vllm-ngram ...) brackets the
# drift.
#   bash scripts/bracket_agents.sh WORKFLOW TARGET...      e.g. bash scripts/bracket_agents.sh 6 deltaserve-stateful vllm-ngram
# A target may carry environment settings for its run after an @, comma-separated, e.g.
# deltaserve-stateful@DELTASERVE_AMX_SHORT=off (the same tree with and without a switch, bracketed).
set -euo pipefail
W=$1; shift
PY=${PY:-.venv/bin/python}
i=0
for spec in "$@"; do
  i=$((i + 1))
  t=${spec%%@*}
  envs=(); [[ $spec == *@* ]] && IFS=, read -ra envs <<< "${spec#*@}"
  out=bench_out/bracket-w$W-$i-$t
  rate=$("$PY" -c "import torch; torch.set_num_threads(2)
from deltaserve_bench.roofline_bench import matmul_rate
print(int(matmul_rate(torch.bfloat16) / 1e9))")
  env "${envs[@]}" "$PY" -m deltaserve.cli bench agents --workflow "$W" --agents 4 --max-tokens 32 --ignore-eos --seed 0 --targets "$t" \
    --no-progress --out "$out" > "$out.log" 2>&1
  "$PY" - "$out" "$t" "$rate" "${spec#$t}" <<'PY'
import json, sys
r = json.load(open(sys.argv[1] + "/report.json"))["targets"][sys.argv[2]]
print(f"{sys.argv[2] + sys.argv[4]:22s} median turn {r['latency_median_all']:.3f} s  wall {r['wall_s']:.1f} s"
      f"  (bf16 matmul before: {sys.argv[3]} GFLOP/s)", flush=True)
PY
done
