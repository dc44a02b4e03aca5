"""Tests for deltaserve.server.grammar with the real Qwen2.5 tokenizer.

The tokenizer is Qwen2.5-Coder-0.5B's (pulled on first use), loaded once per module.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

import jsonschema  # noqa: E402

from deltaserve.server.grammar import GrammarCompiler, GrammarError  # noqa: E402
from deltaserve.server.tool_parser import parse_tool_calls  # noqa: E402

PAD = 64  # logits wider than the tokenizer, as real checkpoints often are


def _qwen_tokenizer():
    """HF fast tokenizer of Qwen2.5-Coder-0.5B from the pulled model (converted once from its GGUF)."""
    from conftest import _model_dir
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_model_dir("qwen2.5-coder-0.5b")))


@pytest.fixture(scope="module")
def tok():
    return _qwen_tokenizer()


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok, vocab_size=len(tok) + PAD)


@pytest.fixture(scope="module")
def closers(tok, compiler):
    """Token ids made only of closing JSON punctuation (to make walks end), plus EOS."""
    ids = [i for s, i in tok.get_vocab().items() if s and set(s) <= set('"}]')]
    return torch.tensor(sorted(ids) + compiler.eos_token_ids)


def random_walk(matcher, closers, seed: int, max_steps: int = 600) -> list[int]:
    """Pick a random allowed token each step until EOS is accepted.

    Uniform over the allowed set, except that with a growing probability a
    closing-punctuation token is preferred when one is allowed, so strings and
    containers end in reasonable time.
    """
    rng = random.Random(seed)
    out: list[int] = []
    for step in range(max_steps):
        mask = matcher.allowed_mask()
        allowed = mask.nonzero().squeeze(1)
        assert len(allowed) > 0, "grammar dead end"
        pref = closers[mask[closers]]
        if len(pref) and rng.random() < min(0.9, 0.2 + step / 150):
            t = int(pref[rng.randrange(len(pref))])
        else:
            t = int(allowed[rng.randrange(len(allowed))])
        assert matcher.accept(t)
        out.append(t)
        if matcher.is_terminated():
            return out
    pytest.fail(f"walk did not terminate in {max_steps} steps")


def _text(compiler, ids: list[int]) -> str:
    """Strict UTF-8 text of ``ids`` without the final EOS."""
    assert ids[-1] in compiler.eos_token_ids
    return compiler.ll_tokenizer.decode_bytes(ids[:-1]).decode("utf-8")


SCHEMAS = {
    "object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "number"},
            "ok": {"type": "boolean"},
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
            "addr": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                     "required": ["zip"], "additionalProperties": False},
            "note": {"type": ["string", "null"]},
        },
        "required": ["name", "age", "color", "addr"],
        "additionalProperties": False,
    },
    "json_mode": {"type": "object"},
    "any_of": {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "boolean"}, "minItems": 1}]},
    "pattern": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"},
    "recursive": {
        "$defs": {"node": {"type": "object", "properties": {
            "v": {"type": "integer"},
            "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
            "required": ["v"], "additionalProperties": False}},
        "$ref": "#/$defs/node",
    },
}

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "unit"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object",
    "properties": {"q": {"type": "string"}, "where": {"$ref": "#/$defs/Where"}},
    "required": ["q", "where"],
    "$defs": {"Where": {"type": "object", "properties": {"site": {"type": "string", "maxLength": 10}},
                        "required": ["site"], "additionalProperties": False}}}}}
NOARGS = {"type": "function", "function": {"name": "now"}}
TOOLS = [WEATHER, SEARCH, NOARGS]
PARAMS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "maxProperties": 0})
          for t in TOOLS}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_walk_is_schema_valid(compiler, closers, name, seed):
    schema = SCHEMAS[name]
    ids = random_walk(compiler.for_json_schema(schema), closers, seed)
    value = json.loads(_text(compiler, ids))
    jsonschema.validate(value, schema)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("required", ["get_weather", "search", "now", None])
def test_tool_call_walk_parses_to_valid_call(compiler, closers, required, seed):
    ids = random_walk(compiler.for_tool_call(TOOLS, required), closers, seed)
    text = _text(compiler, ids)
    assert text.startswith("<tool_call>\n{") and text.endswith("}\n</tool_call>")
    res = parse_tool_calls(text, set(PARAMS))
    assert res.content is None and len(res.tool_calls) == 1
    call = res.tool_calls[0]
    assert call.name == required if required else call.name in PARAMS
    jsonschema.validate(json.loads(call.arguments), PARAMS[call.name])


def test_parallel_tool_calls(compiler, closers, tok):
    m = compiler.for_tool_call(TOOLS, None, parallel=True)
    one = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    ids = tok.encode(one + "\n" + one)
    assert m.accept_many(ids) == len(ids)
    assert m.accept(compiler.eos_token_ids[0]) and m.is_terminated()
    res = parse_tool_calls(_text(compiler, m.accepted_tokens), set(PARAMS))
    assert [c.name for c in res.tool_calls] == ["now", "now"]


def test_known_good_text_is_accepted(compiler, tok):
    m = compiler.for_tool_call(TOOLS, "get_weather")
    ids = tok.encode('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>')
    assert m.accept_many(ids) == len(ids)
    assert m.is_complete() and not m.is_terminated()
    assert m.allowed_mask().nonzero().flatten().tolist() == compiler.eos_token_ids
    assert m.accept(compiler.eos_token_ids[0]) and m.is_terminated()


def test_forbidden_tokens_rejected_and_state_unchanged(compiler, tok):
    m = compiler.for_json_schema(SCHEMAS["object"])
    before = m.allowed_mask()
    eos = compiler.eos_token_ids[0]
    for bad in [tok.encode("hello")[0], tok.encode("[")[0], eos, len(tok), len(tok) + PAD - 1]:
        assert not before[bad]
        assert not m.accept(bad)
        assert m.num_accepted == 0 and torch.equal(m.allowed_mask(), before)
    assert not before[len(tok):].any()  # padding ids are never allowed
    prefix = tok.encode('{"name": "Bo", "age": ')
    assert m.accept_many(prefix) == len(prefix)
    assert not m.accept(tok.encode('"')[0])  # age must be an integer
    assert not m.accept(tok.encode("-")[0])  # ... >= 0
    assert m.accept(tok.encode("4")[0])
    assert not m.accept(eos)  # incomplete: EOS forbidden
    rest = tok.encode("2, \"color\": \"red\", \"addr\": {\"zip\": \"12345\"}}")
    assert m.accept_many(rest) == len(rest)
    assert m.is_complete() and m.accept(eos) and m.is_terminated()
    assert not m.accept(eos) and not m.accept(tok.encode(" ")[0])


def test_rollback_restores_state(compiler, closers):
    m = compiler.for_tool_call(TOOLS, "search")
    ids = random_walk(m, closers, seed=7)
    assert m.is_terminated()
    ref = compiler.for_tool_call(TOOLS, "search")
    masks = []
    for t in ids:
        masks.append(ref.allowed_mask())
        assert ref.accept(t)
    for k in [1, 2, 5, len(ids) // 2, len(ids)]:
        m2 = compiler.for_tool_call(TOOLS, "search")
        assert m2.accept_many(ids) == len(ids)
        m2.rollback(k)
        assert m2.num_accepted == len(ids) - k and not m2.is_terminated()
        assert torch.equal(m2.allowed_mask(), masks[len(ids) - k])
        assert m2.accept_many(ids[len(ids) - k:]) == k and m2.is_terminated()  # replay works
    with pytest.raises(ValueError):
        m.rollback(len(ids) + 1)
    m.reset()
    assert m.num_accepted == 0 and torch.equal(m.allowed_mask(), masks[0])


def test_apply_mask_and_draft_masks(compiler, tok):
    V = compiler.vocab_size
    m = compiler.for_json_schema(SCHEMAS["object"])
    mask = m.allowed_mask()
    assert mask.shape == (V,) and mask.dtype == torch.bool
    logits = torch.randn(V)
    m.apply_mask(logits)
    assert torch.equal(torch.isinf(logits), ~mask)
    batch = torch.randn(3, V + 5)
    m.apply_mask(batch)
    assert torch.isinf(batch[:, V:]).all() and torch.equal(torch.isinf(batch[:, :V]), ~mask.expand(3, V))
    draft = tok.encode('{"name": "x"') + tok.encode("!!")
    rows = m.draft_masks(draft)
    assert rows.shape == (len(draft) + 1, V) and m.num_accepted == 0
    assert torch.equal(rows[0], mask)
    n_ok = len(tok.encode('{"name": "x"'))
    probe = compiler.for_json_schema(SCHEMAS["object"])
    for i in range(n_ok):
        assert torch.equal(rows[i], probe.allowed_mask())
        probe.accept(draft[i])
    assert torch.equal(rows[n_ok], probe.allowed_mask())
    assert rows[n_ok + 2:].all()  # past the invalid draft token: unconstrained
    out = torch.empty(V, dtype=torch.bool)
    m.fill_mask(out)
    assert torch.equal(out, mask)


def test_bad_inputs_raise(compiler):
    with pytest.raises(GrammarError):
        compiler.for_json_schema({"type": "no-such-type"})
    with pytest.raises(GrammarError):
        compiler.for_tool_call(TOOLS, "unknown_fn")
    with pytest.raises(GrammarError):
        compiler.for_tool_call([], None)
    with pytest.raises(GrammarError):
        compiler.for_tool_call(TOOLS, None, style="mistral")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_mask_on_cuda(compiler):
    m = compiler.for_json_schema({"type": "object"})
    logits = torch.randn(2, compiler.vocab_size, device="cuda", dtype=torch.float16)
    m.apply_mask(logits)
    assert torch.equal(torch.isinf(logits).cpu(), ~m.allowed_mask().expand(2, -1))


def _strict_tools() -> list[dict]:
    """get_weather and now marked strict, search not (its arguments: any object)."""
    return [{"type": "function", "function": {**TOOLS[0]["function"], "strict": True}}, TOOLS[1],
            {"type": "function", "function": {**TOOLS[2]["function"], "strict": True}}]


def test_strict_tools_under_auto_allow_text_or_schema_valid_calls(compiler, tok):
    """`strict` tools under tool_choice auto: text and calls in any order, and a call's arguments must follow the
    strict tool's schema; a non-strict tool takes any object."""
    strict = _strict_tools()
    eos = compiler.eos_token_ids[0]

    def run(text: str) -> tuple[int, bool]:
        m = compiler.for_text_or_tool_call(strict)
        ids = tok.encode(text)
        n = m.accept_many(ids)
        return n == len(ids), n == len(ids) and m.accept(eos)

    good = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    assert run("It is sunny in Paris.") == (True, True)
    assert run(good) == (True, True)
    assert run("Let me check.\n" + good) == (True, True)
    assert run(good.replace('"unit": "c"', '"unit": "kelvin"'))[0] is False  # strict: the schema's enum holds
    assert run('{"name": "get_weather", "arguments": {"city": 3}}')[0] is False  # a bare call is constrained too
    other = TOOLS[1]["function"]["name"]
    assert run(f'<tool_call>\n{{"name": "{other}", "arguments": {{"anything": [1, 2]}}}}\n</tool_call>') == (True, True)
    one = compiler.for_text_or_tool_call(strict, parallel=False)
    ids = tok.encode(good + "\n" + good)
    assert one.accept_many(ids) < len(ids)  # parallel_tool_calls false: one call


