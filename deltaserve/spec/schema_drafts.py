"""Schema drafts: speculation from the request's own tool definitions, so the FIRST tool call pays too.

History lookup (`lookup.py`) needs the call to have been seen before; a conversation's first call has no
such history, yet most of it is predictable from the request alone:

* the frame `<tool_call>\\n{"name": "`, `", "arguments": {` and `}}\\n</tool_call>` (Hermes/Qwen form; also a
  fenced or bare call object at the start of the output, which the parser accepts too), in the whitespace
  style the model chose at its first `{` (compact `", "` separators, or pretty-printed with its indent);
* the function name, once what was generated so far prefix-matches one tool (their common prefix before);
* the property names in schema order (a key prefix picks among the keys not yet written);
* enum values (prefix-matched), and values copied from the context: a value starting at `"` copies the
  context's value under the same key (`"key": "..."`), a value with a prefix copies the completion of the
  context's strings that start with that prefix (their common prefix when they disagree). The match is
  anchored at the opening quote, i.e. its length adapts to the value so far; the n-gram lookup's fixed
  trailing keys are what mislead it inside values;
* inside nested objects and arrays (shapes kept to a bounded depth): an object's `{"`, its keys in schema
  order with their values as above and its `}` after its last key; an array's `[` and its first item's
  start. An array's `, ` / `]` after an item is not certain from the schema: only a whole object or array
  the context holds under the same key (of the same shape, the written text a prefix of it, re-rendered in
  the call's whitespace style) is copied to its end.

The prediction is text; it becomes tokens by tokenizing the whole call (generated text + prediction) and
keeping the tail only when its head re-tokenizes to exactly the generated tokens, so a BPE merge across
the boundary yields no draft instead of a wrong one; likewise the tail's last tokens are dropped when text
following the prediction would merge with them (probed). Drafts stop at the first value that cannot be
predicted. Verification stays the engine's (lossless); this module only proposes.

The text prediction is `call_text.py`'s, from `call_shapes.py`'s `ToolDrafts` (the immutable description
the server puts in `SamplingParams.tool_drafts`, re-exported here); `SchemaDrafter` is the per-request
drafter the engine's speculator builds from it (it holds the request's decoded context and where its
current call starts; nothing else mutates).
"""

from __future__ import annotations

from typing import Any, Sequence

from deltaserve.spec.call_text import CALL_CLOSE, CALL_OPEN, CallContext, CallPredictor, ToolDrafts
from deltaserve.tokens import common_prefix_len

__all__ = ["SchemaDrafter", "ToolDrafts"]

# Openers of a call other than the tag, at the very start of the output (small models often skip the tags;
# the parser accepts both): -> what follows the object.
_UNTAGGED = (("```json\n", "\n```"), ("```\n", "\n```"), ("", ""))
_MAX_CONTEXT_TOKENS = 8192  # values are copied from the recent context; bounds the one-off decode
_PROBES = ("x", "0")  # text that may follow a prediction (a name, key or value goes on): its tokens must not change
_ITEM_PROBES = (",", "]", "}", "\n")  # ... and what may follow an array item (`2}` + `],` is `2`,`}],`)
_MAX_CONT_CHARS = 256  # a draft is <= k_max tokens; longer predictions are wasted tokenizer work


class SchemaDrafter:
    """Per-request drafter over the request's `ToolDrafts` (see the module docstring).

    `propose(output, k)` is called once per decode step with the tokens generated so far; it only reads
    them. State it keeps: the decoded context (prompt, once) and how far the output was scanned for the
    call opener, so each step does O(new tokens + call length) work.
    """

    def __init__(self, drafts: ToolDrafts, tokenizer: Any, prompt: Sequence[int]):
        self.tok = tokenizer
        self._open = list(tokenizer.encode(CALL_OPEN))
        self._prompt = list(prompt[-_MAX_CONTEXT_TOKENS:])
        self._drafts = drafts
        self._pred: CallPredictor | None = None  # built on the first call (decoding the prompt costs)
        self._pred_upto = -1  # output tokens (before the current call) its context includes
        self._scanned = 0
        self._tagged: int | None = None  # start of the latest `<tool_call>` in the output
        self._untagged: tuple[str, str] | None = None  # (opener, closer) of a call the output starts with

    def _find_call(self, output: Sequence[int]) -> tuple[int, str, str] | None:
        """(start, opener, closer) of the call the output is in, None outside one."""
        L = len(self._open)
        for i in range(max(0, self._scanned - L + 1), len(output) - L + 1):
            if L and output[i] == self._open[0] and list(output[i:i + L]) == self._open:
                self._tagged = i
        self._scanned = len(output)
        if self._tagged is not None:
            return self._tagged, CALL_OPEN + "\n", "\n" + CALL_CLOSE
        if self._untagged is None and output:
            head = self.tok.decode(list(output[:4]), skip_special_tokens=False)
            for opener, closer in _UNTAGGED:
                if head.startswith(opener + "{") or (opener and (opener + "{").startswith(head)):
                    self._untagged = (opener, closer)
                    break
            else:
                self._untagged = ("", "\0")  # decided: no call at the start
        if self._untagged is None or self._untagged[1] == "\0":
            return None
        return 0, *self._untagged

    def continuation_text(self, output: Sequence[int]) -> tuple[str, str, int] | None:
        """(the current call's text, predicted text after it, call start); None outside a call."""
        found = self._find_call(output)
        if found is None:
            return None
        start, opener, closer = found
        if self._pred is None or self._pred_upto != start:
            ctx = self.tok.decode(self._prompt + list(output[:start]), skip_special_tokens=False)
            self._pred, self._pred_upto = CallPredictor(self._drafts, CallContext(ctx)), start
        text = self.tok.decode(list(output[start:]), skip_special_tokens=False)
        return text, self._pred.continuation(text, opener, closer)[:_MAX_CONT_CHARS], start

    def propose(self, output: Sequence[int], k: int) -> list[int]:
        """Up to k draft tokens continuing `output` (empty: nothing predictable here)."""
        if k <= 0:
            return []
        found = self.continuation_text(output)
        if found is None or not found[1]:
            return []
        text, cont, start = found
        call = list(output[start:])
        ids = self.tok.encode(text + cont)
        # The generated tokens must be exactly how the whole text tokenizes up to here, or the
        # tail's tokenization is not what the model would continue with.
        if ids[:len(call)] != call:
            return []
        # The prediction's last tokens may merge with whatever text follows it (a name prefix `get_` is
        # `get`,`_` alone but `get`,`_weather` in full): keep only the tokens that stay the same whatever
        # follows (probed with a letter and a digit; after an array item, where the predictor stops,
        # with the `,` `]` `}` or newline that comes next too).
        m = len(call)
        end = min(len(ids), m + k)
        for probe in _PROBES + (_ITEM_PROBES if self._pred is not None and self._pred.ends_after_item else ()):
            end = m + common_prefix_len(ids[m:end], self.tok.encode(text + cont + probe)[m:end])
        return ids[m:end]
