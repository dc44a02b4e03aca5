"""Token ids -> text deltas, with OpenAI stop strings applied.

Stop strings live in the server, not the engine: they are about text, and a
match can span token boundaries. Text that could still become a stop string
(a suffix that is a prefix of one) is held back until it is decided, so a
stream never emits text it would have to take back; on a match the text
before it is released and the caller aborts the sequence (finish_reason
"stop"). Streaming and non-streaming requests share this class, which is
what makes their outputs identical.
"""

from __future__ import annotations

from deltaserve.models.tokenizer import IncrementalDecoder, Tokenizer


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None):
        self._dec = IncrementalDecoder(tokenizer)
        self._tok = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self._pending = ""  # decoded but not yet released
        self.text = ""  # released so far
        self.stopped = False  # a stop string matched
        self.matched_stop: str | None = None

    def push(self, token_ids: list[int]) -> str:
        """Add generated tokens; returns the text that is now final."""
        if self.stopped or not token_ids:
            return ""
        self._pending += self._dec.push(token_ids)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: flush characters the decoder held and everything pending."""
        if self.stopped:
            return ""
        d = self._dec
        held = self._tok.decode(d.ids[d.prefix_offset : d.read_offset], d.skip)
        full = self._tok.decode(d.ids[d.prefix_offset :], d.skip)
        if len(full) > len(held):
            self._pending += full[len(held) :]
            d.prefix_offset = d.read_offset = len(d.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        p = self._pending
        hit, hit_at = None, len(p) + 1
        for s in self.stop:
            i = p.find(s)
            if 0 <= i < hit_at:
                hit, hit_at = s, i
        if hit is not None:
            out = p[:hit_at]
            self._pending = ""
            self.stopped, self.matched_stop = True, hit
        else:
            keep = 0 if final else _held_suffix(p, self.stop)
            out = p[: len(p) - keep]
            self._pending = p[len(p) - keep :]
        self.text += out
        return out


def _held_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
