"""Schema drafts (spec/schema_drafts.py, spec/call_text.py, spec/call_shapes.py): what they predict, the exact
tokens they propose, and that speculation with them stays lossless.

* `ToolDrafts.from_tools` and the text predictor on hand-written partial calls (compact, pretty, fenced,
  bare), including the cases where nothing may be predicted; nested objects and arrays (shapes, depth cap,
  every cut of a compact and a pretty call, text that leaves the prediction inside a nested value);
* `SchemaDrafter.propose` with the Qwen2.5 tokenizer: the exact ids for a generated suffix, none when the
  generated tokens are not how the text tokenizes, none past a BPE merge the prediction cannot know;
* the engine on Qwen2.5-Coder-0.5B (fp32): a first tool call copying a record (also one with nested
  arguments) decodes to the same tokens with schema drafts as without speculation (acceptance reported and
  high), and also when every schema draft is wrong, when drafts run past stop tokens / into max_tokens, and
  when a stop string cuts the text;
* a tiny random model (fast): identity while every draft position is rejected.
"""

from __future__ import annotations

import json

import pytest
import torch

from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.engine.kv_manager import CacheMode
from deltaserve.engine.sampling import SamplingParams
from deltaserve.engine.textstream import TextStream
from deltaserve.spec import schema_drafts
from deltaserve.spec.call_shapes import MAX_DEPTH
from deltaserve.spec.call_text import CallContext, CallPredictor, ParamShape, ToolShape
from deltaserve.spec.schema_drafts import SchemaDrafter, ToolDrafts

S = {"type": "string"}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.", "parameters": {
        "type": "object", "properties": {"city": S, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                                         "days": {"type": "integer"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time.", "parameters": {
        "type": "object", "properties": {"zone": S}, "required": ["zone"]}}},
]
CONTEXT = 'Record: {"city": "Paris", "days": 3, "ref": "ORD-2231", "ref2": "ORD-2299"}'
T = "<tool_call>\n"


# ------------------------------------------------------------------ shapes
def test_from_tools_shapes():
    d = ToolDrafts.from_tools(TOOLS + [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {}, "b": {"type": ["string", "null"]}, "c": {"enum": ["x", "y"]}}}}}])
    assert d.tools[0] == ToolShape("get_weather", (ParamShape("city", True), ParamShape("unit", True, ("celsius", "fahrenheit")),
                                                   ParamShape("days", False)))
    assert d.tools[2].params == (ParamShape("a", None), ParamShape("b", None), ParamShape("c", True, ("x", "y")))
    assert ToolDrafts.from_tools(None) is None and ToolDrafts.from_tools([{"type": "function"}]) is None
    hash(d)  # immutable all the way down: safe to share across threads


# --------------------------------------------------------------- predictor
@pytest.mark.parametrize("text,expected", [
    ("<tool", '_call>\n{"name": "get_'),  # two tools share `get_`: their common prefix only
    (T + '{"name": "', "get_"),
    (T + '{"name": "get_w', 'eather", "arguments": {"city": "Paris", "unit": "'),  # key-matched value, enum open
    (T + '{"name": "get_weather", "arguments": {"city": "Pa', 'ris", "unit": "'),
    (T + '{"name": "get_weather", "arguments": {"city": "Lyon', ""),  # nothing in the context starts so
    (T + '{"name": "get_weather", "arguments": {"city": "Lyon"', ', "unit": "'),
    (T + '{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "f', 'ahrenheit", "days": 3}}\n</tool_call>'),
    (T + '{"name": "get_weather", "arguments": {"city": "Lyon", "days": 3', "}}\n</tool_call>"),
    (T + '{"name": "get_weather", "arguments": {"u', 'nit": "'),  # a key prefix picks the key
    (T + '{"name": "get_time", "arguments": {"zone": "ORD-22', ""),  # two strings: 2231 / 2299
    (T + '{"name": "get_time", "arguments": {"zone": "ORD-223', '1"}}\n</tool_call>'),
    (T + '{"name": "get_time", "arguments": {}', "}\n</tool_call>"),
    (T + '{"name": "get_time", "arguments": {"zone": "x"}}\n</tool_call>', ""),  # call complete
    (T + '{"name": "nope", ', ""),  # unknown tool
    (T + '{"name": "get_time", "arguments": {"zone": {"', ""),  # nested value
])
def test_predictor_tagged_compact(text, expected):
    assert CallPredictor(ToolDrafts.from_tools(TOOLS), CallContext(CONTEXT)).continuation(text) == expected


