"""Streaming token ids -> text deltas, one request at a time.

`push(token_id)` returns the text the new token completes, `flush()` whatever is left at the end; the
deltas joined equal `tokenizer.decode(all_ids)`. A token may carry part of a UTF-8 character (byte-level
and byte-fallback vocabularies split an emoji over up to four tokens); decoding then ends in U+FFFD, and
that text is held back until a later token completes it.

Each push decodes only a short window of recent tokens (vLLM's prefix/read offsets): `window[:read]` is
text already emitted, kept as context because a token's text can depend on its neighbours (a
SentencePiece decoder strips the first space of what it decodes; UTF-8 bytes join across tokens);
`window[read:]` is not yet emitted.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._hidden = frozenset(getattr(tokenizer, "special_token_ids", ())) if skip_special_tokens else frozenset()
        self._window: list[int] = []  # i32[n]: the emitted context, then the pending tokens
        self._read = 0  # window[:read] has been emitted

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self._hidden:
            return ""  # decode() drops it too, so leaving it out of the window changes no text
        self._window.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """The held-back tail (an incomplete character decodes to U+FFFD here, as in decode())."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._window):
            return ""
        decode = self._tok.decode
        emitted = decode(self._window[:self._read], skip_special_tokens=self._skip) if self._read else ""
        text = decode(self._window, skip_special_tokens=self._skip)
        if not final and (len(text) <= len(emitted) or text.endswith("\ufffd")):
            return ""  # nothing new, or a character still waits for its remaining bytes
        delta = text[len(emitted):]
        # The tokens just emitted are the next context; older ones no longer change any text.
        self._window = self._window[self._read:]
        self._read = len(self._window)
        return delta
