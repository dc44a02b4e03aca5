"""The SSE body of a streamed `POST /v1/responses`: the Responses event sequence.

    response.created, response.in_progress,
    per output item: response.output_item.added,
      message: response.content_part.added, response.output_text.delta*, response.output_text.done,
               response.content_part.done
      function_call: response.function_call_arguments.delta, response.function_call_arguments.done
    response.output_item.done, ..., response.completed (the full Response, usage included)

Every event carries `type` and an increasing `sequence_number`, framed as `event: <type>` + `data: <json>`
(no `[DONE]`, as OpenAI). Text goes through the same `StreamingToolParser` as chat streaming, whose content
and calls equal the batch parse, so the streamed output equals the non-streamed one. An engine failure
mid-stream is an in-band `error` event.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from deltaserve.server.chat_api import limit_calls
from deltaserve.server.generation import Generation, engine_failure, server_aborted
from deltaserve.server.responses_items import call_item, item_id, message_item
from deltaserve.server.tool_parser import ContentDelta, StreamingToolParser, ToolCallDelta


class _Writer:
    """Numbers events and tracks the open output item (mutates its lists as events are made)."""

    def __init__(self) -> None:
        self.seq = 0
        self.output: list[dict[str, Any]] = []  # finished items, in order
        self.open: dict[str, Any] | None = None  # the item being streamed
        self.text: list[str] = []  # the open message's text so far

    def event(self, kind: str, **fields: Any) -> str:
        obj = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n\n"

    @property
    def index(self) -> int:
        return len(self.output)

    def text_delta(self, text: str) -> list[str]:
        out = []
        if self.open is not None and self.open["type"] != "message":
            out += self.close()
        if self.open is None:
            self.open, self.text = message_item(item_id("msg"), None, "in_progress"), []
            out.append(self.event("response.output_item.added", output_index=self.index, item=self.open))
            out.append(self.event("response.content_part.added", item_id=self.open["id"], output_index=self.index,
                                  content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        self.text.append(text)
        out.append(self.event("response.output_text.delta", item_id=self.open["id"], output_index=self.index,
                              content_index=0, delta=text, logprobs=[]))
        return out

    def call(self, call_id: str, name: str, arguments: str) -> list[str]:
        out = self.close()
        self.open = call_item(item_id("fc"), call_id, name, "", "in_progress")
        out.append(self.event("response.output_item.added", output_index=self.index, item=self.open))
        out.append(self.event("response.function_call_arguments.delta", item_id=self.open["id"],
                              output_index=self.index, delta=arguments))
        self.open = {**self.open, "arguments": arguments}
        return out

    def close(self) -> list[str]:
        """Finish the open item, if any."""
        item, self.open = self.open, None
        if item is None:
            return []
        i, out = self.index, []
        if item["type"] == "message":
            text = "".join(self.text)
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            out.append(self.event("response.output_text.done", item_id=item["id"], output_index=i, content_index=0,
                                  text=text, logprobs=[]))
            out.append(self.event("response.content_part.done", item_id=item["id"], output_index=i,
                                  content_index=0, part=part))
            item = message_item(item["id"], text)
        else:
            out.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                  name=item["name"], arguments=item["arguments"]))
            item = {**item, "status": "completed"}
        out.append(self.event("response.output_item.done", output_index=i, item=item))
        self.output.append(item)
        return out


async def stream_events(turn: Any, gen: Generation) -> AsyncIterator[str]:
    """`turn`: the `responses_api.Turn` being answered; stores it (when asked) before `response.completed`."""
    w = _Writer()
    plan = turn.plan
    parser = StreamingToolParser(plan.tool_names) if plan.tool_names is not None else None
    content: list[str] = []
    calls: list[dict[str, Any]] = []

    def handle(events: list) -> list[str]:
        out = []
        for ev in events:
            if isinstance(ev, ContentDelta):
                if ev.text:
                    content.append(ev.text)
                    out += w.text_delta(ev.text)
            elif isinstance(ev, ToolCallDelta) and ev.id is not None:
                if plan.max_calls is not None and ev.index >= plan.max_calls:
                    continue  # parallel_tool_calls false: calls after the first are dropped
                calls.append({"id": ev.id, "type": "function", "function": {"name": ev.name, "arguments": ""}})
            elif isinstance(ev, ToolCallDelta) and (plan.max_calls is None or ev.index < plan.max_calls):
                # the parser emits a call as a header then its whole arguments
                calls[-1]["function"]["arguments"] = ev.arguments
                out += w.call(calls[-1]["id"], calls[-1]["function"]["name"], ev.arguments)
        return out

    start = turn.response("in_progress", [], None)
    yield w.event("response.created", response=start)
    yield w.event("response.in_progress", response=start)
    try:
        async for text in gen.deltas():
            for c in handle(parser.feed(text) if parser is not None else [ContentDelta(text)]):
                yield c
    except RuntimeError as e:
        err = engine_failure(e).body()["error"]
        yield w.event("error", code=err.get("code"), message=err.get("message"), param=None)
        return
    if gen.aborted:  # by the server (shutting down): a client disconnect cancels this generator at its `yield`
        err = server_aborted().body()["error"]
        yield w.event("error", code=err.get("code"), message=err.get("message"), param=None)
        return
    for c in handle(parser.finish()) if parser is not None else []:
        yield c
    for c in w.close():
        yield c
    n_parsed = len(parser.tool_calls) if parser is not None else 0
    _, exact = limit_calls([None] * n_parsed, plan.max_calls)
    text = "".join(content)
    final = turn.finish(gen, text if (text or parser is None) else None, calls, exact, w.output)
    yield w.event("response.completed" if final["status"] == "completed" else "response.incomplete",
                  response=final)