@pytest.mark.parametrize("text,expected", [
    ('```json\n{\n  "name": "get_t', 'ime",\n  "arguments": {\n    "zone": "'),
    ('```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Lyon"', ',\n    "unit": "'),
    ('```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "Lyon",\n    "days": 3', "\n  }\n}\n```"),
    ('```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "days": 3\n  }', "\n}\n```"),
    ("```json\n{\n ", ""),  # the indent is not known until it ends
])
def test_predictor_pretty_fenced(text, expected):
    p = CallPredictor(ToolDrafts.from_tools(TOOLS), CallContext(CONTEXT))
    assert p.continuation(text, "```json\n", "\n```") == expected


def test_predictor_bare_and_context_values():
    p = CallPredictor(ToolDrafts.from_tools(TOOLS), CallContext(CONTEXT))
    assert p.continuation('{"name": "get_time"', "", "") == ', "arguments": {"zone": "'
    assert p.continuation('{"name": "get_time", "arguments": {"zone": "x"}', "", "") == "}"
    # A schema's `"city": {"type": ...` is no value; the record's later/earlier scalar is.
    ctx = CallContext('{"city": "Oslo"} tools: {"city": {"type": "string"}}')
    assert ctx.value_of("city") == ("Oslo", True)
    assert CallContext('"days": 12, "x": 1').value_of("days") == ("12", False)


# ----------------------------------------------------------- nested values
I = {"type": "integer"}
SHIP = [{"type": "function", "function": {"name": "create_shipment", "parameters": {"type": "object", "properties": {
    "order_id": S,
    "address": {"type": "object", "properties": {"street": S, "city": S, "geo": {
        "type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}}}}},
    "items": {"type": "array", "items": {"type": "object", "properties": {"sku": S, "qty": I}}},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["fragile", "express"]}},
    "notes": {"type": "array", "items": S},
    "priority": {"type": "string", "enum": ["low", "high"]}}}}}]
# The prompt holds the tool's schema too: `"address": {"type": "object", ...` must not be copied as a value.
SHIP_CONTEXT = ('tools: {"address": {"type": "object", "properties": {"street": {"type": "string"}}}}\nRecord: '
                '{"order_id": "ORD-77", "street": "1 Main St", "city": "Lyon", "lat": 45.7, "lon": 4.8, '
                '"notes": ["ring twice", "back door"], "sku": "A-1", "qty": 2}')
SHIP_CALL = {"name": "create_shipment", "arguments": {
    "order_id": "ORD-77", "address": {"street": "1 Main St", "city": "Lyon", "geo": {"lat": 45.7, "lon": 4.8}},
    "items": [{"sku": "A-1", "qty": 2}], "tags": ["fragile"], "notes": ["ring twice", "back door"],
    "priority": "high"}}
A = T + '{"name": "create_shipment", "arguments": {'
ADDR = A + '"order_id": "X", "address": {"street": "1 Main St", "city": "Lyon", "geo": {"lat": 45.7, "lon": 4.8}}'


def _ship() -> CallPredictor:
    return CallPredictor(ToolDrafts.from_tools(SHIP), CallContext(SHIP_CONTEXT))


def test_from_tools_nested_shapes():
    d = ToolDrafts.from_tools(SHIP)
    addr = d.tools[0].params[1]
    assert addr.name == "address" and addr.string is False and addr.items is None
    assert [p.name for p in addr.props] == ["street", "city", "geo"]  # schema order
    assert addr.props[2].props == (ParamShape("lat", False), ParamShape("lon", False))
    items = d.tools[0].params[2]
    assert items.props is None and items.items.name == "" and [p.name for p in items.items.props] == ["sku", "qty"]
    assert d.tools[0].params[3].items == ParamShape("", True, ("fragile", "express"))
    hash(d)
    # No properties / no items: unknown inside. Nesting deeper than MAX_DEPTH: kept, but unknown inside.
    deep: dict = {"type": "string"}
    for _ in range(6):
        deep = {"type": "object", "properties": {"k": deep}}
    d = ToolDrafts.from_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
        "properties": {"o": {"type": "object"}, "a": {"type": "array"}, "deep": deep}}}}])
    o, a, shape = d.tools[0].params
    assert o == ParamShape("o", False) and a == ParamShape("a", False)
    levels = 0
    while shape.props is not None:
        shape, levels = shape.props[0], levels + 1
    assert levels == MAX_DEPTH and shape == ParamShape("k", False)  # the object at the cut: no props


