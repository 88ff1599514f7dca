"""Incremental detokenization with stop strings, for streaming.

Text is decoded over a sliding window of tokens (as in TGI and vLLM), so a token's leading
space or a multi-byte character split across tokens comes out right; nothing ending in an
incomplete character (U+FFFD) is emitted. Text that might be the start of a stop string is held
back until it is known not to be one; a stop string ends the text before it.
"""

from __future__ import annotations

from typing import Sequence

__all__ = ["TextStream"]


class TextStream:
    """Feed generated token ids one at a time; get the new text safe to send."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""          # all text decoded so far (cut at a stop string once found)
        self.sent = 0           # characters of self.text already returned
        self.stopped = False    # a stop string was found
        self._prefix = 0        # window start (token index)
        self._read = 0          # tokens whose text is already in self.text

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """Add one token; returns the text that can be sent now (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            cut = self._find_stop(start)
            if cut is not None:
                self.text, self.stopped = self.text[:cut], True
                return self._take(len(self.text))
        return self._take(len(self.text) - self._held())

    def flush(self) -> str:
        """The rest of the text (at the end of generation)."""
        return self._take(len(self.text))

    def _find_stop(self, start: int) -> int | None:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _take(self, end: int) -> str:
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out
