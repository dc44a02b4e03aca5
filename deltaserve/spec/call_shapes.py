"""The shapes of a tool call as schema drafts need them (`call_text.py` predicts from them).

`ToolDrafts.from_tools` turns OpenAI `tools` into immutable `ToolShape`s (they cross the server/engine
boundary in `SamplingParams.tool_drafts`): per tool its properties in schema order, each a `ParamShape`
that says whether the value is quoted, its enum, and for a nested value the shapes inside it: an object's
properties (again in schema order) or an array's item shape, down to `MAX_DEPTH` levels (deeper values are
kept as unquoted and unknown inside, so nothing is predicted there). `conforms` checks a JSON value
against a shape (a nested value copied from the context must be a value of this shape, not the schema text
the prompt also holds). `CallStyle` is the call's whitespace shape, read off its first `{`. Pure: nothing
here mutates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

MAX_DEPTH = 4  # nesting levels below the arguments object whose shapes are kept


@dataclass(frozen=True)
class ParamShape:
    """One value of a tool's arguments: `string` True/False (quoted or not), None when unknown.

    `name` is the property's key ("" for an array's items). A nested value has `props` (an object: its
    properties in schema order) or `items` (an array: the shape of every item); both None when the value
    is a scalar or its inside is unknown (an object without `properties`, an array without `items`, or
    deeper than MAX_DEPTH).
    """

    name: str
    string: bool | None
    enum: tuple[str, ...] = ()
    props: tuple["ParamShape", ...] | None = None
    items: "ParamShape | None" = None


@dataclass(frozen=True)
class ToolShape:
    name: str
    params: tuple[ParamShape, ...]  # schema order


def shape_of(name: str, schema: Any, depth: int = 0) -> ParamShape:
    """A property's JSON schema -> its ParamShape (nested shapes while depth < MAX_DEPTH)."""
    schema = schema if isinstance(schema, dict) else {}
    enum = schema.get("enum")
    enum = tuple(e for e in enum if isinstance(e, str)) if isinstance(enum, list) else ()
    typ = schema.get("type")
    string = True if typ == "string" or enum else (None if typ is None or isinstance(typ, list) else False)
    props = items = None
    if depth < MAX_DEPTH:
        sub = schema.get("properties")
        if typ == "object" and isinstance(sub, dict) and sub:
            props = tuple(shape_of(str(k), s, depth + 1) for k, s in sub.items())
        elif typ == "array" and isinstance(schema.get("items"), dict):
            items = shape_of("", schema["items"], depth + 1)
    return ParamShape(str(name), string, enum, props, items)


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
            params = tuple(shape_of(str(k), s) for k, s in props.items()) if isinstance(props, dict) else ()
            shapes.append(ToolShape(f["name"], params))
        return cls(tuple(shapes)) if shapes else None


def next_param(props: tuple[ParamShape, ...], seen: list[str]) -> ParamShape | None:
    """The first property after the last one written (schema order) not yet written; the first when none."""
    start = 0
    if seen:
        names = [p.name for p in props]
        if seen[-1] in names:
            start = names.index(seen[-1]) + 1
    for p in props[start:]:
        if p.name not in seen:
            return p
    return None


def param(props: tuple[ParamShape, ...] | None, name: str) -> ParamShape | None:
    return next((p for p in props if p.name == name), None) if props is not None else None


def conforms(value: Any, shape: ParamShape | None) -> bool:
    """Whether a parsed JSON value can be a value of `shape` (every object key a known property)."""
    if shape is None or shape.string is None:
        return True
    if shape.string:
        return isinstance(value, str) and (not shape.enum or value in shape.enum)
    if shape.props is not None:
        names = {p.name for p in shape.props}
        return isinstance(value, dict) and all(k in names and conforms(v, param(shape.props, k))
                                               for k, v in value.items())
    if shape.items is not None:
        return isinstance(value, list) and all(conforms(v, shape.items) for v in value)
    return not isinstance(value, str)


class CallStyle:
    """Whitespace of a call object, read off its first `{`: compact (`{"name": ..., "arguments": {...}}`)
    or pretty-printed with the indent the model chose (`{\n  "name": ...,\n  "arguments": {\n    ...`);
    nested objects and arrays indent one unit more per level, as `json.dumps(indent=...)` does."""

    def __init__(self, obj: str):
        ws = obj[1:len(obj) - len(obj[1:].lstrip(" \t\n"))] if obj.startswith("{") else ""
        self.ok = len(obj) > 1 + len(ws)  # the whitespace after `{` is complete once something follows it
        self.unit = ws[ws.rindex("\n") + 1:] if "\n" in ws else None  # None: compact
        self.open1, self.sep1 = ws, ("," + ws if self.unit is not None else ", ")  # outer object
        self.close1 = "\n" if self.unit is not None else ""

    # Inside the arguments object (depth 0) and the values nested in it (depth 1, 2, ...):
    def open(self, depth: int) -> str:
        return "\n" + self.unit * (depth + 2) if self.unit is not None else ""

    def sep(self, depth: int) -> str:
        return ",\n" + self.unit * (depth + 2) if self.unit is not None else ", "

    def close(self, depth: int) -> str:
        return "\n" + self.unit * (depth + 1) if self.unit is not None else ""

    def render(self, raw: str, depth: int) -> str:
        """A JSON object/array (raw text, e.g. copied from the prompt) as this style writes it when it
        opens a level at `depth`: compact `, ` / `: ` separators, or one item a line, indented."""
        value, ascii_only = json.loads(raw), "\\u" in raw  # keep the context's choice of escapes
        if self.unit is None:
            return json.dumps(value, ensure_ascii=ascii_only)
        text = json.dumps(value, indent=self.unit, ensure_ascii=ascii_only)
        return text.replace("\n", "\n" + self.unit * (depth + 1))  # json.dumps indents from column 0
