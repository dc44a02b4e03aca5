"""The rest of a partial tool call, as text: what schema drafts (`schema_drafts.py`) propose.

`ToolDrafts` is what is needed of a request's tools (immutable, typed: it crosses the server/engine
boundary in `SamplingParams.tool_drafts`). `CallPredictor.continuation(text)` reads a partial call (Hermes
`{"name": ..., "arguments": {...}}`, tagged, fenced or bare) and returns the text that most likely follows,
as far as it is certain: the frame in the model's whitespace style, the function name once its prefix picks
one tool, keys in schema order, enum values, values copied from the context (`CallContext`). It returns ""
where nothing is predictable (unknown tool, nested values, a value the context does not hold). Pure:
nothing here mutates after construction, apart from the predictor's record of the call being read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
BARE_HEAD = '{"name": "'
_MAX_VALUE_CHARS = 256  # a copied value longer than this is not a value (unterminated quote, prose)
_MAX_MATCHES = 64  # occurrences of a value prefix examined (latest first)


@dataclass(frozen=True)
class ParamShape:
    """One property of a tool's parameters: `string` True/False (quoted or not), None when unknown."""

    name: str
    string: bool | None
    enum: tuple[str, ...] = ()


@dataclass(frozen=True)
class ToolShape:
    name: str
    params: tuple[ParamShape, ...]  # schema order


@dataclass(frozen=True)
class ToolDrafts:
    """What the drafts need of a request's tools (immutable; crosses the server/engine boundary)."""

    tools: tuple[ToolShape, ...]

    @classmethod
    def from_tools(cls, tools: Sequence[dict[str, Any]] | None) -> "ToolDrafts | None":
        """OpenAI `tools` (function entries) -> ToolDrafts, or None when there is nothing to draft from."""
        shapes = []
        for t in tools or ():
            f = t.get("function") if isinstance(t, dict) else None
            if not isinstance(f, dict) or not isinstance(f.get("name"), str):
                continue
            props = (f.get("parameters") or {}).get("properties") or {}
            params = []
            for key, schema in props.items() if isinstance(props, dict) else ():
                schema = schema if isinstance(schema, dict) else {}
                enum = schema.get("enum")
                enum = tuple(e for e in enum if isinstance(e, str)) if isinstance(enum, list) else ()
                typ = schema.get("type")
                string = True if typ == "string" or enum else (None if typ is None or isinstance(typ, list) else False)
                params.append(ParamShape(str(key), string, enum))
            shapes.append(ToolShape(f["name"], tuple(params)))
        return cls(tuple(shapes)) if shapes else None


def _lcp(strings: Sequence[str]) -> str:
    if not strings:
        return ""
    lo, hi = min(strings), max(strings)  # the common prefix of all is that of the extremes
    n = 0
    while n < len(lo) and lo[n] == hi[n]:
        n += 1
    return lo[:n]


def _read_string(text: str, i: int) -> tuple[str, int] | None:
    """text[i] is an opening quote -> (raw body, index after the closing quote), None when unterminated."""
    j = i + 1
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c == '"':
            return text[i + 1:j], j + 1
        j += 1
    return None


class CallContext:
    """The text values are copied from, with the two searches the drafts use."""

    def __init__(self, text: str):
        self.text = text

    def value_of(self, key: str) -> tuple[str, bool] | None:
        """The latest scalar `"key": <value>` -> (raw value, quoted), None when there is none."""
        needle = f'"{key}": '
        end = len(self.text)
        for _ in range(_MAX_MATCHES):
            at = self.text.rfind(needle, 0, end)
            if at < 0:
                return None
            end = at
            i = at + len(needle)
            if self.text.startswith('"', i):
                s = _read_string(self.text, i)
                if s is not None and len(s[0]) <= _MAX_VALUE_CHARS and "\n" not in s[0]:
                    return s[0], True
                continue
            j = i
            while j < len(self.text) and j - i < 64 and self.text[j] not in ",}]\n ":
                j += 1
            if j > i and self.text[i] not in "{[":  # a schema (`"key": {"type": ...`) is no value
                return self.text[i:j], False
        return None

    def completions(self, prefix: str) -> list[str]:
        """Distinct rests of the context's strings that start with `prefix` (latest occurrences first)."""
        needle = '"' + prefix
        out: list[str] = []
        end = len(self.text)
        for _ in range(_MAX_MATCHES):
            at = self.text.rfind(needle, 0, end)
            if at < 0:
                break
            end = at
            s = _read_string(self.text, at)
            if s is None or len(s[0]) > _MAX_VALUE_CHARS or "\n" in s[0]:
                continue
            rest = s[0][len(prefix):]
            if rest not in out:
                out.append(rest)
        return out


