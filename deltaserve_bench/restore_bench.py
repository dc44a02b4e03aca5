"""`deltaserve bench restore`: bringing a session's KV back versus computing it again, and a restart with saved sessions.

One session of `--context` tokens, then its next turn (one new token, one output token) timed four ways, each the
best of `--repeats`:
  prefill   no cache at all: the whole context is computed (what a server without sessions pays each turn);
  pool      the session's KV is pinned in the pool (the normal stateful turn);
  tier      the KV was evicted to the host-memory tier (`--kv-offload-gb`) and comes back by copy;
  disk      a restarted engine on the session store: the KV is read from the segment files (their pages dropped
            from the OS cache first with posix_fadvise, so the read is a disk read where the OS honours it) and
            restored by copy.
Then `--sessions` sessions of that size are saved and a `deltaserve serve --session-store` process is started
on the store: the time until it is healthy and lists every session.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from deltaserve_bench.common import invoked_command, md_table, report_head
from deltaserve_bench.sections import add_write_argument, publish

_WORDS = ("file path line value status ok error result item id name price total count city date user order "
          "invoice ticket report query index table row column commit branch test passed failed latency").split()


def add_parser(sub) -> None:
    p = sub.add_parser("restore", help="session KV restored from the host tier / the session store vs prefill; restart")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--context", type=int, default=6144, help="tokens in the session")
    p.add_argument("--sessions", type=int, default=16, help="saved sessions for the restart measurement (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--store", default=None, help="store directory (default: a temporary one, removed after)")
    p.add_argument("--seed", type=int, default=0)
    add_write_argument(p, "restore")
    p.set_defaults(func=run)


def _prompt(tok, n: int, rng: random.Random) -> list[int]:
    ids: list[int] = []
    words: list[str] = []
    while len(ids) < n:
        words += [rng.choice(_WORDS) for _ in range(200)]
        ids = tok.encode(" ".join(words))
    return ids[:n]


def _drop_page_cache(root: Path) -> None:
    for f in root.rglob("*.kv"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _turn(eng, prompt: list[int], sid: str | None) -> tuple[float, object]:
    from deltaserve.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    seq = eng.add_request(prompt, SamplingParams(max_tokens=1), session_id=sid, open_session=sid is not None)
    eng.run_until_done([seq])
    return time.perf_counter() - t0, seq


def run(args) -> int:
    from deltaserve.engine.engine import EngineConfig, LLMEngine
    from deltaserve.engine.kv_manager import CacheMode
    from deltaserve.kv.pool import KVLayout
    from deltaserve.models.llama import LlamaModel
    from deltaserve.models.loader import load_config, load_state_dict, model_dir
    from deltaserve.models.registry import ensure_pulled
    from deltaserve.models.tokenizer import Tokenizer

    ensure_pulled(args.model)
    d = model_dir(args.model)
    dtype = getattr(torch, args.dtype)
    model = LlamaModel.from_state_dict(load_config(d), load_state_dict(d), dtype)
    tok = Tokenizer(d)
    cfg = model.cfg
    bpt = KVLayout(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype).bytes_per_token
    rng = random.Random(args.seed)
    store = Path(args.store or tempfile.mkdtemp(prefix="deltaserve-restore-"))
    pool_bytes = bpt * (2 * args.context + 512)  # room for one session and a prefill beside it
    base = dict(dtype=dtype, kv_cache_bytes=pool_bytes, speculation=False, max_batch_tokens=args.max_batch_tokens,
                cache_mode=CacheMode.STATEFUL)

    def engine(**kw) -> LLMEngine:
        return LLMEngine(model, tok, EngineConfig(**{**base, **kw}))

    times: dict[str, list[float]] = {k: [] for k in ("prefill", "pool", "tier", "disk")}
    restored: dict[str, int] = {}
    _turn(engine(cache_mode=CacheMode.STATELESS), _prompt(tok, 256, rng), None)  # warm-up
    for r in range(args.repeats):
        prompt = _prompt(tok, args.context, rng)
        nxt = prompt + [prompt[-1]]
        times["prefill"].append(_turn(engine(cache_mode=CacheMode.STATELESS), prompt, None)[0])
        run_store = store / f"run{r}"
        eng = engine(kv_offload_bytes=2 * bpt * args.context, session_store=str(run_store))
        _turn(eng, prompt, "s")
        assert eng.persistence.store.flush(120)  # its 1st turn's KV is on disk: no write beside the timed turns
        times["pool"].append(_pool_turn(eng, prompt))
        # evict the session to the host tier: unpin it, then evict everything evictable
        eng.kv.sessions.demote_lru(eng.pool.num_slots)
        eng.kv.radix.evict(eng.pool.num_slots)
        dt, seq = _turn(eng, nxt, "s")
        times["tier"].append(dt)
        restored["tier"] = seq.stats.restored_tokens
        assert eng.close(120)
        _drop_page_cache(run_store)
        eng2 = engine(session_store=str(run_store))
        dt, seq = _turn(eng2, nxt, "s")
        times["disk"].append(dt)
        restored["disk"] = seq.stats.restored_tokens
        del eng, eng2

    restart = None
    if args.sessions:
        restart = _restart(args, engine(session_store=str(store / "restart"), kv_cache_bytes=bpt * (args.context + 512)),
                           tok, rng, store / "restart")
    if not args.store:
        shutil.rmtree(store, ignore_errors=True)

    best = {k: min(v) for k, v in times.items()}
    rows = [["prefill (no cache)", f"{best['prefill']:.3f}", "1.0x", 0],
            ["pinned in the pool", f"{best['pool']:.3f}", f"{best['prefill'] / best['pool']:.1f}x", 0],
            ["host-memory tier", f"{best['tier']:.3f}", f"{best['prefill'] / best['tier']:.1f}x", restored["tier"]],
            ["session store (disk)", f"{best['disk']:.3f}", f"{best['prefill'] / best['disk']:.1f}x",
             restored["disk"]]]
    cmd = invoked_command("restore", f"deltaserve bench restore --model {args.model} --context {args.context}")
    body = report_head(f"Session restore: {args.model} {args.dtype}, {args.context}-token session", cmd)
    body += (f"Next turn of a {args.context}-token session (1 new token, 1 output token), best of {args.repeats}; "
             f"KV {bpt * args.context / 1e6:.0f} MB.\n\n")
    body += md_table(["the session's KV", "turn (s)", "vs prefill", "tokens restored"], rows) + "\n\n"
    goals = [f"- host tier ≥ 20x faster than prefill: **{'met' if best['prefill'] >= 20 * best['tier'] else 'NOT met'}**"
             f" ({best['prefill'] / best['tier']:.1f}x)",
             f"- session store ≥ 5x faster than prefill: **{'met' if best['prefill'] >= 5 * best['disk'] else 'NOT met'}**"
             f" ({best['prefill'] / best['disk']:.1f}x)"]
    if restart is not None:
        goals.append(f"- restart with {args.sessions} saved sessions of {args.context} tokens "
                     f"({restart['store_bytes'] / 1e9:.2f} GB on disk): healthy after {restart['healthy_s']:.1f} s, "
                     f"all {restart['listed']} listed after {restart['listed_s']:.1f} s (goal ≤ 10 s: "
                     f"**{'met' if restart['listed_s'] <= 10 and restart['listed'] == args.sessions else 'NOT met'}**)")
    body += "\n".join(goals) + "\n"
    publish(args.write, "restore", body)
    print(json.dumps({"times": times, "restored": restored, "restart": restart}))
    return 0


def _pool_turn(eng, prompt: list[int]) -> float:
    """A turn of the pinned session "s" (then rolled back, so the state is as before)."""
    dt, _ = _turn(eng, prompt + [prompt[-1]], "s")
    eng.sessions.rollback("s", None, 1)
    return dt


def _restart(args, eng, tok, rng: random.Random, root: Path) -> dict:
    for i in range(args.sessions):
        _turn(eng, _prompt(tok, args.context, rng), f"saved-{i}")
    assert eng.close(600)
    nbytes = eng.persistence.store.nbytes
    del eng
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "deltaserve.cli", "serve", "--model", args.model, "--dtype", args.dtype,
           "--port", str(port), "--session-store", str(root), "--log-level", "warning", "--stats-interval", "0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    healthy = listed_s = None
    listed = 0
    try:
        while time.perf_counter() - t0 < 300 and proc.poll() is None:
            try:
                if healthy is None and httpx.get(url + "/health", timeout=2).status_code == 200:
                    healthy = time.perf_counter() - t0
                if healthy is not None:
                    listed = len(httpx.get(url + "/v1/sessions", timeout=10).json()["data"])
                    if listed >= args.sessions:
                        listed_s = time.perf_counter() - t0
                        break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(60)
    return {"healthy_s": healthy or float("nan"), "listed_s": listed_s or float("nan"), "listed": listed,
            "store_bytes": nbytes}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
