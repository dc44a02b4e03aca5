"""Parse model output into OpenAI tool calls -- whole-text and streaming.

Recognised call forms (Qwen2.5 / Hermes style and the looser forms small
models fall back to):

* ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (one or
  many; the body may also be a list of calls or several JSON objects; a
  missing close tag is tolerated at end of text; a stray or missing final
  ``}`` is repaired);
* a fenced block: ````json`` / bare ```` ``` ```` / ````tool_call`` around a
  call object or a list of call objects;
* a bare top-level JSON object (or list of objects) naming a tool.

A call object is ``{"name": N, "arguments": A}`` with ``N`` in ``tool_names``;
``"parameters"`` is accepted for ``"arguments"``, ``A`` may be an object or a
JSON string encoding one, a missing ``A`` means ``{}``, and the OpenAI wrapper
``{"type": "function", "function": {...}}`` is unwrapped.  Anything else --
JSON naming unknown tools included -- stays content.  Fenced blocks and
balanced JSON values are atomic: a rejected one is content as a whole and is
not searched for calls inside.

Arguments are normalised with ``json.dumps(obj, ensure_ascii=False)``
(default ``", "`` / ``": "`` separators) -- one form everywhere.

The batch parser is the streaming scanner run once over the whole text with
``final=True``, so :class:`StreamingToolParser` agrees with
:func:`parse_tool_calls` for every chunking of the same text.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, NamedTuple, Union

__all__ = ["ParsedToolCall", "ParseResult", "ContentDelta", "ToolCallDelta", "StreamEvent",
           "parse_tool_calls", "StreamingToolParser", "new_call_id"]

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
FENCE = "```"
#: fence info strings whose body may be a call (others are plain content)
CALL_FENCE_LANGS = frozenset({"", "json", "json5", "jsonc", "tool_call", "tool_calls", "tool_code"})

_TRIGGER = re.compile(r"<tool_call>|```|[{\[]")
_WS = " \t\r\n"


class ParsedToolCall(NamedTuple):
    """One call: ``arguments`` is a JSON string (normally an object)."""

    name: str
    arguments: str


class ParseResult(NamedTuple):
    """Text outside the calls (concatenated, stripped; ``None`` if empty) and the calls."""

    content: str | None
    tool_calls: list[ParsedToolCall]


class ContentDelta(NamedTuple):
    """A piece of assistant content; concatenated deltas == ``ParseResult.content``."""

    text: str

    def to_openai(self) -> dict:
        """The ``choices[0].delta`` object of a chat.completion.chunk."""
        return {"content": self.text}


class ToolCallDelta(NamedTuple):
    """One OpenAI ``delta.tool_calls[0]`` entry.

    The first delta of a call carries ``id``, ``type="function"``, ``name``
    and ``arguments=""``; later ones carry only ``index`` and an
    ``arguments`` fragment.
    """

    index: int
    id: str | None
    type: str | None
    name: str | None
    arguments: str

    def to_openai(self) -> dict:
        """The ``choices[0].delta`` object of a chat.completion.chunk."""
        call: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            call["id"] = self.id
            call["type"] = self.type or "function"
        fn: dict[str, Any] = {"arguments": self.arguments}
        if self.name is not None:
            fn["name"] = self.name
        call["function"] = fn
        return {"tool_calls": [call]}


StreamEvent = Union[ContentDelta, ToolCallDelta]


def new_call_id() -> str:
    """``"call_"`` + 24 random hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


def parse_tool_calls(text: str, tool_names: set[str]) -> ParseResult:
    """Split ``text`` into content and tool calls of the given tools.  Never raises."""
    segments, _ = _Scanner(tool_names).scan(text or "", final=True)
    content: list[str] = []
    calls: list[ParsedToolCall] = []
    for seg in segments:
        if isinstance(seg, str):
            content.append(seg)
        else:
            calls.extend(seg)
    joined = "".join(content).strip()
    return ParseResult(joined or None, calls)


