"""The rest of a partial tool call, as text: what schema drafts (`schema_drafts.py`) propose.

`CallPredictor.continuation(text)` reads a partial call (Hermes `{"name": ..., "arguments": {...}}`, tagged,
fenced or bare) and returns the text that most likely follows, as far as it is certain: the frame in the
model's whitespace style, the function name once its prefix picks one tool, keys in schema order, enum
values, values copied from the context (`CallContext`), and the same inside nested values (the shapes of
`call_shapes.py`): `{"` and the keys of an object in schema order, its `}` after its last key, an array's `[`
and the start of its first item. An array's `, ` or `]` after an item is never certain from the schema; it
is predicted only when the context holds a value of the same shape under the same key that the text
written so far is a prefix of (then its whole rest is copied). It returns "" where nothing is predictable
(unknown tool, a value of unknown shape, a value the context does not hold, text off the prediction).
Pure: nothing here mutates after construction, apart from the predictor's record of the call being read
and the context's cache of nested look-ups (its text never changes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence

from deltaserve.spec.call_shapes import CallStyle, ParamShape, ToolDrafts, ToolShape, conforms, next_param, param

__all__ = ["CALL_CLOSE", "CALL_OPEN", "CallContext", "CallPredictor", "ParamShape", "ToolDrafts", "ToolShape"]

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
BARE_HEAD = '{"name": "'
_MAX_VALUE_CHARS = 256  # a copied value longer than this is not a value (unterminated quote, prose)
_MAX_NESTED_CHARS = 1024  # likewise for a copied object or array
_MAX_MATCHES = 64  # occurrences of a value prefix examined (latest first)


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


def _read_nested(text: str, i: int) -> int | None:
    """text[i] is `{` or `[` -> index after its matching close; None when unbalanced, too long or multi-line."""
    depth, j = 0, i
    while j < len(text) and j - i < _MAX_NESTED_CHARS:
        c = text[j]
        if c == '"':
            s = _read_string(text, j)
            if s is None:
                return None
            j = s[1]
            continue
        if c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
        elif c == "\n":
            return None
        j += 1
    return None


class CallContext:
    """The text values are copied from, with the searches the drafts use."""

    def __init__(self, text: str):
        self.text = text
        self._nested: dict[ParamShape, str | None] = {}  # nested_value_of's answers (the text is fixed)

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

    def nested_value_of(self, shape: ParamShape) -> str | None:
        """The latest one-line `"<shape.name>": {...}` (or `[...]`) that is a value of `shape`, as raw text.

        Conformance is what keeps the prompt's own schema (`"key": {"type": "object", ...}`) out."""
        if shape in self._nested:
            return self._nested[shape]
        needle, opener = f'"{shape.name}": ', "{" if shape.props is not None else "["
        end, found = len(self.text), None
        for _ in range(_MAX_MATCHES):
            at = self.text.rfind(needle, 0, end)
            if at < 0:
                break
            end, i = at, at + len(needle)
            j = _read_nested(self.text, i) if self.text.startswith(opener, i) else None
            if j is None:
                continue
            try:
                value = json.loads(self.text[i:j])
            except ValueError:
                continue
            if conforms(value, shape):
                found = self.text[i:j]
                break
        self._nested[shape] = found
        return found

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


@dataclass
class _Frame:
    """An object or array still open where the text ends: the parser's stack (state and seen mutate)."""

    obj: bool
    shape: ParamShape | None  # of the value itself (`props` / `items` inside); None when unknown
    depth: int  # 0: the arguments object
    start: int  # index of its `{` / `[` in the arguments body (-1: the arguments object)
    state: str  # objects: key | colon | value | after; arrays: first (after `[`) | value | after
    gap: str  # whitespace expected before what the state reads next
    seen: list[str] = field(default_factory=list)  # keys written (objects)

    def item_shape(self) -> ParamShape | None:
        """The shape of the value being read: the last key's property, or the array's items."""
        if self.shape is None:
            return None
        return param(self.shape.props, self.seen[-1]) if self.obj else self.shape.items