def test_strict_tools_allow_text_that_holds_no_call(compiler, tok):
    """What Qwen2.5-Coder writes unconstrained in the OpenAI Agents SDK's loops -- its calls, then JSON that
    names no tool (the schema's title) -- is allowed as written, as is any text around calls; text naming a tool
    as a JSON value (`: "get_weather"`, escapes included) outside a call's constrained head is not."""
    strict = _strict_tools()
    eos = compiler.eos_token_ids[0]

    def ok(text: str, parallel: bool = True) -> bool:
        m = compiler.for_text_or_tool_call(strict, parallel)
        ids = tok.encode(text)
        return m.accept_many(ids) == len(ids) and m.accept(eos)

    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
    junk = '{"name": "get_weather_args", "type": "object", "additionalProperties": false}, {"strict": true}}'
    assert ok(call + "\n" + junk)  # the Agents turns (tests/test_frameworks.py), once a loop-forcing grammar
    assert ok(junk)
    assert ok(call + "\n" + call + "\n" + junk + "\n\n")
    assert ok("Sure: " + call + " -- done.")
    assert ok("```js\nif (x) {\n  f({a: 1});\n}\n```\nI used \"get_weather\" for that.")
    assert ok('<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>')  # no tool named: content
    assert ok("") and ok("\n")
    assert ok(call + " and more text", parallel=False)
    assert not ok(call + "\n" + call, parallel=False)
    for bad in ('{"arguments": {"city": "Paris", "unit": "c"}, "name": "get_weather"}',  # heads are canonical
                '{"name": "get\\u005Fweather", "arguments": {"city": 3}}', '{"name":"get_weather"}',
                'call it: {"function": {"name": "get_weather", "arguments": {}}}', 'x: "now"'):
        assert not ok(bad), bad