@pytest.mark.parametrize("text,expected", [
    # The whole call from the start: the key-matched scalars inside the object, its close after its last key,
    # the array's `[` and its first item (an object, closed after its last key); then nothing (`, ` or `]`?).
    (A, '"order_id": "ORD-77", "address": {"street": "1 Main St", "city": "Lyon", "geo": {"lat": 45.7, "lon": 4.8}}, '
        '"items": [{"sku": "A-1", "qty": 2}'),
    (A + '"order_id": "X", "address": {"ci', 'ty": "Lyon", "geo": {"lat": 45.7, "lon": 4.8}}, "items": [{"sku": "A-1", '
                                             '"qty": 2}'),  # a key prefix picks the key inside the object
    (ADDR[:-2], "}}, " + '"items": [{"sku": "A-1", "qty": 2}'),  # inside a number: the context's value
    (ADDR[:-1], '}, "items": [{"sku": "A-1", "qty": 2}'),
    (ADDR + ', "items": [{"sku": "A-1", "qty": 2}', ""),  # an array's close is not certain after an item
    (ADDR + ', "items": [{"sku": "A-1", "qty": 2}]', ', "tags": ["'),  # two enum values: only the quote
    (ADDR + ', "items": [], "tags": ["f', 'ragile"'),
    (ADDR + ', "items": [], "tags": ["fragile", "', ""),  # either enum value could follow
    (ADDR + ', "items": [], "tags": ["fragile", "e', 'xpress"'),
    # The context holds `"notes": [...]` (a list of strings, as the schema says): copied to its end, the
    # separators and the `]` with it, and on past the array.
    (ADDR + ', "items": [], "tags": [], "notes": ', '["ring twice", "back door"], "priority": "'),
    (ADDR + ', "items": [], "tags": [], "notes": ["ring', ' twice", "back door"], "priority": "'),
    (ADDR + ', "items": [], "tags": [], "notes": ["x"', ""),  # off the context's array: not certain
    (ADDR + ', "items": [], "tags": [], "notes": ["x"], "priority": "h', 'igh"}}\n</tool_call>'),
    (ADDR + ', "items": [], "tags": [], "notes": [], "priority": "low"}', "}\n</tool_call>"),
])
def test_predictor_nested_compact(text, expected):
    assert _ship().continuation(text) == expected


@pytest.mark.parametrize("text", [
    A + '"order_id": "X", "address": {"street": "2 ',  # off the context's value inside the object
    A + '"order_id": "X", "address": {"street": "1 Main St", "city": "Lyon", "geo": {"lat": 12',  # a number
    A + '"order_id": "X", "address": {"zip',  # no such key in the nested schema
    A + '"order_id": "X", "address": {"street": "1 Main St", "city": "Lyon", "geo": {"lat": 45.7, "alt',
    A + '"order_id": "X", "address": ["',  # an array where the schema says object
    A + '"order_id": "X", "address": {"street": {"',  # an object where the schema says string
    ADDR + ', "items": [{"sku": "A-1", "qty": 2}, {"sku": "A-1", "qty": 2}',  # after any item
    ADDR + ', "items": [{"sku": "A-1", "qty": 2} ',  # whitespace after an item: `]` or `,`, unknown
    A + '"order_id": "X", "address": {"street": "1 Main St"}, "items": [{"sku": "B-',  # no such string
])
def test_predictor_nested_divergence_predicts_nothing(text):
    assert _ship().continuation(text) == ""


