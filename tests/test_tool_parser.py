"""Tests for deltaserve.server.tool_parser (batch + streaming agreement)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltaserve.server.tool_parser import (
    ContentDelta,
    ParsedToolCall,
    ParseResult,
    StreamingToolParser,
    ToolCallDelta,
    parse_tool_calls,
)

TOOLS = {"get_weather", "search", "noargs"}
W = '{"city": "Paris"}'  # normalised arguments for the common call

# (text, expected content, expected [(name, arguments)])
CASES: list[tuple[str, str | None, list[tuple[str, str]]]] = [
    ("Hello there!", "Hello there!", []),
    ("", None, []),
    ("   \n ", None, []),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     None, [("get_weather", W)]),
    ('<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>',
     None, [("get_weather", W)]),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.", [("get_weather", W)]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "search", "arguments": {"q": "a b", "n": 3}}\n</tool_call>',
     None, [("get_weather", W), ("search", '{"q": "a b", "n": 3}')]),
    ('```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```', None, [("get_weather", W)]),
    ('```\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n```', None, [("get_weather", W)]),
    ('Sure:\n```json\n[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "noargs"}]\n```\nDone.',
     "Sure:\n\nDone.", [("get_weather", W), ("noargs", "{}")]),
    ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}', None, [("get_weather", W)]),
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [("get_weather", W)]),
    ('I will call it: {"name": "search", "arguments": {"q": "x"}} ok', "I will call it:  ok",
     [("search", '{"q": "x"}')]),
    ('[{"name": "search", "arguments": {"q": "x"}}]', None, [("search", '{"q": "x"}')]),
    # unknown tools stay content
    ('{"name": "rm_rf", "arguments": {}}', '{"name": "rm_rf", "arguments": {}}', []),
    ('<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', []),
    ('```json\n{"a": 1, "b": [1, 2]}\n```', '```json\n{"a": 1, "b": [1, 2]}\n```', []),
    # code and prose with braces / brackets / backticks
    ("```python\ndef f():\n    return {\"name\": \"search\"}\n```\nthat's it",
     "```python\ndef f():\n    return {\"name\": \"search\"}\n```\nthat's it", []),
    ("Use `x` or ```y``` and [link](http://a) {not json} [ ] < > <b>", "Use `x` or ```y``` and [link](http://a) {not json} [ ] < > <b>", []),
    ("a {\"unterminated\": 1", "a {\"unterminated\": 1", []),
    ("```\nplain code\n```", "```\nplain code\n```", []),
    ("trailing <tool_", "trailing <tool_", []),
    ("trailing ``", "trailing ``", []),
    # Qwen slips: unclosed tag at EOS, stray / missing closing brace
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [("get_weather", W)]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}}\n</tool_call>', None,
     [("get_weather", W)]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>', None,
     [("get_weather", W)]),
    ('<tool_call>\n{"name": "search", "arguments": {"q": "1"}}\n{"name": "noargs", "arguments": {}}\n</tool_call>',
     None, [("search", '{"q": "1"}'), ("noargs", "{}")]),
    ('{"type": "function", "function": {"name": "noargs", "arguments": {}}}', None, [("noargs", "{}")]),
    ('<tool_call>\nnot json at all\n</tool_call> after', "<tool_call>\nnot json at all\n</tool_call> after", []),
    ('<tool_call>\n{"name": "search", "arguments": [1]}\n</tool_call>',
     '<tool_call>\n{"name": "search", "arguments": [1]}\n</tool_call>', []),
    ('{"name": "search", "arguments": {"q": "caf\u00e9 \\"}\\" {"}}', None, [("search", '{"q": "caf\u00e9 \\"}\\" {"}')]),
    ('```json\n{"name": "search", "arguments": {"q": "x"}}', None, [("search", '{"q": "x"}')]),
]

# extra texts for the agreement property (no expected values needed)
EXTRA = [
    "{ } [ ] {{ }} [[ ]] ``` ` `` <tool_call> </tool_call>",
    "<tool_call>\n[{\"name\": \"search\", \"arguments\": {}}]\n</tool_call>tail",
    "```tool_call\n{\"name\": \"search\"}\n```",
    "x```json\n{\"a\": \"```\"}\n```y",
    "unclosed ```python\nprint('{')",
    "[{\"name\": \"search\"}, 1]",
    "{\"name\": \"search\", \"arguments\": {\"q\": \"\\\\\"}} {\"name\": \"noargs\"}",
    "a\n\n<tool_call>\n{\"name\": \"noargs\"}\n</tool_call>\n\n  b  \n",
    "```\n\n\n",
    "<tool_call><tool_call>{\"name\": \"noargs\"}</tool_call>",
    "{\"name\" 1}",
    "[\n  {\"name\": \"noargs\"}\n]",
]
ALL_TEXTS = [c[0] for c in CASES] + EXTRA


def _stream(text: str, cuts: list[int], names=TOOLS):
    """Feed ``text`` split at ``cuts``; returns (content, calls, events)."""
    p = StreamingToolParser(names)
    events = []
    prev = 0
    for c in sorted(set(cuts)) + [len(text)]:
        events += p.feed(text[prev:c])
        prev = c
    events += p.finish()
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: dict[int, list] = {}
    for e in events:
        if isinstance(e, ToolCallDelta):
            if e.index not in calls:
                assert e.id and e.id.startswith("call_") and len(e.id) > 5
                assert e.type == "function" and e.name and e.arguments == ""
                calls[e.index] = [e.name, ""]
            else:
                assert e.id is None and e.name is None
                calls[e.index][1] += e.arguments
    assert sorted(calls) == list(range(len(calls)))
    return content, [ParsedToolCall(*calls[i]) for i in range(len(calls))], events


@pytest.mark.parametrize("text,content,calls", CASES)
def test_batch_cases(text, content, calls):
    res = parse_tool_calls(text, TOOLS)
    assert isinstance(res, ParseResult)
    assert res.content == content
    assert [tuple(c) for c in res.tool_calls] == calls
    for c in res.tool_calls:
        json.loads(c.arguments)


@pytest.mark.parametrize("text", ALL_TEXTS)
def test_stream_char_by_char_agrees(text):
    res = parse_tool_calls(text, TOOLS)
    content, calls, _ = _stream(text, list(range(len(text))))
    assert content == (res.content or "")
    assert calls == res.tool_calls


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_stream_random_chunkings_agree(data):
    text = data.draw(st.sampled_from(ALL_TEXTS))
    if data.draw(st.booleans()):  # glue two samples: calls and content interleave
        text = text + data.draw(st.sampled_from(["", "\n", " x "])) + data.draw(st.sampled_from(ALL_TEXTS))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    res = parse_tool_calls(text, TOOLS)
    content, calls, _ = _stream(text, cuts)
    assert content == (res.content or "")
    assert calls == res.tool_calls


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet='{}[]"\\:, ab<>/_tolcn`\n\x0b\u3000', max_size=60), cuts=st.lists(st.integers(0, 60), max_size=8))
def test_garbage_never_raises_and_agrees(text, cuts):
    res = parse_tool_calls(text, {"a", "b"})
    content, calls, _ = _stream(text, [c for c in cuts if c <= len(text)], {"a", "b"})
    assert content == (res.content or "")
    assert calls == res.tool_calls


def test_plain_content_streams_immediately():
    p = StreamingToolParser(TOOLS)
    assert p.feed("Hello world") == [ContentDelta("Hello world")]
    assert p.feed(", and more ") == [ContentDelta(", and more")]  # trailing space held
    assert p.feed("[see") == [ContentDelta(" [see")]  # '[' + non-'{' is decided at once
    assert p.feed(" above] {") == [ContentDelta(" above]")]  # '{' held
    assert p.feed(" x") == [ContentDelta(" { x")]
    assert p.finish() == []


def test_possible_call_is_held_until_decided():
    p = StreamingToolParser(TOOLS)
    assert p.feed("Checking. <tool") == [ContentDelta("Checking.")]
    assert p.feed('_call>\n{"name": "search", ') == []
    ev = p.feed('"arguments": {"q": "x"}}\n</tool_call>')
    assert ev[0] == ToolCallDelta(0, ev[0].id, "function", "search", "")
    assert ev[1] == ToolCallDelta(0, None, None, None, '{"q": "x"}')
    assert p.finish() == []
    assert p.tool_calls == [ParsedToolCall("search", '{"q": "x"}')]


def test_code_fence_streams_after_language_line():
    p = StreamingToolParser(TOOLS)
    assert p.feed("```py") == []
    assert p.feed("thon\nx = {") == [ContentDelta("```python\nx = {")]
    assert p.feed("}\n``") == [ContentDelta("}")]
    assert p.feed("`\n{") == [ContentDelta("\n```")]


def test_no_tools_means_plain_content():
    text = '<tool_call>\n{"name": "search"}\n</tool_call>'
    assert parse_tool_calls(text, set()) == ParseResult(text, [])
    p = StreamingToolParser(set())
    assert p.feed(text) == [ContentDelta(text)]


def test_openai_delta_shapes():
    p = StreamingToolParser(TOOLS)
    ev = p.feed('{"name": "noargs"}') + p.finish()
    first, rest = ev[0].to_openai(), ev[1].to_openai()
    call = first["tool_calls"][0]
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "noargs", "arguments": ""}
    assert rest == {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}
    assert ContentDelta("hi").to_openai() == {"content": "hi"}


def test_ids_unique():
    p = StreamingToolParser(TOOLS)
    p.feed('{"name": "noargs"} {"name": "noargs"}')
    p.finish()
    assert len(set(p.call_ids)) == 2 and len(p.tool_calls) == 2
