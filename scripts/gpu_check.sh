#!/usr/bin/env bash
# CUDA checks and benchmarks on a lent GPU machine (see docs/perf/*-cuda-*.md for what they gave).
# Stage 1 (`stage1`): install the carried wheels (.whl) to /tmp/site and stash the first half of SmolLM2's
# GGUF (.gpu/a); the carry limit of one call (64 MiB) is below the GGUF's 98 MB, so it travels in two calls.
# Stage 2 (`stage2`): join the halves (.gpu/b), then the real-weight exactness tests with the engines on CUDA
# (DELTASERVE_TEST_DEVICE=cuda; HF references stay on the CPU), the CUDA kernel tests, and the benches.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD DELTASERVE_CACHE=/tmp/dscache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
OUT=${OUT:-/tmp/out}
case "${1:-}" in
stage1)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  mkdir -p /tmp/dscache/models && cp .gpu/a /tmp/gguf.a && cp .gpu/stamp /tmp/gguf.stamp
  nvidia-smi -L; python3 -c "import torch, fastapi, llguidance, openai; print(torch.__version__, torch.cuda.get_device_name())"
  ;;
stage2)
  test -f /tmp/gguf.a || { echo "stage 1 files are gone (a fresh machine)"; exit 3; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  G=/tmp/dscache/models/SmolLM2-135M-Instruct.Q4_1.gguf
  cat /tmp/gguf.a .gpu/b > $G && cp /tmp/gguf.stamp $G.sha256 && sha256sum $G
  DELTASERVE_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider -k "not qwen" \
    tests/test_attention_backends.py tests/test_real_models.py tests/test_engine_sessions.py tests/test_kv_tiers.py tests/test_session_store.py \
    2>&1 | tee $OUT/cuda_tests.log | tail -15
  timeout 90 python3 -m deltaserve.cli bench engine --model smollm2-135m --device cuda --dtypes bfloat16,float32 \
    --prompt-lens 512,2048,8192 2>&1 | grep -v "%|" | tee $OUT/engine_cuda.md | tail -12
  timeout 150 python3 -m deltaserve.cli bench turns --device cuda --agents 4 --turns 35 --gen-tokens 24 \
    --delta-min 70 --delta-max 180 --out $OUT/turns --img-dir $OUT/turns 2>&1 | grep -v "%|" | tee $OUT/turns_cuda.md | tail -25
  ;;
*) echo "usage: $0 stage1|stage2"; exit 2;;
esac