def test_predictor_nested_divergence_no_wrong_text():
    """The model leaves the prediction inside nested values (its own street, an sku the context lacks): the
    guess at each value's start is the only text off what it writes; inside the diverged value nothing is
    predicted, and after it the certain rest (keys, copied values, closes) is right again."""
    truth = A + ('"order_id": "ORD-77", "address": {"street": "2 Rue Neuve", "city": "Lyon", "geo": {"lat": 45.7, '
                 '"lon": 4.8}}, "items": [{"sku": "B-9", "qty": 2}], "tags": ["fragile"], '
                 '"notes": ["ring twice", "back door"], "priority": "high"}}\n</tool_call>')
    p = _ship()
    misses = set()  # where in the truth a prediction's first wrong character lands
    for cut in range(len(A), len(truth)):
        c = p.continuation(truth[:cut])
        k = next((j for j, (x, y) in enumerate(zip(c, truth[cut:])) if x != y), len(c))
        if k < len(c):
            misses.add(cut + k)
        if truth.index("2 Rue") < cut < truth.index('", "city"') or truth.index("B-9") < cut < truth.index("B-9") + 3:
            assert c == "", truth[:cut]  # inside a value off the context: nothing
    assert misses == {truth.index("2 Rue"), truth.index("B-9")}  # the two values' starts: the copies guessed


def test_predictor_nested_pretty_every_cut():
    """A pretty-printed call (json.dumps indent=2, fenced), whole values copied re-rendered in that style:
    at every cut after the style is known, the prediction is a prefix of the rest and the cut's end follows
    certainly where it should."""
    body = json.dumps(SHIP_CALL, indent=2)
    p = _ship()
    for cut in range(4, len(body)):
        c = p.continuation("```json\n" + body[:cut], "```json\n", "\n```")
        assert (body[cut:] + "\n```").startswith(c), (body[:cut][-30:], c)
    at = body.index('"address"')
    assert p.continuation("```json\n" + body[:at], "```json\n", "\n```") == (
        '"address": {\n      "street": "1 Main St",\n      "city": "Lyon",\n      "geo": {\n        "lat": 45.7,\n'
        '        "lon": 4.8\n      }\n    },\n    "items": [\n      {\n        "sku": "A-1",\n        "qty": 2\n      }')
    at = body.index('"ring') + 2
    assert p.continuation("```json\n" + body[:at], "```json\n", "\n```") == (
        'ing twice",\n      "back door"\n    ],\n    "priority": "')


def test_context_nested_value_of_conforms():
    ctx = CallContext(SHIP_CONTEXT + ' "address": {"street": "9 Quai", "zip": "1"} "address": {"street": "8 Quai"}')
    addr, notes = ToolDrafts.from_tools(SHIP).tools[0].params[1], ToolDrafts.from_tools(SHIP).tools[0].params[4]
    # the latest one whose keys are all the schema's (`zip` is not; the schema text's `type` is not)
    assert ctx.nested_value_of(addr) == '{"street": "8 Quai"}'
    assert CallContext(SHIP_CONTEXT).nested_value_of(addr) is None
    assert CallContext(SHIP_CONTEXT).nested_value_of(notes) == '["ring twice", "back door"]'
    assert CallContext('"notes": [1, 2]').nested_value_of(notes) is None  # items must be strings
    assert CallContext('"notes": ["a",\n "b"]').nested_value_of(notes) is None  # one line only


# ------------------------------------------------------------- token drafts
@pytest.fixture(scope="module")
def qwen_tok(qwen_dir):
    from deltaserve.models.tokenizer import Tokenizer

    return Tokenizer(qwen_dir)


def test_propose_exact_ids(qwen_tok):
    tok = qwen_tok
    prompt = tok.encode(CONTEXT)
    full = tok.encode(T + '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3}}\n'
                      '</tool_call>')
    d = SchemaDrafter(ToolDrafts.from_tools(TOOLS), tok, prompt)
    # After `<tool_call>` the two tools' common prefix `get_` ends mid-token (`get`,`_weather`): only `get`.
    names = tok.encode(T + '{"name": "get')
    assert d.propose(full[:1], 8) == names[1:]
    # One token into the name: the name, the frame, the key and the record's city, then the open enum.
    at = len(tok.encode(T + '{"name": "get_weather'))
    assert full[:at] == tok.encode(T + '{"name": "get_weather')
    want = tok.encode(T + '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "')
    assert d.propose(full[:at], 8) == want[at:at + 8]
    assert d.propose(full[:at], 3) == want[at:at + 3]
    # Inside the enum value: its rest, the next key in schema order with the record's value, the close and
    # the tag: to the end of the call.
    c = full.index(tok.encode("c")[0], at)  # `c`,`elsius`
    assert len(full[c + 1:]) == 9
    assert d.propose(full[:c + 1], 8) == full[c + 1:c + 9]
    assert d.propose(full[:c + 2], 8) == full[c + 2:]
    # A call that leaves the optional `days` out diverges there: the draft says `days`, the model `}}`.
    alt = tok.encode(T + '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>')
    draft = d.propose(full[:c + 1], 8)
    assert draft[0] == alt[c + 1] and draft[1] != alt[c + 2]
    assert d.propose(full, 8) == []  # the call is complete
    assert d.propose(full[:c + 1], 0) == []


