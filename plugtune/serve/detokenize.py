"""Generated tokens -> text deltas, with stop strings, for streaming.

Each step decodes the row's whole output (what `generate` returns at the end, so streamed and
batch text agree) and hands out only the part that can no longer change:
- a trailing U+FFFD is held back: it is usually half of a multi-byte character whose other bytes
  arrive with the next token (byte-level BPE);
- a tail that could be the start of a stop string is held back until it is known not to be one,
  so a stop string never leaks into the output, even split over several tokens.
Decoding the whole output each step costs O(n) per token; outputs are capped by max_tokens.
"""
from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.sent = ""  # text already handed out
        self._checked = 0  # stop strings cannot start before this character any more

    def update(self, token_ids: list[int], final: bool = False) -> tuple[str, bool]:
        """The new text for the output `token_ids` so far, and whether a stop string ended it.
        With final=True nothing is held back (the row is finishing for another reason)."""
        full = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        stable = len(full.rstrip("\ufffd"))  # characters that later tokens cannot change
        if self.stop:
            hits = [i for i in (full.find(s, self._checked) for s in self.stop) if i >= 0]
            if hits:
                return self._take(full[:min(hits)]), True
            self._checked = max(self._checked, stable - max(len(s) for s in self.stop) + 1)
        if final:
            return self._take(full), False
        safe = stable
        for s in self.stop:  # hold back the longest tail that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, stable), 0, -1):
                if full.endswith(s[:k], 0, stable):
                    safe = min(safe, stable - k)
                    break
        return self._take(full[:safe]), False

    def _take(self, text: str) -> str:
        # Byte-level BPE decoding is prefix-stable, so `text` extends what was sent. A tokenizer that
        # rewrites earlier text (clean-up of spaces) only gets its new tail out: sent text stays sent.
        new = text[len(self.sent):]
        self.sent += new
        return new
