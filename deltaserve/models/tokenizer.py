"""Tokenizer and chat template: a thin wrapper over a HF fast tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


class Tokenizer:
    """Encodes text, decodes ids incrementally, renders chat messages.

    Special tokens and the chat template come from the model directory (for a
    GGUF, from its metadata through the conversion in `loader`).
    """

    def __init__(self, directory: Path):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(directory))
        self.eos_token_id: int | None = self.hf.eos_token_id
        self.bos_token_id: int | None = self.hf.bos_token_id
        # End-of-turn markers the chat templates use; generation stops on any of them.
        stop = set()
        for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>"):
            tid = self.hf.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid != self.hf.unk_token_id and tid is not None:
                stop.add(tid)
        if self.eos_token_id is not None:
            stop.add(self.eos_token_id)
        self.stop_token_ids: frozenset[int] = frozenset(stop)

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        """`template_kwargs`: extra variables for the template (e.g. enable_thinking), as chat_template_kwargs."""
        if self.hf.chat_template is None:
            raise ValueError("this model has no chat template; use the completions API")
        return self.hf.apply_chat_template(
            messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt,
            **(template_kwargs or {}),
        )

    def apply_chat(self, messages, tools=None, add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, tools, add_generation_prompt))


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters.

    Keeps a small window of already-emitted tokens so byte-level BPE pieces
    that join into one character are only emitted once complete.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(token_ids)
        prefix_text = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        new_text = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""