def test_propose_nothing_outside_a_call_or_off_tokenization(qwen_tok):
    tok = qwen_tok
    d = SchemaDrafter(ToolDrafts.from_tools(TOOLS), tok, tok.encode(CONTEXT))
    assert d.propose(tok.encode("The weather in Paris is"), 8) == []
    # `get_weather` generated as `get`,`_`,`weather`: not how the text tokenizes, so no draft follows.
    odd = tok.encode(T + '{"name": "get') + tok.encode("_") + tok.encode("weather")
    assert tok.decode(odd, False) == T + '{"name": "get_weather'
    d2 = SchemaDrafter(ToolDrafts.from_tools(TOOLS), tok, tok.encode(CONTEXT))
    assert d2.propose(odd, 8) == []


def test_propose_bare_call_from_output_start(qwen_tok):
    tok = qwen_tok
    d = SchemaDrafter(ToolDrafts.from_tools(TOOLS), tok, tok.encode(CONTEXT))
    out = tok.encode('{"name": "get_time", "arguments": {"zone": "ORD-223')
    assert tok.decode(d.propose(out, 8)) == '1"}}'  # a bare call ends at its closing braces


def test_propose_nested_exact_ids_and_divergence(qwen_tok):
    tok = qwen_tok
    full = tok.encode(T + json.dumps(SHIP_CALL) + "\n</tool_call>")

    def drafter():
        return SchemaDrafter(ToolDrafts.from_tools(SHIP), tok, tok.encode(SHIP_CONTEXT))

    def cut_after(s: str) -> int:  # tokens of the call up to the token that ends at the end of `s`
        n = next(i for i in range(len(full)) if tok.decode(full[:i]).endswith(s))
        assert tok.decode(full[:n]).endswith(s)
        return n

    d = drafter()
    # Inside the address object: the rest of its keys and the record's values, exactly the call's tokens.
    at = cut_after('"address": {"')
    assert d.propose(full[:at], 8) == full[at:at + 8]
    assert tok.decode(full[at:at + 8]) == 'street": "1 Main St", "'
    # Inside the array's first item: to its `}` and no further (`}],` is one token: the `}` is not drafted,
    # as it would merge with the `],` that the model writes and the schema cannot know).
    at = cut_after('"qty": ')
    assert tok.decode(full[at:at + 2]) == "2}],"
    assert d.propose(full[:at], 8) == full[at:at + 1]
    # The model's own street: off the record's value inside the nested object, nothing is drafted.
    head = T + '{"name": "create_shipment", "arguments": {"order_id": "ORD-77", "address": {"street": "'
    off = tok.encode(head + "2 Ru")
    d = drafter()
    assert tok.decode(off).endswith('"2 Ru') and d.propose(off, 8) == []
    # and back on the schema after it: the next key and its value from the record.
    on = tok.encode(head + '2 Rue Neuve", "')
    assert tok.decode(d.propose(on, 8)) == 'city": "Lyon", "geo'


# ------------------------------------------------------------ engine: Qwen
# Two of the bench's first-call requests (deltaserve_bench/spec_first_call.py): in fp32 the model answers the
# pickup (1) with a fenced pretty-printed call and the meeting (2) with a bare compact one, both copying the record.
CASES = (1, 2)


@pytest.fixture(scope="module")
def qwen(qwen_dir, qwen_tok):
    from deltaserve.models.llama import LlamaModel
    from deltaserve.models.loader import load_config, load_state_dict

    return LlamaModel.from_state_dict(load_config(qwen_dir), load_state_dict(qwen_dir), torch.float32), qwen_tok


