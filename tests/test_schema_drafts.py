"""Schema drafts (spec/schema_drafts.py, spec/call_text.py): what they predict, the exact tokens they propose, and that
speculation with them stays lossless.

* `ToolDrafts.from_tools` and the text predictor on hand-written partial calls (compact, pretty, fenced,
  bare), including the cases where nothing may be predicted;
* `SchemaDrafter.propose` with the Qwen2.5 tokenizer: the exact ids for a generated suffix, none when the
  generated tokens are not how the text tokenizes, none past a BPE merge the prediction cannot know;
* the engine on Qwen2.5-Coder-0.5B (fp32): a first tool call copying a record decodes to the same tokens
  with schema drafts as without speculation (acceptance reported and high), and also when every schema
  draft is wrong, when drafts run past stop tokens / into max_tokens, and when a stop string cuts the text;
* a tiny random model (fast): identity while every draft position is rejected.
"""

from __future__ import annotations

import pytest
import torch

from deltaserve.engine.engine import EngineConfig, LLMEngine
from deltaserve.engine.kv_manager import CacheMode
from deltaserve.engine.sampling import SamplingParams
from deltaserve.engine.textstream import TextStream
from deltaserve.spec import schema_drafts
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