class StreamingToolParser:
    """Incremental :func:`parse_tool_calls`.

    Text that may begin a call (``<tool_call>``, a ``` fence, a top-level
    ``{`` or ``[``, or a prefix of those at the end of the input) is held
    until decided; everything else is emitted at once, except whitespace,
    which is held until non-whitespace content follows (so the stream's
    content is exactly the batch ``content``: stripped, nothing for
    whitespace-only gaps between calls).  A call is emitted once complete,
    as a header delta then one arguments delta.
    """

    def __init__(self, tool_names: set[str]) -> None:
        self._scanner = _Scanner(tool_names)
        self._buf = ""
        self._pending_ws = ""
        self._started = False
        self._finished = False
        self.tool_calls: list[ParsedToolCall] = []  #: calls emitted so far
        self.call_ids: list[str] = []  #: their ids, same order

    def feed(self, delta_text: str) -> list[StreamEvent]:
        """Add model text; returns the events it made decidable."""
        if self._finished:
            raise RuntimeError("StreamingToolParser.feed after finish")
        if not delta_text:
            return []
        self._buf += delta_text
        return self._run(final=False)

    def finish(self) -> list[StreamEvent]:
        """End of generation: decide everything held back."""
        if self._finished:
            return []
        events = self._run(final=True)
        self._finished = True
        self._pending_ws = ""  # trailing whitespace is stripped, as in batch
        return events

    # -- internals --------------------------------------------------------------

    def _run(self, final: bool) -> list[StreamEvent]:
        segments, consumed = self._scanner.scan(self._buf, final)
        self._buf = self._buf[consumed:]
        events: list[StreamEvent] = []
        for seg in segments:
            if isinstance(seg, str):
                self._content(seg, events)
            else:
                for call in seg:
                    self._call(call, events)
        return events

    def _content(self, text: str, events: list[StreamEvent]) -> None:
        # str.strip() whitespace, exactly as parse_tool_calls strips content
        if not self._started:
            text = text.lstrip()
            if not text:
                return
        body = text.rstrip()
        if not body:
            self._pending_ws += text
            return
        events.append(ContentDelta(self._pending_ws + body))
        self._pending_ws = text[len(body):]
        self._started = True

    def _call(self, call: ParsedToolCall, events: list[StreamEvent]) -> None:
        index = len(self.tool_calls)
        call_id = new_call_id()
        self.tool_calls.append(call)
        self.call_ids.append(call_id)
        events.append(ToolCallDelta(index, call_id, "function", call.name, ""))
        events.append(ToolCallDelta(index, None, None, None, call.arguments))


# --------------------------------------------------------------------------- #
# The scanner shared by both entry points
# --------------------------------------------------------------------------- #

_UNDECIDED = None
Segment = Union[str, list]  # content text, or list[ParsedToolCall]


class _Decision(NamedTuple):
    end: int  # buffer index the decided region ends at (exclusive)
    calls: list | None  # the calls, or None: region is content
    enter_fence: bool = False  # region opened a plain (content) code fence


