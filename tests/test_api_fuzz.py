"""Fuzzing the HTTP API from its own OpenAPI schema (schemathesis), against the live server and real weights.

What it proves, for every route in `/openapi.json` (chat, completions, sessions and their stateful links, models,
health, metrics): no request, schema-valid or not, gets a 5xx; every status code and content type a response
carries is documented; schema-violating requests are refused; responses match their documented schemas; `Allow`
lists exactly the methods a path serves. Schema-valid requests may still be refused with a documented 400
(`positive_data_acceptance` is left out): some rules are not schema-shaped (a tool_choice naming a tool that is
not in `tools`, a delta turn before the session's first turn), and those answer 400 with the parameter named.

The schema's `model` is fixed to the served name before the run, so the fuzzer reaches generation instead of
stopping at a 404, and the engine's context is 48 tokens, so that every generation is short and the run stays a
few minutes on 2 CPU cores. The engine checks its own integrity every step (`check_integrity=True`), so a request that corrupts
the pool, the radix tree or a session fails the run too.

The longer run (documented in docs/API.md, "Fuzzing"): `FUZZ_EXAMPLES=50 pytest -s tests/test_api_fuzz.py -k every`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest
import torch

from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.server.app import create_app
from deltaserve.server.testing import ServerThread

MODEL = "smollm2-135m"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "8"))


def fuzz_schema(schema: dict) -> dict:
    """`schema` with every request's `model` fixed to the served name (mutates)."""

    def walk(node):
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                for name in props:
                    if name == "model":
                        nullable = {"type": "null"} in props[name].get("anyOf", [])
                        fixed = {"type": "string", "enum": [MODEL]}
                        props[name] = {"anyOf": [fixed, {"type": "null"}]} if nullable else fixed
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def engine(smollm_model):
    model, tok = smollm_model
    # A 48-token context bounds every generation (a request without max_tokens runs to the context's end)
    # and makes long fuzzed prompts the documented 400, so a case costs well under a second.
    return LLMEngine(model, tok, EngineConfig(dtype=torch.float32, kv_cache_bytes=64 << 20, check_integrity=True,
                                              session_ttl=5.0, max_context=48))


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, MODEL)) as srv:
        yield srv


def _st() -> str:
    exe = shutil.which("st", path=os.path.dirname(sys.executable)) or shutil.which("st")
    if exe is None:
        pytest.fail("schemathesis is not installed: pip install 'deltaserve[test]'")
    return exe


def test_schema_patch_fixes_the_model_only():
    optional = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    s = fuzz_schema({"components": {"schemas": {"R": {"properties": {"model": {"type": "string"},
                                                                     "n": {"type": "integer"}}},
                                                "D": {"properties": {"model": optional}}}}})
    props = s["components"]["schemas"]["R"]["properties"]
    assert props == {"model": {"type": "string", "enum": [MODEL]}, "n": {"type": "integer"}}
    fixed = {"type": "string", "enum": [MODEL]}
    assert s["components"]["schemas"]["D"]["properties"]["model"] == {"anyOf": [fixed, {"type": "null"}]}


def test_fuzz_every_route(server, engine, tmp_path):
    schema = fuzz_schema(httpx.get(server.base_url + "/openapi.json").json())
    path = tmp_path / "openapi.json"
    path.write_text(json.dumps(schema))
    cmd = [_st(), "run", str(path), "--url", server.base_url, "--checks", "all",
           "--exclude-checks", "positive_data_acceptance", "--max-examples", str(EXAMPLES), "--seed", "1",
           "--workers", "1", "--request-timeout", "60", "--suppress-health-check", "all", "--no-color"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    report = run.stdout + run.stderr
    print(report[-2500:])  # the summary (cases generated, phases), shown with -s
    assert run.returncode == 0, report[-12000:]
    # Nothing it sent may have left the engine inconsistent, and it must still serve.
    assert httpx.get(server.base_url + "/health").json()["status"] == "ok"
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
