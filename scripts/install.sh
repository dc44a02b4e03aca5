#!/usr/bin/env bash
# Create ./.venv and install deltaserve into it (CPU PyTorch). `--bench` adds what `deltaserve bench` needs
# (matplotlib, httpx); `--cluster` adds Ray Serve for `deltaserve cluster`; `--test` adds the test dependencies
# (the bench and cluster ones included, so CI runs tests/test_cluster.py).
# torch is pinned first: an unpinned `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") extra="" ;;
  --bench) extra="[bench]" ;;
  --cluster) extra="[cluster]" ;;
  --test) extra="[test]" ;;
  *) echo "usage: scripts/install.sh [--bench|--cluster|--test]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${DELTASERVE_TORCH:-2.13.0}"
.venv/bin/python -m pip install -q -e ".$extra"
