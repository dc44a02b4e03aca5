"""Grammar-constrained decoding adapter (backed by ``llguidance``).

Guarantees that generated text is valid against a JSON schema
(``response_format: json_schema``) or is a Hermes-style tool call naming one
of the offered tools with schema-valid arguments (``tool_choice: "required"``
or a named function).  The grammar work (JSON-schema compilation, Earley
parsing, token-trie mask computation) is done by the maintained ``llguidance``
library; this module only adapts it to the engine's torch world:

* :class:`GrammarCompiler` -- one per tokenizer (building it costs ~1-3 s);
  turns schemas / tool lists into :class:`GrammarMatcher` objects.  Compiled
  grammars are cached, so a repeated schema costs a ``deep_copy``.
* :class:`GrammarMatcher` -- one per request, stateful: next-token masks,
  ``accept``, ``rollback`` (for speculative decoding), termination.

Shapes: ``V`` is ``vocab_size``, the model's logits width (may exceed the
tokenizer's size; the extra ids are never allowed).  Masks are
``torch.bool`` tensors, ``True`` = allowed.

JSON is constrained to the compact-with-spaces form ``json.dumps`` writes by
default (``", "`` between items, ``": "`` after keys, no other whitespace):
it is what instruction-tuned models emit naturally, and forbidding free
whitespace removes the classic "endless newlines" failure of constrained
small models.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np
import torch

try:  # the grammar engine is a hard requirement of this module only
    import llguidance
    from llguidance import LLMatcher, LLTokenizer
except ImportError as exc:  # pragma: no cover - exercised only without the dep
    raise ImportError(
        "deltaserve.server.grammar needs llguidance: pip install 'llguidance>=1.9,<2'"
    ) from exc

__all__ = ["GrammarCompiler", "GrammarMatcher", "GrammarError", "JSON_OPTIONS"]

#: llguidance JSON options (``x-guidance``): json.dumps-style separators only.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}

_TOOL_CALL_OPEN = "<tool_call>"
_TOOL_CALL_CLOSE = "</tool_call>"


class GrammarError(ValueError):
    """The schema / tool list could not be compiled into a grammar."""


# --------------------------------------------------------------------------- #
# Compiler
# --------------------------------------------------------------------------- #


class GrammarCompiler:
    """Builds per-request matchers for one tokenizer.

    Args:
        hf_tokenizer: a ``transformers.PreTrainedTokenizerFast`` (e.g. loaded
            with ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``).
        vocab_size: the model's logits width ``V`` (>= the tokenizer size).
        eos_token_ids: tokens that end the turn; default the tokenizer's
            ``eos_token_id``.  They are allowed only once the grammar is
            complete, and are then the only allowed tokens.
        cache_size: number of compiled grammars kept (LRU).
    """

    def __init__(
        self,
        hf_tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Sequence[int] | None = None,
        cache_size: int = 64,
    ) -> None:
        import llguidance.hf  # imports transformers; keep it off the module path
        import transformers

        if eos_token_ids is None:
            eos = hf_tokenizer.eos_token_id
            if eos is None:
                raise ValueError("tokenizer has no eos_token_id; pass eos_token_ids")
            eos_token_ids = [int(eos)]
        self.eos_token_ids: list[int] = [int(t) for t in eos_token_ids]
        if not self.eos_token_ids:
            raise ValueError("eos_token_ids must not be empty")
        self.vocab_size = int(vocab_size)
        if not isinstance(hf_tokenizer, transformers.PreTrainedTokenizerFast):
            raise TypeError("grammar decoding needs a fast (tokenizers-backed) HF tokenizer, "
                            f"got {type(hf_tokenizer).__name__}")
        # raises ValueError when vocab_size is smaller than the tokenizer
        self.ll_tokenizer: LLTokenizer = llguidance.hf.from_tokenizer(
            hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.eos_token_ids
        )
        self._tool_open = self._marker(hf_tokenizer, _TOOL_CALL_OPEN)
        self._tool_close = self._marker(hf_tokenizer, _TOOL_CALL_CLOSE)
        self._cache: OrderedDict[str, LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    # -- public -----------------------------------------------------------------

    def for_json_schema(self, schema: dict) -> "GrammarMatcher":
        """Matcher whose complete outputs are JSON values valid against ``schema``.

        ``{}`` means any JSON value; ``{"type": "object"}`` is JSON mode.
        Raises :class:`GrammarError` for a schema llguidance cannot compile.
        """
        if not isinstance(schema, dict):
            raise GrammarError("JSON schema must be an object")
        grammar = LLMatcher.grammar_from_json_schema(_with_options(schema))
        return self._matcher(grammar)

    def for_tool_call(
        self,
        tools: list[dict],
        required_name: str | None = None,
        style: str = "hermes",
        parallel: bool = False,
    ) -> "GrammarMatcher":
        """Matcher for a forced tool call, then end of turn.

        ``style="hermes"`` produces
        ``<tool_call>\\n{"name": N, "arguments": A}\\n</tool_call>`` where ``N``
        is ``required_name`` (or any tool's name when ``None``) and ``A`` is
        valid against that tool's ``parameters`` schema.  ``style="json"``
        produces just the ``{"name": ..., "arguments": ...}`` object.
        ``parallel=True`` allows several ``<tool_call>`` blocks separated by
        ``"\\n"`` (hermes only).  ``tools`` are OpenAI tool dicts
        (``{"type": "function", "function": {...}}``) or bare function dicts.
        """
        body = tool_call_schema(tools, required_name)
        if style == "json":
            if parallel:
                raise GrammarError("parallel tool calls need style='hermes'")
            return self._matcher(LLMatcher.grammar_from_json_schema(body))
        if style != "hermes":
            raise GrammarError(f"unknown tool-call style {style!r}")
        repeat = ' ("\\n" call)*' if parallel else ""
        lark = (
            f"start: call{repeat}\n"
            f"call: {self._tool_open} \"\\n\" body \"\\n\" {self._tool_close}\n"
            f"body: %json {json.dumps(body)}\n"
        )
        return self._matcher(LLMatcher.grammar_from_lark(lark))

    def for_tool_call_or_json(self, tools: list[dict], schema: dict, parallel: bool = True) -> "GrammarMatcher":
        """Matcher for ``tool_choice: "auto"`` with a JSON output format: either Hermes tool call(s) as in
        :meth:`for_tool_call` (several when ``parallel``) or a JSON value valid against ``schema`` -- the
        model picks the branch with its first tokens, and each branch is fully constrained. A call may also
        be the bare ``{"name": ..., "arguments": ...}`` object (no tags): some models (Qwen2.5-Coder) call
        tools that way, and the tool-call parser reads both forms."""
        if not isinstance(schema, dict):
            raise GrammarError("JSON schema must be an object")
        body = tool_call_schema(tools)
        repeat = ' ("\\n" call)*' if parallel else ""
        lark = (
            "start: calls | answer\n"
            f"calls: call{repeat}\n"
            f"call: {self._tool_open} \"\\n\" body \"\\n\" {self._tool_close} | body\n"
            f"body: %json {json.dumps(body)}\n"
            f"answer: %json {json.dumps(_with_options(schema))}\n"
        )
        return self._matcher(LLMatcher.grammar_from_lark(lark))

    def for_text_or_tool_call(self, tools: list[dict], parallel: bool = True) -> "GrammarMatcher":
        """Matcher for ``tool_choice: "auto"`` with ``strict`` tools: any output in which every tool call -- bare
        ``{"name": N, "arguments": A}`` or inside ``<tool_call>`` tags, anywhere among free text -- has ``A``
        valid against ``N``'s schema (a tool not marked strict takes any JSON object); at most one call unless
        ``parallel``.

        The text between calls is free except that it cannot name a tool as a JSON value (``: "N"``): everything
        the tool-call parser could read as a call names its tool that way, so every call goes through the
        constrained ``head args "}"`` branch, while text the parser keeps as content -- JSON naming no tool,
        braces, stray tags -- is allowed as the model writes it. That is what makes enforcement invisible when
        the model's own output is already valid: every prefix of such an output is allowed, so greedy decoding
        picks the same tokens with or without the grammar (a narrower grammar, which forbade text after calls
        or starting with ``{``, turned Qwen2.5-Coder's trailing non-call JSON into extra calls).

        Lexing (llguidance lexes greedily, without backtracking): a call's head ``{"name": "N", "arguments": ``
        is one lexeme, which outlives the text lexeme (that dies at ``: "N"``). Text is split into lexemes only
        at ``{`` (``TEXT`` starts with anything else, ``BRACE`` with ``{``; ``TEXT`` only first in a run), so no
        ``: "N"`` can straddle two text lexemes."""
        fns = [_strict_or_loose(t) for t in tools]
        if not fns:
            raise GrammarError("tool call grammar needs at least one tool")
        heads, seen = [], []
        for i, fn in enumerate(fns):
            if fn["name"] in seen:
                continue
            seen.append(fn["name"])
            params = fn.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
            if not isinstance(params, dict):
                raise GrammarError(f"parameters of {fn['name']!r} must be a JSON schema object")
            head = '{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "arguments": '  # as models write it
            heads.append(f"call_{i}: {json.dumps(head, ensure_ascii=False)} args_{i} \"}}\"\n"
                         f"args_{i}: %json {json.dumps(_with_options(params))}\n")
        calls = " | ".join(h.split(":", 1)[0] for h in heads)
        # Qwen's tags are special tokens: items of their own (no text lexeme can hold one); tags spelled as
        # text are just text, and a call between them is still a head lexeme
        special = self._tool_open.startswith("<[") and self._tool_close.startswith("<[")
        tag = f"tag: {self._tool_open} | {self._tool_close}\n" if special else ""
        after = "(tag texts)*" if special else ""
        names = "|".join(_json_string_regex(n) for n in seen).replace("/", "\\/")  # lark's regex delimiter
        named = f'~/(?s:.*:[ \\t\\n\\r]*"(?:{names})".*)/'
        start = (f"start: texts {after} (call texts {after})*\n" if parallel
                 else f"start: texts {after} (call texts {after})?\n")
        lark = (
            start + tag
            + f"call: {calls}\n" + "".join(heads)
            + "texts: TEXT? BRACE*\n"
            + f"TEXT: /[^{{]+/ & {named}\n"
            + f"BRACE: /\\{{[^{{]*/ & {named}\n"
        )
        return self._matcher(LLMatcher.grammar_from_lark(lark))

    # -- internals --------------------------------------------------------------

    def _marker(self, hf_tokenizer: Any, text: str) -> str:
        """Lark for a tag: the single special token if there is one, else text."""
        tid = hf_tokenizer.convert_tokens_to_ids(text)
        unk = getattr(hf_tokenizer, "unk_token_id", None)
        if isinstance(tid, int) and tid != unk and tid < self.vocab_size:
            if self.ll_tokenizer.is_special_token(tid):
                return f"<[{tid}]>"
        return json.dumps(text)

    def _matcher(self, grammar: str) -> "GrammarMatcher":
        with self._lock:
            template = self._cache.get(grammar)
            if template is not None:
                self._cache.move_to_end(grammar)
        if template is None:
            is_err, msgs = LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
            if is_err:
                raise GrammarError("; ".join(msgs) or "invalid grammar")
            template = LLMatcher(self.ll_tokenizer, grammar, log_level=0)
            if template.is_error():
                raise GrammarError(template.get_error())
            with self._lock:
                self._cache[grammar] = template
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return GrammarMatcher(template.deep_copy(), self.vocab_size, self.eos_token_ids)


def _with_options(schema: dict) -> dict:
    """Copy of ``schema`` carrying :data:`JSON_OPTIONS` as its ``x-guidance``."""
    out = dict(schema)
    out["x-guidance"] = {**JSON_OPTIONS, **schema.get("x-guidance", {})}
    return out


def _json_string_regex(text: str) -> str:
    """Regex for the body of a JSON string literal that decodes to ``text``: each character literal or
    ``\\u``-escaped (hex digits in either case; surrogate pairs outside the BMP), or its short escape."""
    short = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
             "\t": "\\t"}
    out = []
    for ch in text:
        units = ch.encode("utf-16-be")
        esc = "".join("\\\\u" + "".join(f"[{d.lower()}{d.upper()}]" if d.isalpha() else d
                                       for d in f"{int.from_bytes(units[k:k + 2], 'big'):04x}")
                      for k in range(0, len(units), 2))
        alts = [re.escape(ch) if ch not in '"\\' else None, esc, re.escape(short[ch]) if ch in short else None]
        out.append("(?:" + "|".join(a for a in alts if a) + ")")
    return "".join(out)


def _strict_or_loose(tool: dict) -> dict:
    """A tool as the strict grammar sees it: its own schema when marked ``strict``, else any JSON object."""
    fn = _function_of(tool)
    if fn.get("strict"):
        return fn
    return {**fn, "parameters": {"type": "object"}}


def has_strict_tools(tools: list[dict] | None) -> bool:
    return any(_function_of(t).get("strict") for t in tools or [])


def _function_of(tool: dict) -> dict:
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise GrammarError(f"tool without a function name: {tool!r}")
    return fn


def tool_call_schema(tools: list[dict], required_name: str | None = None) -> dict:
    """JSON schema of ``{"name": const, "arguments": params}`` (anyOf over tools).

    Each tool's ``parameters`` is moved under ``$defs`` and its internal
    ``$ref``s (``#``, ``#/$defs/..``, ``#/definitions/..``) are rebased, so
    pydantic-style schemas with definitions keep working.  A tool without
    ``parameters`` takes exactly ``{}``.
    """
    fns = [_function_of(t) for t in tools or []]
    if required_name is not None:
        fns = [f for f in fns if f["name"] == required_name]
        if not fns:
            raise GrammarError(f"tool_choice names unknown function {required_name!r}")
    if not fns:
        raise GrammarError("tool call grammar needs at least one tool")
    defs: dict[str, Any] = {}
    branches = []
    seen: set[str] = set()
    for i, fn in enumerate(fns):
        if fn["name"] in seen:
            continue
        seen.add(fn["name"])
        params = fn.get("parameters")
        if not params:
            params = {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(params, dict):
            raise GrammarError(f"parameters of {fn['name']!r} must be a JSON schema object")
        key = f"tool{i}"
        _hoist(params, key, defs)
        branches.append({
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": {"$ref": f"#/$defs/{key}"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        })
    schema: dict[str, Any] = branches[0] if len(branches) == 1 else {"anyOf": branches}
    schema = {**schema, "$defs": defs, "x-guidance": dict(JSON_OPTIONS)}
    return schema


def _hoist(params: dict, key: str, defs: dict) -> None:
    """Store ``params`` as ``defs[key]`` (its own defs as ``key__name``), rebasing refs."""
    params = copy.deepcopy(params)
    local: dict[str, Any] = {}
    for section in ("$defs", "definitions"):
        for name, sub in (params.pop(section, None) or {}).items():
            local[f"{section}/{name}"] = sub

    def rebase(ref: str) -> str:
        if ref == "#":
            return f"#/$defs/{key}"
        for section in ("$defs", "definitions"):
            prefix = f"#/{section}/"
            if ref.startswith(prefix):
                name, _, rest = ref[len(prefix):].partition("/")
                return f"#/$defs/{key}__{section.strip('$')}__{name}" + (f"/{rest}" if rest else "")
        if ref.startswith("#/"):
            return f"#/$defs/{key}/{ref[2:]}"
        return ref

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (rebase(v) if k == "$ref" and isinstance(v, str) else walk(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    params.pop("$schema", None)
    defs[key] = walk(params)
    for qual, sub in local.items():
        section, name = qual.split("/", 1)
        defs[f"{key}__{section.strip('$')}__{name}"] = walk(sub)


# --------------------------------------------------------------------------- #
# Matcher
# --------------------------------------------------------------------------- #


class GrammarMatcher:
    """Per-request grammar state.  Not thread-safe; one request drives it.

    Lifecycle: ``allowed_mask()``/``apply_mask()`` -> sample -> ``accept()``
    ... until an EOS token is accepted (``is_terminated()``).  EOS is allowed
    exactly when the grammar is complete (``is_complete()``); once the
    grammar cannot be extended, EOS is the only allowed token.
    """

    def __init__(self, matcher: LLMatcher, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._m = matcher
        self.vocab_size = vocab_size
        self._eos = frozenset(eos_token_ids)
        self._eos_first = eos_token_ids[0]
        self._history: list[int] = []  # accepted tokens; EOS only ever last
        self._terminated = False
        self._mask: torch.Tensor | None = None  # cache for the current state
        self._forbidden: torch.Tensor | None = None  # ~_mask on the last logits device

    # -- masks ------------------------------------------------------------------

    def allowed_mask(self) -> torch.Tensor:
        """Bool ``[V]`` on CPU: tokens allowed next (a fresh tensor each call)."""
        return self._current_mask().clone()

    def fill_mask(self, out: torch.Tensor) -> None:
        """Write the allowed mask into ``out`` (bool ``[V]``, any device)."""
        out.copy_(self._current_mask())

    def apply_mask(self, logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Set forbidden logits to ``-inf`` in place and return ``logits``.

        ``logits``: ``[V']`` or ``[n, V']`` (any device/float dtype).  ``mask``:
        bool ``[V]`` or ``[n, V]`` (default: the current mask, broadcast over
        rows -- pass :meth:`draft_masks` for per-position masks).  Columns
        beyond ``V`` are forbidden.
        """
        if mask is None:
            mask = self._current_mask()
        width = logits.shape[-1]
        if mask.shape[-1] != self.vocab_size:
            raise ValueError(f"mask width {mask.shape[-1]} != vocab_size {self.vocab_size}")
        if width > mask.shape[-1]:
            logits[..., mask.shape[-1]:] = float("-inf")
            width = mask.shape[-1]
        if mask is self._mask:
            forbidden = self._forbidden_on(logits.device)
        else:
            forbidden = ~mask.to(device=logits.device, non_blocking=True)
        logits[..., :width].masked_fill_(forbidden[..., :width], float("-inf"))
        return logits

    def draft_masks(self, draft_tokens: Sequence[int]) -> torch.Tensor:
        """Bool ``[k+1, V]``: row ``i`` is the mask after ``draft_tokens[:i]``.

        For verifying ``k`` speculative tokens in one forward pass.  The state
        is left unchanged.  Rows after the first grammar-invalid draft token
        are all ``True`` (verification must stop at that token anyway).
        """
        rows = [self._current_mask()]
        n_ok = 0
        for tok in draft_tokens:
            if not self.accept(tok):
                break
            n_ok += 1
            rows.append(self._current_mask())
        if n_ok:
            self.rollback(n_ok)
        while len(rows) < len(draft_tokens) + 1:
            rows.append(torch.ones(self.vocab_size, dtype=torch.bool))
        return torch.stack(rows)

    # -- state transitions ------------------------------------------------------

    def accept(self, token_id: int) -> bool:
        """Advance by one token.  Returns ``False`` (state unchanged) if forbidden."""
        token_id = int(token_id)
        if self._terminated or not 0 <= token_id < self.vocab_size:
            return False
        if token_id in self._eos:
            if not bool(self._current_mask()[token_id]):
                return False
            self._terminated = True
            self._history.append(token_id)
            self._mask = self._forbidden = None
            return True
        # validate first: consuming a bad token would put llguidance in a sticky error state
        if self._m.validate_tokens([token_id]) != 1 or not self._m.consume_token(token_id):
            return False
        self._history.append(token_id)
        self._mask = self._forbidden = None
        return True

    def accept_many(self, token_ids: Sequence[int]) -> int:
        """Accept the longest allowed prefix of ``token_ids``; returns its length."""
        n = 0
        for tok in token_ids:
            if not self.accept(tok):
                break
            n += 1
        return n

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` accepted tokens (EOS included)."""
        if n < 0 or n > len(self._history):
            raise ValueError(f"cannot roll back {n} of {len(self._history)} tokens")
        if n == 0:
            return
        if self._terminated:
            self._terminated = False
            self._history.pop()
            n -= 1
        if n:
            if not self._m.rollback(n) or self._m.is_error():  # pragma: no cover
                raise RuntimeError(f"llguidance rollback failed: {self._m.get_error()}")
            del self._history[-n:]
        self._mask = self._forbidden = None

    def reset(self) -> None:
        """Back to the initial state."""
        self.rollback(len(self._history))

    # -- queries ----------------------------------------------------------------

    def is_terminated(self) -> bool:
        """True once an EOS token has been accepted."""
        return self._terminated

    def is_complete(self) -> bool:
        """True when the output so far is a complete match (EOS allowed now)."""
        return self._terminated or self._m.is_accepting()

    @property
    def num_accepted(self) -> int:
        """Tokens accepted so far (EOS included)."""
        return len(self._history)

    @property
    def accepted_tokens(self) -> list[int]:
        return list(self._history)

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (may be empty); useful for jump-ahead."""
        return [] if self._terminated else list(self._m.compute_ff_tokens())

    # -- internals --------------------------------------------------------------

    def _forbidden_on(self, device: torch.device) -> torch.Tensor:
        """``~mask`` of the current state on ``device`` (cached until the state changes)."""
        cached = self._forbidden
        if cached is None or cached.device != device:
            cached = (~self._current_mask()).to(device=device, non_blocking=True)
            self._forbidden = cached
        return cached

    def _current_mask(self) -> torch.Tensor:
        if self._mask is None:
            if self._terminated:
                mask = torch.zeros(self.vocab_size, dtype=torch.bool)
                mask[self._eos_first] = True
            else:
                bits = np.frombuffer(self._m.compute_bitmask(), dtype=np.uint8)
                unpacked = np.unpackbits(bits, bitorder="little")[: self.vocab_size]
                mask = torch.from_numpy(unpacked.astype(np.bool_))
            self._mask = mask
        return self._mask
