"""Responses API items <-> chat-template messages, and what a stored response shows.

Input items (`input` as a string or a list):
* `message` (the `type` may be omitted): role user / system / developer / assistant; content a string or
  parts `input_text` / `output_text` (text only);
* `function_call` {call_id, name, arguments}: joins the assistant message right before it (or starts one);
* `function_call_output` {call_id, output}: a `tool` message.
Anything else (images, files, reasoning, item references, built-in tool calls) is a 400 naming `input[i]`.

`StoredView` is what a stored response shows beyond its token state: the Response object returned, this request's
input items (for `GET .../input_items`) and the conversation as template messages (without the instructions,
which OpenAI does not carry over a `previous_response_id`): what a continuation appends to, and what it
re-renders from when its instructions change. The engine keeps it on the turn's `TurnRecord` (`view`), in the
one bounded store of finished turns, owned by the API key like every record.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from deltaserve.server.errors import bad_request


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content parts", where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.content[{j}]: content parts of type {kind!r} are not supported (text only)",
                              f"{where}.content[{j}]", "unsupported")
        out.append(part["text"])
    return "".join(out)


def normalize_input(raw: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's input as Responses items with ids (as `GET .../input_items` lists them); 400 on bad items."""
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": raw}]
    if not raw:
        raise bad_request("input must not be empty", "input")
    items = []
    for i, it in enumerate(raw):
        where = f"input[{i}]"
        kind = it.get("type", "message" if "role" in it else None)
        if kind == "message":
            role = it.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(f"{where}: unsupported message role {role!r}", f"{where}.role")
            part = "output_text" if role == "assistant" else "input_text"
            items.append({"id": it.get("id") or item_id("msg"), "type": "message", "role": role,
                          "status": "completed",
                          "content": [{"type": part, "text": _text(it.get("content"), where)}]})
        elif kind == "function_call":
            for k in ("call_id", "name", "arguments"):
                if not isinstance(it.get(k), str):
                    raise bad_request(f"{where}: function_call needs a string {k!r}", f"{where}.{k}")
            items.append({"id": it.get("id") or item_id("fc"), "type": "function_call", "call_id": it["call_id"],
                          "name": it["name"], "arguments": it["arguments"], "status": "completed"})
        elif kind == "function_call_output":
            if not isinstance(it.get("call_id"), str):
                raise bad_request(f"{where}: function_call_output needs a string 'call_id'", f"{where}.call_id")
            items.append({"id": it.get("id") or item_id("fco"), "type": "function_call_output",
                          "call_id": it["call_id"], "output": _text(it.get("output"), where), "status": "completed"})
        else:
            raise bad_request(f"{where}: input items of type {kind!r} are not supported (message, function_call, "
                              "function_call_output)", f"{where}.type", "unsupported")
    return items


def to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Normalized items as template messages; a function_call joins the assistant message just before it."""
    out: list[dict[str, Any]] = []
    for it in items:
        if it["type"] == "message":
            role = "system" if it["role"] == "developer" else it["role"]
            out.append({"role": role, "content": it["content"][0]["text"]})
        elif it["type"] == "function_call":
            call = {"id": it["call_id"], "type": "function",
                    "function": {"name": it["name"], "arguments": it["arguments"]}}
            if out and out[-1]["role"] == "assistant":
                out[-1] = {**out[-1], "tool_calls": [*(out[-1].get("tool_calls") or []), call]}
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": it["call_id"], "content": it["output"]})
    return out


def output_items(content: str | None, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A reply as output items: a `message` (when it has text), then its `function_call`s.
    `calls` are chat tool-call dicts ({id, function: {name, arguments}})."""
    items = []
    if content:
        items.append(message_item(item_id("msg"), content))
    for c in calls:
        items.append(call_item(item_id("fc"), c["id"], c["function"]["name"], c["function"]["arguments"]))
    return items


def message_item(iid: str, text: str | None, status: str = "completed") -> dict[str, Any]:
    content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": iid, "type": "message", "role": "assistant", "status": status, "content": content}


def call_item(iid: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"id": iid, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


@dataclass(frozen=True)
class StoredView:
    """What a stored response shows (`TurnRecord.view`: kept by the engine with the turn's token state)."""

    response: dict[str, Any]  # the Response object as returned
    input_items: list[dict[str, Any]]  # this request's input, normalized
    history: list[dict[str, Any]]  # template messages of the whole conversation incl. the reply, no instructions

    def to_json(self) -> dict[str, Any]:
        """What the session store keeps of it (a record restored from disk carries this dict as its view)."""
        return {"stored_view": 1, "response": self.response, "input_items": self.input_items, "history": self.history}

    @classmethod
    def from_any(cls, view: Any) -> "StoredView | None":
        """The view of a record: kept as is, or rebuilt from `to_json`'s dict; None for a record without one."""
        if isinstance(view, cls):
            return view
        if isinstance(view, dict) and view.get("stored_view") == 1:
            return cls(view["response"], view["input_items"], view["history"])
        return None