def _next_param(tool: ToolShape, seen: list[str]) -> ParamShape | None:
    """The first property after the last one written (schema order) not yet written; the first when none."""
    start = 0
    if seen:
        names = [p.name for p in tool.params]
        if seen[-1] in names:
            start = names.index(seen[-1]) + 1
    for p in tool.params[start:]:
        if p.name not in seen:
            return p
    return None


def _param(tool: ToolShape, name: str) -> ParamShape | None:
    return next((p for p in tool.params if p.name == name), None)


class _Style:
    """Whitespace of a call object, read off its first `{`: compact (`{"name": ..., "arguments": {...}}`)
    or pretty-printed with the indent the model chose (`{\n  "name": ...,\n  "arguments": {\n    ...`)."""

    def __init__(self, obj: str):
        ws = obj[1:len(obj) - len(obj[1:].lstrip(" \t\n"))] if obj.startswith("{") else ""
        self.ok = len(obj) > 1 + len(ws)  # the whitespace after `{` is complete once something follows it
        if "\n" in ws:
            unit = ws[ws.rindex("\n") + 1:]
            self.open1, self.sep1 = ws, "," + ws  # outer object
            self.open2, self.sep2 = "\n" + unit * 2, ",\n" + unit * 2  # arguments object
            self.close2, self.close1 = "\n" + unit, "\n"
        else:
            self.open1, self.sep1, self.open2, self.sep2, self.close2, self.close1 = ws, ", ", "", ", ", "", ""


