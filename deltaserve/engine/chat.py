"""Turn rendering that extends the session's token state instead of re-rendering history.

Chat templates re-render earlier assistant turns (tool calls above all) and
need not reproduce the tokens the model generated. If turn t+1 were rendered
from scratch, its prompt would diverge from the session's KV inside turn t's
reply and everything after would be recomputed. Instead, when the client
sends back the history we already hold (the same messages, and the reply we
produced), the new prompt is

    tokens of turn t (prompt + generated, incl. the end-of-turn token)
    + tokenize(template glue after that end-of-turn + rendering of the new messages)

so the history of turn t+1 extends the token state of turn t exactly. If the
history was edited, the turn is rendered in full and the radix match
recovers whatever prefix still agrees.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

from deltaserve.models.tokenizer import Tokenizer


@dataclass(frozen=True)
class Transcript:
    """What a turn's token state spells, in messages."""

    messages: list[dict[str, Any]] = field(default_factory=list)  # history incl. our last reply
    tools: list[dict[str, Any]] | None = None
    # prompt + generated of the turn, as `compact_tokens` keeps them (4 bytes a token, not a Python int)
    tokens: Sequence[int] = field(default_factory=list)


def compact_tokens(tokens: Sequence[int]) -> array:
    return array("i", tokens)


class Rendered(NamedTuple):
    tokens: list[int]
    reused_tokens: int  # leading tokens taken verbatim from the transcript
    mode: str  # "extended" or "full"


def _norm_content(c: Any) -> Any:
    if c is None or c == "":
        return ""
    if isinstance(c, list):  # content parts: keep the text
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return c


def _norm_calls(calls: Any) -> list[tuple[str, Any]]:
    out = []
    for c in calls or []:
        fn = c.get("function", c) if isinstance(c, dict) else {}
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        out.append((fn.get("name"), args))
    return out


def same_message(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal as far as a chat template can tell (tool-call ids and argument spacing aside)."""
    return (
        a.get("role") == b.get("role")
        and _norm_content(a.get("content")) == _norm_content(b.get("content"))
        and _norm_calls(a.get("tool_calls")) == _norm_calls(b.get("tool_calls"))
        and a.get("tool_call_id") == b.get("tool_call_id")
        and a.get("name") == b.get("name")
    )


def extends(prior: Transcript, messages: list[dict[str, Any]]) -> bool:
    """Whether `messages` are `prior`'s messages (our reply included) followed by at least one more."""
    n = len(prior.messages)
    return len(messages) > n and all(same_message(a, b) for a, b in zip(prior.messages, messages[:n]))


def render_turn(tok: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                prior: Transcript | None, template_kwargs: dict[str, Any] | None = None) -> Rendered:
    full_text = tok.render_chat(messages, tools, add_generation_prompt=True, template_kwargs=template_kwargs)
    # With template variables, history may render differently from how `prior` was rendered: render in full
    # (the prefix cache still reuses whatever KV the tokens share).
    if prior is not None and not template_kwargs and prior.tokens and (prior.tools or None) == (tools or None):
        n = len(prior.messages)
        if extends(prior, messages):
            hist_text = tok.render_chat(messages[:n], tools, add_generation_prompt=False)
            end = _end_of_turn(tok, hist_text)
            if full_text.startswith(hist_text) and end is not None:
                marker_id, glue = end
                # A reply cut by max_tokens has no end-of-turn token yet: the template adds one.
                head = list(prior.tokens) + ([] if prior.tokens[-1] == marker_id else [marker_id])
                delta = tok.encode(glue + full_text[len(hist_text):])
                return Rendered(head + delta, len(prior.tokens), "extended")
    return Rendered(tok.encode(full_text), 0, "full")


def _end_of_turn(tok: Tokenizer, hist_text: str) -> tuple[int, str] | None:
    """The last end-of-turn marker in the history and the template text after it (e.g. "\\n" after <|im_end|>)."""
    best: tuple[int, int] | None = None  # (end offset, token id)
    for tid in sorted(tok.stop_token_ids):
        marker = tok.decode([tid], skip_special_tokens=False)
        i = hist_text.rfind(marker) if marker else -1
        if i >= 0 and (best is None or i + len(marker) > best[0]):
            best = (i + len(marker), tid)
    return None if best is None else (best[1], hist_text[best[0]:])


def reply_message(content: str | None, tool_calls: list[dict[str, Any]] | None) -> dict[str, Any]:
    m: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        m["tool_calls"] = tool_calls
    return m
