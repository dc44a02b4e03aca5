"""Responses chains the ingress has proxied, kept as transcripts so a chain outlives the replica that held it.

A `previous_response_id` names a response stored on one replica (its token state and items). When that replica
dies or leaves, the id is gone with it; the ingress, which saw every request and answer of the chain, rebuilds
the request instead: the chain's items so far (every turn's input items, then its output items) + this request's
input, as `input`, without `previous_response_id`, and the chain's tools when the request names none (a
continuation inherits them). `instructions` are not kept: a continuation does not inherit them (OpenAI, and the
single server), so the request's own instructions are already the right ones. The rebuilt request renders the
same messages the chain would have, recomputed from text (a prefill instead of the stored KV state).

`TranscriptStore` mutates one LRU table, (Authorization header, response id) -> `Transcript`, bounded by count:
keyed by the caller's key so one tenant's ids never rebuild from another's chain. Transcripts share their items
(a chain of n turns holds n lists of references to the same dicts, not n copies). Ray-free.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_TRANSCRIPTS = 4096


@dataclass(frozen=True)
class Transcript:
    items: tuple  # input and output items of the whole chain, in order
    tools: Any  # the tools in force (a request's own, or inherited); None when none


def input_items(raw: Any) -> list | None:
    """A request's `input` as a list of items (a string is one user message); None when it is neither."""
    if isinstance(raw, str):
        return [{"type": "message", "role": "user", "content": raw}]
    return list(raw) if isinstance(raw, list) else None


class TranscriptStore:
    def __init__(self, max_entries: int = DEFAULT_MAX_TRANSCRIPTS):
        self.max_entries = max_entries
        self._table: OrderedDict[tuple[str | None, str], Transcript] = OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def get(self, owner: str | None, response_id: str | None) -> Transcript | None:
        """The chain up to `response_id` (touched: most recently used), or None if unknown to this owner."""
        if response_id is None:
            return None
        t = self._table.get((owner, response_id))
        if t is not None:
            self._table.move_to_end((owner, response_id))
        return t

    def rebuild(self, owner: str | None, body: dict) -> dict | None:
        """`body` (a `/v1/responses` request with `previous_response_id`) as a self-contained request, or None
        when the chain is unknown (the replica's own 404 then stands). Does not mutate the store."""
        prior = self.get(owner, body.get("previous_response_id"))
        new = input_items(body.get("input"))
        if prior is None or new is None:
            return None
        out = {k: v for k, v in body.items() if k != "previous_response_id"}
        out["input"] = [*prior.items, *new]
        if out.get("tools") is None and prior.tools is not None:
            out["tools"] = prior.tools
        return out

    def record(self, owner: str | None, body: dict, response: Any, prior: Transcript | None = None) -> None:
        """Learn the transcript of `response` (a Response object the replica answered `body` with); mutates the
        table. `prior`: the chain `body` continued, if it was rebuilt (its `previous_response_id` is gone from
        the body then). Unstored responses (a continuation would 404 on any server) and chains whose start this
        ingress did not see are not kept."""
        if not isinstance(response, dict) or not isinstance(response.get("id"), str):
            return
        if response.get("store") is False or not isinstance(response.get("output"), list):
            return
        prev = body.get("previous_response_id")
        if prior is None and prev is not None:
            prior = self.get(owner, prev)
            if prior is None:
                return
        new = input_items(body.get("input"))
        if new is None:
            return
        tools = body.get("tools") if body.get("tools") is not None else (prior.tools if prior else None)
        items = (*(prior.items if prior else ()), *new, *response["output"])
        self._table[(owner, response["id"])] = Transcript(items, tools)
        self._table.move_to_end((owner, response["id"]))
        while len(self._table) > self.max_entries:
            self._table.popitem(last=False)


def final_response(event_data: bytes) -> dict | None:
    """The Response object of a Responses stream's last event (`response.completed` / `response.incomplete`),
    from one SSE event's bytes; None for every other event."""
    for line in event_data.split(b"\n"):
        if line.startswith(b"data:") and (b'"response.completed"' in line or b'"response.incomplete"' in line):
            try:
                v = json.loads(line[5:])
            except ValueError:
                return None
            if isinstance(v, dict) and v.get("type") in ("response.completed", "response.incomplete"):
                r = v.get("response")
                return r if isinstance(r, dict) else None
    return None