def _engine(model_tok, speculation: bool) -> LLMEngine:
    model, tok = model_tok
    return LLMEngine(model, tok, EngineConfig(dtype=torch.float32, kv_cache_bytes=128 << 20, check_integrity=True,
                                              speculation=speculation, cache_mode=CacheMode.STATELESS))


def _request(tok, case: int):
    from deltaserve_bench.spec_first_call import prompts

    return prompts(tok)[case]


def _run(eng: LLMEngine, req, max_tokens: int, drafts: bool = True, stop_token_ids=()):
    prompt, tools = req
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=list(stop_token_ids),
                            tool_drafts=ToolDrafts.from_tools(tools) if drafts else None)
    seq = eng.add_request(prompt, params)
    eng.run_until_done([seq])
    return seq


@pytest.fixture(scope="module")
def plain(qwen):
    eng = _engine(qwen, False)
    out = {}
    for case in CASES:
        seq = _run(eng, _request(qwen[1], case), 128)
        out[case] = seq.output_ids, seq.finish_reason
    return out


@pytest.mark.parametrize("case", CASES)
def test_first_call_identical_and_mostly_accepted(qwen, plain, case):
    ref, reason = plain[case]
    tok = qwen[1]
    assert reason == "stop" and tok.decode(ref).count('": "') >= 4  # a whole call, copying the record
    eng = _engine(qwen, True)
    seq = _run(eng, _request(tok, case), 128)
    assert seq.output_ids == ref and seq.finish_reason == reason
    sp = eng.speculator
    assert sp.schema_drafted > 0
    assert sp.schema_accepted / sp.schema_drafted > 0.6, (sp.schema_accepted, sp.schema_drafted)
    # Fewer verify steps than tokens by a wide margin: that is the speed-up.
    assert seq.stats.verify_steps < 0.5 * len(ref)


@pytest.mark.parametrize("case", CASES)
def test_schema_drafts_rejected_at_every_position(qwen, plain, monkeypatch, case):
    ref, _ = plain[case]
    # Every prediction is text no call contains: drafted, never accepted (the first 40 tokens: the frame,
    # the name and the first values, where real drafts would be accepted).
    monkeypatch.setattr(CallPredictor, "continuation", lambda self, text, *a: "~~~~~~~~ zzzz qqqq ~~~~")
    eng = _engine(qwen, True)
    seq = _run(eng, _request(qwen[1], case), 40)
    assert seq.output_ids == ref[:40] and seq.finish_reason == "length"
    assert eng.speculator.schema_drafted > 0 and eng.speculator.schema_accepted == 0


@pytest.mark.parametrize("cut", [5, 17, 40])
def test_schema_drafts_into_max_tokens(qwen, plain, cut):
    ref, _ = plain[1]
    assert len(ref) > cut
    seq = _run(_engine(qwen, True), _request(qwen[1], 1), cut)
    assert seq.output_ids == ref[:cut] and seq.finish_reason == "length"


def test_schema_drafts_past_stop_tokens(qwen, plain):
    """A stop token in the middle of the call: the drafts run past it."""
    ref, _ = plain[2]
    stop = ref[len(ref) // 2]
    want = ref[:ref.index(stop) + 1]
    seq = _run(_engine(qwen, True), _request(qwen[1], 2), 128, stop_token_ids=[stop])
    assert seq.output_ids == want and seq.finish_reason == "stop"


def test_schema_drafts_with_stop_string(qwen, plain):
    """The server cuts text at a stop string (TextStream); the text with schema drafts is the same."""
    ref, _ = plain[1]
    tok = qwen[1]
    stop = '"2024-12-18"'

    def text(ids):
        ts = TextStream(tok, [stop])
        return ts.push(ids) + ts.finish()

    assert stop in tok.decode(ref)
    seq = _run(_engine(qwen, True), _request(tok, 1), 128)
    assert text(seq.output_ids) == text(ref) and stop not in text(ref) and len(text(ref)) > 40


NESTED = 6  # the bench's request whose arguments nest (objects, an array of objects)


def test_nested_first_call_identical(qwen):
    """A first call with nested arguments: the same tokens with schema drafts as without speculation, and
    drafts inside the nested values were proposed and accepted."""
    tok = qwen[1]
    ref = _run(_engine(qwen, False), _request(tok, NESTED), 240)
    assert ref.finish_reason == "stop" and '"address": {' in tok.decode(ref.output_ids), tok.decode(ref.output_ids)
    eng = _engine(qwen, True)
    seq = _run(eng, _request(tok, NESTED), 240)
    assert seq.output_ids == ref.output_ids and seq.finish_reason == ref.finish_reason
    sp = eng.speculator
    assert sp.schema_drafted > 0 and sp.schema_accepted / sp.schema_drafted > 0.5, (sp.schema_accepted, sp.schema_drafted)


# ------------------------------------------------------- engine: tiny model
class _ByteTokenizer:
    """Latin-1 bytes as token ids (256 = end; every byte string round-trips): a 257-token model's tokenizer."""

    stop_token_ids = frozenset({256})
    eos_token_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("latin-1"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("latin-1")


def _tiny():
    import transformers

    from deltaserve.config import ModelConfig
    from deltaserve.models.llama import LlamaModel

    cfg = ModelConfig(arch="qwen2", vocab_size=257, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6, max_position=512,
                      tie_word_embeddings=False, qkv_bias=True)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg.to_hf()),
                                                       dtype=torch.float32)
    return LlamaModel.from_state_dict(cfg, hf.state_dict(), torch.float32), _ByteTokenizer()


