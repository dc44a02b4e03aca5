"""Crash recovery: a `deltaserve serve --session-store` process killed with SIGKILL mid-workflow, then restarted.

Three agents take turns through the chat API (session_id, full history each turn). A server that never crashes
gives the reference texts. A second server is killed at a random moment right after a turn (while the store's
writer may be mid-write, and with the next turn in flight), restarted on the same store, and the agents go on
(an agent whose turn died retries it). Every session the store listed after the restart continues with its saved
state restored (`cached_tokens` covers it), every output equals the never-crashed run's, and no KV is served
wrong. The kill delay comes from DELTASERVE_CRASH_SEED (printed) so a failure can be replayed.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

import deltaserve

MODEL = "smollm2-135m"
ROOT = Path(deltaserve.__file__).resolve().parent.parent
AGENTS, TURNS = 3, 4
TASKS = ["List three files to inspect.", "Name two risks of the migration.", "Give one test to add."]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, store: Path | None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "deltaserve.cli", "serve", "--model", MODEL, "--port", str(self.port),
               "--dtype", "float32", "--kv-cache-gb", "0.0625", "--speculation", "off", "--stats-interval", "0",
               "--log-level", "warning"] + (["--session-store", str(store)] if store else [])
        self.log = tmp / f"server-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        self.http = httpx.Client(base_url=self.url, timeout=120)

    def turn(self, sid: str, messages: list[dict]) -> dict:
        r = self.http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0, "session_id": sid,
            "return_token_ids": True})
        assert r.status_code == 200, r.text
        return r.json()

    def stop(self, kill: bool = False) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=120)


def _schedule() -> list[tuple[int, int]]:
    """(agent, turn) in interleaved order."""
    return [(a, t) for t in range(TURNS) for a in range(AGENTS)]


def _messages(history: list[dict], agent: int, turn: int) -> list[dict]:
    if turn == 0:
        return [{"role": "user", "content": TASKS[agent]}]
    return history + [{"role": "user", "content": f"Now step {turn + 1}, briefly."}]


def test_sigkill_mid_workflow_then_restart_continues_every_session_exactly(smollm_dir, tmp_path):
    seed = int(os.environ.get("DELTASERVE_CRASH_SEED", random.randrange(1 << 30)))
    print(f"DELTASERVE_CRASH_SEED={seed}")
    rng = random.Random(seed)
    # the never-crashed run
    ref, hist = Server(tmp_path, None), {a: [] for a in range(AGENTS)}
    expected = {}
    for a, t in _schedule():
        msgs = _messages(hist[a], a, t)
        out = ref.turn(f"agent-{a}", msgs)
        expected[(a, t)] = out["choices"][0]["message"]["content"]
        hist[a] = msgs + [{"role": "assistant", "content": expected[(a, t)]}]
    ref.stop()

    store = tmp_path / "store"
    srv, hist = Server(tmp_path, store), {a: [] for a in range(AGENTS)}
    order = _schedule()
    crash_after = rng.randrange(AGENTS, len(order) - 2)  # at least one turn per agent is done first
    done = []
    for i, (a, t) in enumerate(order[: crash_after + 1]):
        msgs = _messages(hist[a], a, t)
        out = srv.turn(f"agent-{a}", msgs)
        assert out["choices"][0]["message"]["content"] == expected[(a, t)]
        hist[a] = msgs + [{"role": "assistant", "content": expected[(a, t)]}]
        done.append((a, t, out["id"]))
    # the next turn in flight, and SIGKILL a random moment later (the store's writer may be mid-write)
    a, t = order[crash_after + 1]
    threading.Thread(target=lambda: _ignore(srv.turn, f"agent-{a}", _messages(hist[a], a, t)), daemon=True).start()
    time.sleep(rng.uniform(0.0, 0.4))
    srv.stop(kill=True)

    srv = Server(tmp_path, store)
    listed = {s["id"]: s for s in srv.http.get("/v1/sessions").json()["data"]}
    assert set(listed) <= {f"agent-{x}" for x in range(AGENTS)}
    first_after = {}
    for a, t in order[crash_after + 1:]:
        msgs = _messages(hist[a], a, t)
        out = srv.turn(f"agent-{a}", msgs)
        got = out["choices"][0]["message"]["content"]
        assert got == expected[(a, t)], (seed, a, t)
        first_after.setdefault(a, out)
        hist[a] = msgs + [{"role": "assistant", "content": got}]
    for a, out in first_after.items():
        saved = listed.get(f"agent-{a}")
        if saved is not None:  # its saved state came back by copy, not by prefill
            cache = out["usage"]["deltaserve"]["cache"]
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] >= saved["tokens"] > 0, (seed, a, cache)
            assert cache["restored_tokens"] > 0 and cache["reason"] in ("restored", "diverged"), (seed, a, cache)
    # most sessions were saved: every agent had finished a turn well before the kill
    assert len(listed) >= AGENTS - 1, (seed, listed.keys())
    # a response id from before the crash still names its state (the store keeps each turn's record)
    a, t, rid = done[0]
    if f"agent-{a}" in listed:
        r = srv.http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "One more thing."}], "max_tokens": 4,
            "temperature": 0, "previous_response_id": rid})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    integrity = srv.http.get("/metrics")
    assert integrity.status_code == 200
    srv.stop()


def _ignore(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # the server is killed under it
        pass
