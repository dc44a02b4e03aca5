"""Graceful shutdown of a real `deltaserve serve` process (server/shutdown.py), SmolLM2-135M fp32.

SIGTERM mid-stream: new requests get 503 with Retry-After while the stream in flight runs to its normal end,
then the process exits 0. With a tiny --shutdown-timeout, a request that would run for minutes is aborted and
the process still exits 0.

Determinism: a request whose body is only half sent sits in its handler, so it is "in flight" for as long as
the test holds it back; the drain cannot end before the test sends the rest, whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import deltaserve

MODEL = "smollm2-135m"
ROOT = Path(deltaserve.__file__).resolve().parent.parent  # this checkout, so the subprocess runs the same code


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def start_server(smollm_dir, tmp_path):
    procs: list[subprocess.Popen] = []

    def start(*extra: str) -> tuple[subprocess.Popen, str]:
        port = _free_port()
        cmd = [sys.executable, "-m", "deltaserve.cli", "serve", "--model", MODEL, "--port", str(port),
               "--dtype", "float32", "--kv-cache-gb", "0.0625", "--speculation", "off", "--stats-interval", "0",
               "--max-context", "4096", "--log-level", "warning", *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        log = open(tmp_path / f"server-{port}.log", "w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300  # model load on a busy 2-core machine
        while True:
            assert proc.poll() is None, (tmp_path / f"server-{port}.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _chat(max_tokens: int, stream: bool) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}


def _hold_request(url: str) -> tuple[socket.socket, bytes]:
    """A chat request with half its body sent: in flight (its handler awaits the rest) until `rest` is sent."""
    body = json.dumps(_chat(2, False)).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    half = len(body) // 2
    sock.sendall(head + body[:half])
    return sock, body[half:]


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _events(lines) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def test_sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0(start_server):
    proc, url = start_server("--shutdown-timeout", "600")
    held, rest = _hold_request(url)
    with httpx.Client(base_url=url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json=_chat(64, True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))  # the stream is under way
            proc.send_signal(signal.SIGTERM)
            # Draining: the socket still accepts, and every new request is refused with a retryable 503.
            with httpx.Client(base_url=url, timeout=30) as other:
                while (h := other.get("/health")).status_code == 200:  # the signal is handled asynchronously
                    time.sleep(0.05)
                assert h.status_code == 503 and h.json()["status"] == "draining"
                assert h.headers["retry-after"] == "1"
                refused = other.post("/v1/chat/completions", json=_chat(2, False))
                assert refused.status_code == 503
                assert refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["code"] == "server_shutting_down"
                assert other.get("/v1/models").status_code == 503
            events = [first.removeprefix("data: ")] + _events(lines)
        # The stream in flight at the signal ran to its normal end.
        assert events[-1] == "[DONE]"
        finishes = [c["choices"][0]["finish_reason"] for c in map(json.loads, events[:-1]) if c["choices"]]
        assert finishes[-1] == "length"
    assert proc.poll() is None  # the held request still keeps the server draining
    held.sendall(rest)
    answer = _read_response(held)
    held.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert proc.wait(timeout=120) == 0


def _running(http: httpx.Client) -> float:
    line = next(x for x in http.get("/metrics").text.splitlines() if x.startswith("deltaserve_running_requests "))
    return float(line.split()[1])


def test_shutdown_timeout_aborts_long_requests_with_a_retryable_503_and_exits_0(start_server):
    proc, url = start_server("--shutdown-timeout", "0.5")
    max_tokens = 4000  # minutes of decoding here; the abort ends them after 0.5 s
    with httpx.Client(base_url=url, timeout=120) as http, ThreadPoolExecutor(1) as pool:
        plain = pool.submit(http.post, "/v1/chat/completions", json=_chat(max_tokens, False))
        while _running(http) < 1:  # the non-streaming request is in the engine before the signal
            time.sleep(0.05)
        with http.stream("POST", "/v1/chat/completions", json=_chat(max_tokens, True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            events = _events(lines)  # ends without a transport error: the stream was closed cleanly
        refused = plain.result()
    # The stream: cut short, then told why in-band (the openai SDK raises on an `error` event), then [DONE].
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "server_shutting_down"
    chunks = [json.loads(e) for e in events[:-2]]
    assert len(chunks) < max_tokens
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks if c["choices"])
    # The non-streaming request: a 503 the client may retry (elsewhere), not a 499 or a 200 with partial text.
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "server_shutting_down"
    assert refused.headers["retry-after"] == "1"
    assert proc.wait(timeout=60) == 0


def test_a_second_signal_aborts_at_once_and_still_exits_0(start_server):
    proc, url = start_server("--shutdown-timeout", "600")
    with httpx.Client(base_url=url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json=_chat(4000, True)) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            while http.get("/health").status_code == 200:  # two signals pending at once would count as one
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            events = _events(lines)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "server_shutting_down"
    assert proc.wait(timeout=60) == 0