@pytest.mark.parametrize("seed", range(4))
def test_strict_grammar_accepts_only_outputs_whose_calls_are_valid(compiler, tok, seed):
    """Fuzz: concatenations of calls (valid and not), tags, fences, braces and text; whatever the grammar accepts
    (EOS included), the tool-call parser reads only calls whose arguments follow their strict schemas."""
    strict = _strict_tools()
    names = {t["function"]["name"] for t in TOOLS}
    eos = compiler.eos_token_ids[0]
    w = '"arguments": {"city": "Rome", "unit": "f"}'
    fragments = [
        '{"name": "get_weather", ' + w + '}', '{"name": "get_weather", "arguments": {"city": "Rome"}}',
        '{"name": "get_weather", "arguments": {"city": 7, "unit": "c"}}', '{' + w + ', "name": "get_weather"}',
        '{"name": "get_weather", "arguments": "{\\"city\\": 1}"}', '{"name": "now", "arguments": {}}',
        '{"name": "now", "arguments": {"x": 1}}', '{"name": "now"}', '{"name": "get_weath\\u0065r", ' + w + '}',
        '{"name": "search", "arguments": {"any": [1]}}', '[{"name": "now", "arguments": {"y": 2}}]',
        '{"type": "function", "function": {"name": "now", "arguments": {"z": 0}}}',
        '{"name": "get_weather_args", "type": "object"}', '<tool_call>\n', '\n</tool_call>', '```json\n', '\n```',
        "{", "}", "[", "]", ", ", "\n", " ", "Hello", '"name": ', '"now"', ': "now"', '"get_weather"', "x = {",
    ]
    rng = random.Random(seed)
    accepted = rejected = 0
    for _ in range(120):
        text = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 6)))
        m = compiler.for_text_or_tool_call(strict)
        ids = tok.encode(text)
        if not (m.accept_many(ids) == len(ids) and m.accept(eos)):
            rejected += 1
            continue
        accepted += 1
        for c in parse_tool_calls(text, names).tool_calls:
            if c.name != "search":
                jsonschema.validate(json.loads(c.arguments), PARAMS[c.name])
    assert accepted >= 20 and rejected >= 20, (accepted, rejected)


@pytest.mark.parametrize("name", ['a"b', "a\\b", "a{b", "ünï", "x😀y", "a/b"])
def test_strict_tool_names_that_need_escaping(compiler, tok, name):
    """A call's head spells the name as json.dumps(ensure_ascii=False) does; the name can appear in text only
    where it is not a JSON value, in any escaped spelling."""
    params = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": name, "parameters": params, "strict": True}}]

    def ok(text: str) -> bool:
        m = compiler.for_text_or_tool_call(tools)
        ids = tok.encode(text)
        return m.accept_many(ids) == len(ids) and m.accept(compiler.eos_token_ids[0])

    assert ok(json.dumps({"name": name, "arguments": {"n": 1}}, ensure_ascii=False))
    for ascii_only in (True, False):
        bad = json.dumps({"name": name, "arguments": {"n": "x"}}, ensure_ascii=ascii_only)
        assert parse_tool_calls(bad, {name}).tool_calls and not ok(bad) and not ok("Sure: " + bad)
