"""Load and faults, scaled down for CI: many agents at once, bursts, clients vanishing mid-stream, races on one
session, pins expiring mid-workflow -- then the server must be intact.

One run on the live server (SmolLM2-135M, fp32, the engine checking its pool/radix/session invariants after
every step) drives at the same time: agents running multi-turn sessions with the full history resent each turn
(some sleeping past their pin TTL between turns), a burst of one-shot requests, streaming clients that
disconnect at random points, and two requests racing on one session. Afterwards: no status but 200 and the
documented 409 (the race), the engine still serves, no pin survives its TTL, and every agent's next turn equals
plain recompute (greedy) on its exact prompt: no session was lost or corrupted.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
import torch

from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.engine.kv_manager import CacheMode
from deltaserve.engine.sampling import SamplingParams
from deltaserve.server.app import create_app
from deltaserve.server.testing import ServerThread

MODEL = "smollm2-135m"
AGENTS, TURNS, BURST, DISCONNECTS = 6, 4, 16, 8
TTL = 1.0  # seconds a session stays pinned after a turn; the sleepy agents wait longer than that


@pytest.fixture(scope="module")
def engine(smollm_model):
    model, tok = smollm_model
    return LLMEngine(model, tok, EngineConfig(dtype=torch.float32, kv_cache_bytes=64 << 20, check_integrity=True,
                                              session_ttl=TTL, max_batch_tokens=512))


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, MODEL)) as srv:
        yield srv


def chat_body(messages, session_id=None, max_tokens=4, **kw):
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, **kw}
    if session_id is not None:
        body["session_id"] = session_id
    return body


async def agent(http: httpx.AsyncClient, i: int, statuses: list, rng: random.Random) -> list[dict]:
    """One agent's workflow; returns its history (the last reply included)."""
    messages = [{"role": "system", "content": "You are agent %d. Use the tool results." % i},
                {"role": "user", "content": f"Task {i}: summarize the records."}]
    for turn in range(TURNS):
        r = await http.post("/v1/chat/completions", json=chat_body(messages, f"load-{i}"))
        statuses.append(r.status_code)
        assert r.status_code == 200, r.text
        messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
        messages.append({"role": "user", "content": f"Tool result {turn}: " + " ".join(
            rng.choice(["ok", "error", "row", "id=7", "42", "pending"]) for _ in range(rng.randint(5, 30)))})
        await asyncio.sleep(TTL * 1.5 if i % 2 else rng.uniform(0, 0.1))  # odd agents outlive their pins
    return messages


async def one_shot(http: httpx.AsyncClient, k: int, statuses: list) -> None:
    r = await http.post("/v1/chat/completions", json=chat_body([{"role": "user", "content": f"Burst {k}"}], None, 3))
    statuses.append(r.status_code)


async def vanishing(http: httpx.AsyncClient, k: int, rng: random.Random, statuses: list) -> None:
    """A streaming client that stops reading after a few chunks and closes the connection."""
    body = chat_body([{"role": "user", "content": f"Write a long story number {k}."}], f"gone-{k}", 64, stream=True)
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        statuses.append(r.status_code)
        keep = rng.randint(0, 6)
        async for _ in r.aiter_lines():
            keep -= 1
            if keep < 0:
                break  # leaving the block closes the connection mid-stream


async def race(http: httpx.AsyncClient, statuses: list) -> tuple[int, int]:
    """Two turns of one session at once: the second finds it busy (409) while the first generates."""
    first = asyncio.create_task(http.post("/v1/chat/completions", json=chat_body(
        [{"role": "user", "content": "Count slowly to fifty."}], "race", 48)))
    await asyncio.sleep(0.3)
    second = await http.post("/v1/chat/completions", json=chat_body([{"role": "user", "content": "Hi"}], "race", 2))
    codes = ((await first).status_code, second.status_code)
    statuses.extend(codes)
    return codes


def test_load_faults_leave_every_session_intact(server, engine):
    rng = random.Random(0)
    statuses: list[int] = []

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as http:
            jobs = [agent(http, i, statuses, random.Random(i)) for i in range(AGENTS)]
            jobs += [one_shot(http, k, statuses) for k in range(BURST)]
            jobs += [vanishing(http, k, rng, statuses) for k in range(DISCONNECTS)]
            jobs.append(race(http, statuses))
            return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    histories, race_codes = results[:AGENTS], results[-1]
    assert set(statuses) <= {200, 409}, sorted(statuses)
    assert race_codes == (200, 409)

    # Every pin has outlived its TTL now; nothing stays pinned, and the engine still serves.
    time.sleep(TTL * 1.5)
    sessions = httpx.get(server.base_url + "/v1/sessions").json()["data"]
    assert len(sessions) >= AGENTS and all(not s["pinned"] and not s["busy"] for s in sessions), sessions

    # Every agent's next turn equals plain recompute on its exact prompt (greedy, fp32).
    ref = LLMEngine(engine.model, engine.tokenizer, EngineConfig(dtype=torch.float32, kv_cache_bytes=32 << 20,
                                                                 cache_mode=CacheMode.STATELESS, speculation=False))
    for i, messages in enumerate(histories):
        r = httpx.post(server.base_url + "/v1/chat/completions", timeout=120,
                       json=chat_body(messages, f"load-{i}", 6, return_token_ids=True))
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["deltaserve"]["cache"]["cached_tokens"] > 0  # the session's state was still reused
        expect = ref.generate([out["prompt_token_ids"]], SamplingParams(max_tokens=6))[0]
        assert out["choices"][0]["token_ids"] == expect, i
