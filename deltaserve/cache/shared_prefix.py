"""Opt-in sharing of declared prefixes across tenants (`--shared-prefix PATH`).

Tenants' caches are separate namespaces of the radix tree: nothing one tenant computed is ever matched by another.
An operator may declare prefixes (system prompts with their tool definitions) that every tenant may share: such a
prefix is stored once, in the tree's shared namespace, and a tenant whose prompt starts with it exactly is given
the same KV slots under its own namespace (the allocator counts the holders; `SlotAllocator.share`). Nothing else
crosses: a prompt that only *partly* matches a declared prefix, or goes on past it, shares just the declared
tokens, and whatever a tenant adds after them stays in its own namespace.

`PATH` is a JSON list; each entry is `{"messages": [...], "tools": [...]?}` (rendered with the model's chat
template, without a generation prompt), `{"text": "..."}` (tokenized as is) or `{"tokens": [ids]}`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

SHARED_NAMESPACE = "\x00shared"  # no tenant namespace starts with NUL (server/context.cache_namespace)


class SharedPrefixError(ValueError):
    """A --shared-prefix file that cannot be used (the message says which entry and why)."""


def load_shared_prefixes(path: str | Path, tokenizer: Any) -> list[tuple[int, ...]]:
    """The declared prefixes as token ids, longest first (a prompt shares the longest one it starts with)."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SharedPrefixError(f"--shared-prefix {path}: {e}") from e
    if not isinstance(entries, list) or not entries:
        raise SharedPrefixError(f"--shared-prefix {path}: expected a non-empty JSON list of prefixes")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise SharedPrefixError(f"--shared-prefix {path}: entry {i} is not an object")
        if "tokens" in e:
            ids = e["tokens"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and t >= 0 for t in ids):
                raise SharedPrefixError(f"--shared-prefix {path}: entry {i}: tokens must be a list of token ids")
        elif "text" in e:
            ids = tokenizer.encode(str(e["text"]))
        elif "messages" in e:
            try:
                ids = tokenizer.apply_chat(e["messages"], e.get("tools"), add_generation_prompt=False)
            except Exception as err:  # the template's own error, named
                raise SharedPrefixError(f"--shared-prefix {path}: entry {i}: cannot render: {err}") from err
        else:
            raise SharedPrefixError(f"--shared-prefix {path}: entry {i} needs messages, text or tokens")
        if len(ids) < 2:
            raise SharedPrefixError(f"--shared-prefix {path}: entry {i} is shorter than 2 tokens")
        out.append(tuple(int(t) for t in ids))
    return sorted(set(out), key=len, reverse=True)


def declared_prefix(prefixes: Sequence[tuple[int, ...]], tokens: Sequence[int]) -> int:
    """Length of the longest declared prefix `tokens` starts with exactly (0: none). The prompt's last token is
    never part of it (its logits are computed by the request itself)."""
    for p in prefixes:
        if len(p) < len(tokens) and tuple(tokens[: len(p)]) == p:
            return len(p)
    return 0
