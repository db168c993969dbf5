"""Streaming token ids -> text deltas, one request at a time.

`push(token_id)` returns the text the new token completes, `flush()` whatever is left at the end; the
deltas joined equal `tokenizer.decode(all_ids)`. A token may carry part of a UTF-8 character (byte-level
and byte-fallback vocabularies split an emoji over up to four tokens); that text is held back until a
later token completes it.

The stepping is `tokenizers.decoders.DecodeStream` (vLLM's prefix/read offsets, in Rust): it decodes only
the tokens since the last emitted text, with the tokens of that text as context, because a token's text
can depend on its neighbours (a SentencePiece decoder strips the first space of what it decodes; UTF-8
bytes join across tokens). DecodeStream has no end-of-stream call, so the tokens it still holds are
mirrored here for `flush()`.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """`tokenizer`: a `jinfer.text.tokenizer.Tokenizer` (its `backend` steps the stream, its `decode` the tail)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._backend = tokenizer.backend
        self._skip = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._context: list[int] = []  # i32[n]: the tokens of the last emitted text
        self._pending: list[int] = []  # i32[m]: tokens since then, not yet emitted

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        self._pending.append(token_id)
        text = self._stream.step(self._backend, token_id)
        if text is None:
            return ""  # nothing new, or a character still waits for its remaining bytes
        self._context, self._pending = self._pending, []
        return text

    def flush(self) -> str:
        """The held-back tail (an incomplete character decodes to U+FFFD here, as in decode()). It ends the
        stream: a later push starts a new one, so no text is emitted twice."""
        context, pending = self._context, self._pending
        self._stream = DecodeStream(skip_special_tokens=self._skip)
        self._context, self._pending = [], []
        if not pending:
            return ""
        emitted = self._tok.decode(context, skip_special_tokens=self._skip) if context else ""
        return self._tok.decode(context + pending, skip_special_tokens=self._skip)[len(emitted):]