class CallPredictor:
    """Continuation text of a partial call (pure; see the module docstring for what is predicted)."""

    def __init__(self, drafts: ToolDrafts, context: CallContext):
        self.tools = {t.name: t for t in drafts.tools}
        self.ctx = context
        self.st = _Style("{")  # of the call being predicted; `continuation` sets it and `closer`
        self.closer = ""

    @property
    def tail(self) -> str:
        """After the last argument: close both objects and the call."""
        return self.st.close2 + "}" + self.st.close1 + "}" + self.closer

    # ---- structure ----------------------------------------------------
    def continuation(self, text: str, opener: str = CALL_OPEN + "\n", closer: str = "\n" + CALL_CLOSE) -> str:
        """Predicted text after `text`, a partial call that starts with `opener` and ends with `closer`."""
        self.closer = closer
        if not text.startswith(opener):
            self.st = _Style("{")
            return opener[len(text):] + BARE_HEAD + self._name("") if opener.startswith(text) else ""
        obj = text[len(opener):]
        self.st = st = _Style(obj)
        if not obj or not st.ok:
            return ""  # inside the whitespace after `{`: its length decides the style
        head = "{" + st.open1 + '"name": "'
        if not obj.startswith(head):
            return head[len(obj):] + self._name("") if head.startswith(obj) else ""
        rest = obj[len(head):]
        q = rest.find('"')
        if q < 0:
            return self._name(rest)
        tool = self.tools.get(rest[:q])
        rest = rest[q:]
        mid = '"' + st.sep1 + '"arguments": {'
        if tool is None:
            return ""
        if not rest.startswith(mid):
            return mid[len(rest):] + self._after_open(tool) if mid.startswith(rest) else ""
        return self._args(tool, rest[len(mid):])

    def _name(self, prefix: str) -> str:
        cands = [n for n in self.tools if n.startswith(prefix)]
        if len(cands) != 1:
            return _lcp([n[len(prefix):] for n in cands])
        return cands[0][len(prefix):] + '"' + self.st.sep1 + '"arguments": {' + self._after_open(self.tools[cands[0]])

    def _after_open(self, tool: ToolShape) -> str:
        p = _next_param(tool, [])
        if p is None:
            return "}" + self.st.close1 + "}" + self.closer
        return self.st.open2 + '"' + self._key(tool, p, [], "")

    def _key(self, tool: ToolShape, p: ParamShape, seen: list[str], written: str) -> str:
        """From inside `"<written>` of key p: the rest of the key, `": ` and the value as far as known."""
        return p.name[len(written):] + '": ' + self._value_start(tool, p, seen + [p.name])

    def _value_start(self, tool: ToolShape, p: ParamShape, seen: list[str]) -> str:
        if p.string is True:
            return '"' + self._string(tool, p, seen, "")
        if p.string is False:
            return self._scalar(tool, p, seen, "")
        return ""

    def _after_value(self, tool: ToolShape, seen: list[str]) -> str:
        p = _next_param(tool, seen)
        return self.st.sep2 + '"' + self._key(tool, p, seen, "") if p is not None else self.tail

    # ---- values -------------------------------------------------------
    def _string(self, tool: ToolShape, p: ParamShape, seen: list[str], written: str) -> str:
        """Inside string value of p after `written`: its rest, and beyond the closing quote when certain."""
        if p.enum:
            rests = [e[len(written):] for e in p.enum if e.startswith(written)]
        else:
            same_key = self.ctx.value_of(p.name)
            if same_key is not None and same_key[1] and same_key[0].startswith(written):
                rests = [same_key[0][len(written):]]
            elif written:
                rests = self.ctx.completions(written)
            else:
                rests = []
        if len(rests) != 1:
            return _lcp(rests)
        return rests[0] + '"' + self._after_value(tool, seen)

    def _scalar(self, tool: ToolShape, p: ParamShape, seen: list[str], written: str) -> str:
        v = self.ctx.value_of(p.name)
        if v is None or v[1] or not v[0].startswith(written):
            return ""
        return v[0][len(written):] + self._after_value(tool, seen)

    def _args(self, tool: ToolShape, body: str) -> str:
        """Continuation of the arguments object `body` (after its `{`); flat objects only."""
        seen: list[str] = []
        state, i, n = "key", 0, len(body)  # key | colon | value | after | done
        gap = self.st.open2  # whitespace expected before the next item in the current state
        while i < n:
            c = body[i]
            if state == "done":  # the rest must be the tail
                rest, end = body[i:], self.st.close1 + "}" + self.closer
                return end[len(rest):] if end.startswith(rest) else ""
            if c in " \t\n":
                i += 1
                continue
            if state == "key":
                if c == "}":
                    state, i = "done", i + 1
                    continue
                if c != '"':
                    return ""
                s = _read_string(body, i)
                if s is None:  # inside a key: the next one in schema order if it fits, else the only fit
                    written = body[i + 1:]
                    nxt = _next_param(tool, seen)
                    match = [p for p in tool.params if p.name not in seen and p.name.startswith(written)]
                    pick = nxt if nxt in match else (match[0] if len(match) == 1 else None)
                    if pick is None:
                        return _lcp([p.name[len(written):] for p in match])
                    return self._key(tool, pick, seen, written)
                seen.append(s[0])
                state, i = "colon", s[1]
            elif state == "colon":
                if c != ":":
                    return ""
                state, i, gap = "value", i + 1, " "
            elif state == "value":
                p = _param(tool, seen[-1])
                if c == '"':
                    s = _read_string(body, i)
                    if s is None:
                        ok = p is not None and p.string is not False
                        return self._string(tool, p, seen, body[i + 1:]) if ok else ""
                    state, i = "after", s[1]
                elif c in "{[":
                    return ""  # nested values: not predicted
                else:
                    j = i
                    while j < n and body[j] not in ",} \t\n":
                        j += 1
                    if j == n:
                        ok = p is not None and p.string is False
                        return self._scalar(tool, p, seen, body[i:]) if ok else ""
                    state, i = "after", j
            elif state == "after":
                if c == ",":
                    state, i, gap = "key", i + 1, self.st.sep2[1:]
                elif c == "}":
                    state, i = "done", i + 1
                else:
                    return ""
        if state == "done":
            return self.st.close1 + "}" + self.closer
        # The body ends between items: the expected whitespace (minus what is written) + the prediction.
        trailing = body[len(body.rstrip(" \t\n")):]
        if not gap.startswith(trailing):
            return ""
        gap = gap[len(trailing):]
        if state == "key":
            p = _next_param(tool, seen)
            if p is None:
                return "}" + self.st.close1 + "}" + self.closer if not seen and not body.strip() else ""
            return gap + '"' + self._key(tool, p, seen, "")
        p = _param(tool, seen[-1])
        if state == "colon":
            return ": " + self._value_start(tool, p, seen) if p is not None else ""
        if state == "value":
            return gap + self._value_start(tool, p, seen) if p is not None else ""
        if trailing:
            return ""  # whitespace after a value: a pretty closing brace or comma follows, unpredicted
        return self._after_value(tool, seen)  # after a complete value