class _Scanner:
    """Left-to-right splitter of text into content and call segments.

    ``scan(buf, final)`` returns the decided segments and how many characters
    of ``buf`` they cover; the caller keeps the rest and passes it again,
    extended, later.  Every decision depends only on the text up to the
    region's end, so decisions do not depend on chunking.
    """

    def __init__(self, tool_names: set[str]) -> None:
        self.names = frozenset(tool_names or ())
        self.in_fence = False  # inside a plain code fence: content until ```
        self._span: list | None = None  # resumable JSON-span state for buf[0]

    def scan(self, buf: str, final: bool) -> tuple[list[Segment], int]:
        out: list[Segment] = []
        i, n = 0, len(buf)
        if not self.names:
            return ([buf] if buf else []), n
        while i < n:
            q = buf.find(FENCE, i) if self.in_fence else -1
            if q >= 0:  # a plain fence closes
                out.append(buf[i:q + 3])
                i, self.in_fence = q + 3, False
                continue
            m = None if self.in_fence else _TRIGGER.search(buf, i)
            if m is None:  # all content, but hold a possible marker start
                markers = (FENCE,) if self.in_fence else (TOOL_CALL_OPEN, FENCE)
                end = n if final else n - _partial_suffix(buf, i, markers)
                out.append(buf[i:end])
                i = end
                break
            p = m.start()
            out.append(buf[i:p])
            i = p
            dec = self._decide(buf, p, m.group(), final)
            if dec is _UNDECIDED:
                break
            self._span = None
            out.append(dec.calls or buf[p:dec.end])
            self.in_fence = dec.enter_fence
            i = dec.end
        if i > 0:
            self._span = None
        return _merge(out), i

    # -- trigger handlers -------------------------------------------------------

    def _decide(self, buf: str, p: int, trig: str, final: bool) -> _Decision | None:
        if trig == TOOL_CALL_OPEN:
            return self._tag(buf, p, final)
        if trig == FENCE:
            return self._fence(buf, p, final)
        return self._bare(buf, p, trig, final)

    def _tag(self, buf: str, p: int, final: bool) -> _Decision | None:
        start = p + len(TOOL_CALL_OPEN)
        close = buf.find(TOOL_CALL_CLOSE, start)
        if close >= 0:
            end = close + len(TOOL_CALL_CLOSE)
            return _Decision(end, self._calls_lenient(buf[start:close]))
        if not final:
            return _UNDECIDED
        return self._unclosed(buf, start)

    def _fence(self, buf: str, p: int, final: bool) -> _Decision | None:
        n = len(buf)
        nl = buf.find("\n", p + 3)
        inline = buf.find(FENCE, p + 3, nl if nl >= 0 else n)
        if inline >= 0:  # ```inline code``` on one line
            return _Decision(inline + 3, None)
        if nl < 0:
            return _Decision(n, None) if final else _UNDECIDED
        if buf[p + 3:nl].strip().lower() not in CALL_FENCE_LANGS:
            return _Decision(nl + 1, None, enter_fence=True)
        j = _skip_ws(buf, nl + 1)
        if j == n:
            return _Decision(n, None) if final else _UNDECIDED
        if buf[j] not in "{[":
            return _Decision(nl + 1, None, enter_fence=True)
        close = buf.find(FENCE, j)
        if close >= 0:
            return _Decision(close + 3, self._calls_lenient(buf[nl + 1:close]))
        if not final:
            return _UNDECIDED
        return self._unclosed(buf, nl + 1)

    def _bare(self, buf: str, p: int, opener: str, final: bool) -> _Decision | None:
        n = len(buf)
        j = _skip_ws(buf, p + 1)
        if j == n:
            return _Decision(p + 1, None) if final else _UNDECIDED
        if buf[j] != ('"' if opener == "{" else "{"):
            return _Decision(p + 1, None)
        if self._span is None or self._span[0] != p:
            self._span = [p, p, 0, False, False]
        end = _json_span_end(buf, self._span)
        if end < 0:
            return _Decision(p + 1, None) if final else _UNDECIDED
        try:
            obj = json.loads(buf[p:end])
        except ValueError:
            return _Decision(end, None)
        return _Decision(end, self._calls(obj))

    def _unclosed(self, buf: str, start: int) -> _Decision:
        """End of text inside an open tag/fence: accept a leading call value."""
        j = _skip_ws(buf, start)
        try:
            obj, end = json.JSONDecoder().raw_decode(buf, j)
        except ValueError:
            return _Decision(len(buf), None)
        calls = self._calls(obj)
        return _Decision(end, calls) if calls else _Decision(len(buf), None)

    # -- JSON -> calls ----------------------------------------------------------

    def _calls_lenient(self, body: str) -> list[ParsedToolCall] | None:
        """Calls from a tag/fence body: JSON values separated by whitespace."""
        values = _decode_values(body.strip())
        if not values:
            return None
        calls: list[ParsedToolCall] = []
        for v in values:
            c = self._calls(v)
            if not c:
                return None
            calls.extend(c)
        return calls

    def _calls(self, obj: Any) -> list[ParsedToolCall] | None:
        items = obj if isinstance(obj, list) else [obj]
        calls = [self._call(x) for x in items]
        if not calls or any(c is None for c in calls):
            return None
        return calls  # type: ignore[return-value]

    def _call(self, obj: Any) -> ParsedToolCall | None:
        if not isinstance(obj, dict):
            return None
        if isinstance(obj.get("function"), dict) and "name" not in obj:
            obj = obj["function"]
        name = obj.get("name")
        if not isinstance(name, str) or name not in self.names:
            return None
        args = obj.get("arguments", obj.get("parameters"))
        if args is None:
            args = {}
        if isinstance(args, str):
            try:
                decoded = json.loads(args)
            except ValueError:
                decoded = None
            if isinstance(decoded, dict):
                args = decoded
            else:
                return ParsedToolCall(name, args.strip() or "{}")
        if not isinstance(args, dict):
            return None
        return ParsedToolCall(name, json.dumps(args, ensure_ascii=False))


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def _merge(segments: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for s in segments:
        if isinstance(s, str) and out and isinstance(out[-1], str):
            out[-1] += s
        elif s != "":
            out.append(s)
    return out


def _skip_ws(buf: str, i: int) -> int:
    n = len(buf)
    while i < n and buf[i] in _WS:
        i += 1
    return i


def _partial_suffix(buf: str, start: int, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``buf[start:]`` that is a proper prefix of a marker."""
    best = 0
    for mk in markers:
        for k in range(min(len(mk) - 1, len(buf) - start), best, -1):
            if buf.endswith(mk[:k]):
                best = k
                break
    return best


def _json_span_end(buf: str, st: list) -> int:
    """End (exclusive) of the balanced JSON value starting at ``st[0]``, or -1.

    ``st = [start, pos, depth, in_string, escaped]`` is updated in place so a
    later call on a longer buffer resumes where this one stopped.
    """
    _, pos, depth, in_str, esc = st
    n = len(buf)
    while pos < n:
        c = buf[pos]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                st[1:] = [pos + 1, depth, in_str, esc]
                return pos + 1
        pos += 1
    st[1:] = [pos, depth, in_str, esc]
    return -1


def _decode_values(s: str) -> list[Any]:
    """Whitespace-separated JSON values filling ``s``, tolerating a stray or
    missing final ``}`` (common small-model slips); ``[]`` if not parseable."""
    dec = json.JSONDecoder()
    values: list[Any] = []
    i, n = 0, len(s)
    while i < n:
        try:
            obj, i = dec.raw_decode(s, i)
        except ValueError:
            rest = s[i:]
            for fix in ("}", "}}"):
                try:
                    values.append(json.loads(rest + fix))
                    return values
                except ValueError:
                    pass
            return []
        values.append(obj)
        i = _skip_ws(s, i)
        if s[i:].strip("}" + _WS) == "" and i < n:  # only stray closers left
            break
    return values