class CallPredictor:
    """Continuation text of a partial call (pure; see the module docstring for what is predicted)."""

    def __init__(self, drafts: ToolDrafts, context: CallContext):
        self.tools = {t.name: t for t in drafts.tools}
        self.ctx = context
        self.st = CallStyle("{")  # of the call being predicted; `continuation` sets it and `closer`
        self.closer = ""
        # Whether the last continuation stopped after a complete item of an array (or of an object of
        # unknown shape), where `,` / `]` / whitespace follows unpredicted: they may merge with its end.
        self.ends_after_item = False

    # ---- structure ----------------------------------------------------
    def continuation(self, text: str, opener: str = CALL_OPEN + "\n", closer: str = "\n" + CALL_CLOSE) -> str:
        """Predicted text after `text`, a partial call that starts with `opener` and ends with `closer`."""
        self.closer, self.ends_after_item = closer, False
        if not text.startswith(opener):
            self.st = CallStyle("{")
            return opener[len(text):] + BARE_HEAD + self._name("") if opener.startswith(text) else ""
        obj = text[len(opener):]
        self.st = st = CallStyle(obj)
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
            return mid[len(rest):] + self._args(tool, "") if mid.startswith(rest) else ""
        return self._args(tool, rest[len(mid):])

    def _name(self, prefix: str) -> str:
        cands = [n for n in self.tools if n.startswith(prefix)]
        if len(cands) != 1:
            return _lcp([n[len(prefix):] for n in cands])
        return cands[0][len(prefix):] + '"' + self.st.sep1 + '"arguments": {' + self._args(self.tools[cands[0]], "")

    def _unwind(self, stack: list[_Frame], text: str, done: bool) -> str:
        """`text` ends the current item of stack[-1] when `done`: go on with the rest of each enclosing
        value while it is certain, and after the arguments object with the call's end."""
        for f in reversed(stack):
            if not done:
                return text
            more, done = self._rest_of(f)
            text += more
        return text + self.st.close1 + "}" + self.closer if done else text

    def _rest_of(self, f: _Frame) -> tuple[str, bool]:
        """After a complete item of f: its next keys (schema order) and values while certain, and its `}`.
        -> (text, whether it reaches f's close). An array's next item or close is not certain."""
        out = ""
        if not f.obj or f.shape is None or f.shape.props is None:
            self.ends_after_item = True
            return out, False
        while True:
            p = next_param(f.shape.props, f.seen)
            if p is None:
                return out + self.st.close(f.depth) + "}", True
            text, done = self._key(f, p, "")
            out += self.st.sep(f.depth) + '"' + text
            if not done:
                return out, False

    def _key(self, f: _Frame, p: ParamShape, written: str) -> tuple[str, bool]:
        """From inside `"<written>` of key p in object f: the rest of the key, `": ` and the value as far
        as known (p joins f.seen). -> (text, whether the value is complete)."""
        f.seen.append(p.name)
        text, done = self._value_start(p, f.depth)
        return p.name[len(written):] + '": ' + text, done

    def _value_start(self, p: ParamShape | None, depth: int) -> tuple[str, bool]:
        """A value of shape p in a container at `depth`, from its first character."""
        if p is None:
            return "", False
        if p.props is not None or p.items is not None:
            raw = self.ctx.nested_value_of(p) if p.name else None
            if raw is not None:
                return self.st.render(raw, depth + 1), True
            if p.items is not None:  # the first item's start: a guess, as a next optional key is
                item, _ = self._value_start(p.items, depth + 1)
                return "[" + (self.st.open(depth + 1) + item if item else ""), False
            f = _Frame(True, p, depth + 1, -1, "key", "")
            text, done = self._key(f, p.props[0], "")
            text = "{" + self.st.open(depth + 1) + '"' + text
            if done:
                more, done = self._rest_of(f)
                text += more
            return text, done
        if p.string is True:
            text, done = self._string(p, "")
            return '"' + text, done
        if p.string is False:
            return self._scalar(p, "")
        return "", False

    # ---- values -------------------------------------------------------
    def _string(self, p: ParamShape, written: str) -> tuple[str, bool]:
        """Inside a string value of p after `written`: its rest and closing quote when certain."""
        if p.enum:
            rests = [e[len(written):] for e in p.enum if e.startswith(written)]
        else:
            same_key = self.ctx.value_of(p.name) if p.name else None
            if same_key is not None and same_key[1] and same_key[0].startswith(written):
                rests = [same_key[0][len(written):]]
            elif written:
                rests = self.ctx.completions(written)
            else:
                rests = []
        if len(rests) != 1:
            return _lcp(rests), False
        return rests[0] + '"', True

    def _scalar(self, p: ParamShape, written: str) -> tuple[str, bool]:
        v = self.ctx.value_of(p.name) if p.name else None
        if v is None or v[1] or not v[0].startswith(written):
            return "", False
        return v[0][len(written):], True

    def _args(self, tool: ToolShape, body: str) -> str:
        """Continuation of the arguments object `body` (after its `{`), nested values included."""
        stack = [_Frame(True, ParamShape("", False, (), tool.params), 0, -1, "key", self.st.open(0))]
        cut: tuple[str, ParamShape | None, str] | None = None  # the text ends inside a key / string / scalar
        i, n = 0, len(body)
        while i < n:
            c = body[i]
            if not stack:  # the arguments object is closed: the rest must be the tail
                rest, end = body[i:], self.st.close1 + "}" + self.closer
                return end[len(rest):] if end.startswith(rest) else ""
            if c in " \t\n":
                i += 1
                continue
            f = stack[-1]
            if f.state == "key":
                if c == "}":
                    stack.pop()
                    i += 1
                    continue
                if c != '"':
                    return ""
                s = _read_string(body, i)
                if s is None:
                    cut = ("key", None, body[i + 1:])
                    break
                f.seen.append(s[0])
                f.state, i = "colon", s[1]
            elif f.state == "colon":
                if c != ":":
                    return ""
                f.state, f.gap, i = "value", " ", i + 1
            elif f.state in ("value", "first"):
                if f.state == "first" and c == "]":
                    stack.pop()
                    i += 1
                    continue
                p, f.state = f.item_shape(), "after"
                if c == '"':
                    s = _read_string(body, i)
                    if s is None:
                        cut = ("string", p, body[i + 1:])
                        break
                    i = s[1]
                elif c in "{[":
                    stack.append(_Frame(c == "{", p, f.depth + 1, i, "key" if c == "{" else "first",
                                        self.st.open(f.depth + 1)))
                    i += 1
                else:
                    j = i
                    while j < n and body[j] not in ",}] \t\n":
                        j += 1
                    if j == n:
                        cut = ("scalar", p, body[i:])
                        break
                    i = j
            else:  # after a value
                if c == ",":
                    f.state, f.gap, i = "key" if f.obj else "value", self.st.sep(f.depth)[1:], i + 1
                elif c == ("}" if f.obj else "]"):
                    stack.pop()
                    i += 1
                else:
                    return ""
        if not stack:
            return self.st.close1 + "}" + self.closer
        return self._at_end(stack, body, cut)

    def _at_end(self, stack: list[_Frame], body: str, cut: tuple[str, ParamShape | None, str] | None) -> str:
        """The continuation where the body ends, `stack` the values open there (outermost first)."""
        # A nested value the context holds under the same key, with the text so far a prefix of it: the
        # outermost such value is copied to its end (its items, separators and close are certain then).
        for level in range(1, len(stack)):
            shape = stack[level].shape
            if shape is not None and shape.name and (shape.props is not None or shape.items is not None):
                raw, written = self.ctx.nested_value_of(shape), body[stack[level].start:]
                value = self.st.render(raw, stack[level].depth) if raw is not None else ""
                if value.startswith(written):
                    return self._unwind(stack[:level], value[len(written):], True)
        f = stack[-1]
        if cut is not None:
            how, p, written = cut
            if how == "key":  # the next key in schema order if it fits, else the only fit
                props = f.shape.props if f.shape is not None else None
                if props is None:
                    return ""
                match = [q for q in props if q.name not in f.seen and q.name.startswith(written)]
                nxt = next_param(props, f.seen)
                pick = nxt if nxt in match else (match[0] if len(match) == 1 else None)
                if pick is None:
                    return _lcp([q.name[len(written):] for q in match])
                return self._unwind(stack, *self._key(f, pick, written))
            if how == "string":  # where a string may be (the type is string or unknown)
                return self._unwind(stack, *self._string(p, written)) if p is not None and p.string is not False else ""
            return self._unwind(stack, *self._scalar(p, written)) if p is not None and p.string is False else ""
        # The body ends between items: the expected whitespace (minus what is written) + the prediction.
        trailing = body[len(body.rstrip(" \t\n")):]
        if not f.gap.startswith(trailing):
            return ""
        gap = f.gap[len(trailing):]
        if f.state == "key":
            props = f.shape.props if f.shape is not None else None
            p = next_param(props, f.seen) if props is not None else None
            if p is None:  # an object without properties closes at once; after a `,` nothing is known
                return self._unwind(stack[:-1], "}", True) if props is not None and not f.seen else ""
            text, done = self._key(f, p, "")
            return self._unwind(stack, gap + '"' + text, done)
        if f.state in ("colon", "value", "first"):
            p = f.item_shape()
            if p is None:
                return ""
            text, done = self._value_start(p, f.depth)
            return self._unwind(stack, (": " if f.state == "colon" else gap) + text, done)
        if trailing:
            return ""  # whitespace after a value: a pretty closing brace or comma follows, unpredicted
        return self._unwind(stack, "", True)  # after a complete value