def test_tiny_random_model_identity_with_schema_drafts(monkeypatch):
    model, tok = _tiny()
    # A random model writes no call: treat its whole output as one and predict a call's frame at every
    # step, so the drafter proposes throughout and the random target rejects (nearly) all of it.
    monkeypatch.setattr(SchemaDrafter, "_find_call", lambda self, out: (0, "", "") if out else None)
    monkeypatch.setattr(CallPredictor, "continuation", lambda self, text, *a: '", "arguments": {"city": "Paris"}}')
    prompt = tok.encode('Record: {"city": "Paris"} Call get_weather.')
    outs = []
    for spec in (False, True):
        eng = LLMEngine(model, tok, EngineConfig(dtype=torch.float32, kv_cache_bytes=16 << 20, check_integrity=True,
                                                 speculation=spec, cache_mode=CacheMode.STATELESS))
        seqs = [eng.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True,
                                                       tool_drafts=ToolDrafts.from_tools(TOOLS))) for n in (7, 40)]
        eng.run_until_done(seqs)
        outs.append([s.output_ids for s in seqs])
        if spec:
            assert eng.speculator.schema_drafted > 0
    assert outs[0] == outs[1]
    assert [len(o) for o in outs[1]] == [7, 40]


def test_drafter_failure_falls_back_to_plain_speculation(monkeypatch):
    """A bug in the drafter costs its drafts, never the request."""
    calls = []

    def boom(self, output, k):
        calls.append(k)
        raise RuntimeError("drafter bug")

    monkeypatch.setattr(SchemaDrafter, "propose", boom)
    model, tok = _tiny()
    prompt = tok.encode("Record: x")
    outs = []
    for spec in (False, True):
        eng = LLMEngine(model, tok, EngineConfig(dtype=torch.float32, kv_cache_bytes=16 << 20, speculation=spec,
                                                 cache_mode=CacheMode.STATELESS))
        seq = eng.add_request(prompt, SamplingParams(max_tokens=12, ignore_eos=True, tool_drafts=ToolDrafts.from_tools(TOOLS)))
        eng.run_until_done([seq])
        outs.append(seq.output_ids)
    assert outs[0] == outs[1] and len(outs[1]) == 12
    assert len(calls) == 1  # tried once, then that request drafts from its history only


def test_module_constants_agree_with_the_parser():
    from deltaserve.server import tool_parser

    assert schema_drafts.CALL_OPEN == tool_parser.TOOL_CALL_OPEN and schema_drafts.CALL_CLOSE == tool_parser.TOOL_CALL_CLOSE


def test_chat_plan_passes_the_tools_shown_to_the_model():
    from deltaserve.server.chat_plan import ChatPlan

    plan = ChatPlan([], [1], "full", None, False, TOOLS, TOOLS, {"get_weather", "get_time"})
    assert plan.tool_drafts() == ToolDrafts.from_tools(TOOLS)
    # tool_choice "none": the tools are not shown, so no call is drafted either
    assert ChatPlan([], [1], "full", None, False, TOOLS, None, None).tool_drafts() is None
