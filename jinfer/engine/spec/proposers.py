"""Host-side proposers: guesses of a request's next tokens made from its tokens alone (no model).

A proposer made on the device (a draft model, the target's early exit: `jinfer.runtime.spec.drafters`) needs
nothing from the host but how many tokens to draft; one made here hands the scheduler the token ids, which
the verify step feeds after the request's last token (`RowInputs.num_draft`).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class HostProposer(Protocol):
    def propose(self, token_ids: Sequence[int], k: int) -> list[int]:
        """Up to k guesses of the tokens after `token_ids` (prompt and output so far); [] for none."""
        ...


class NgramProposer:
    """Prompt lookup (Saxena's prompt-lookup decoding; vLLM's `ngram`): the sequence's last n tokens, for n from
    `max_n` down to `min_n`, are searched for earlier in the sequence; the k tokens after the latest earlier
    occurrence are the guess. The latest, because generated text tends to continue what it copied last. When
    fewer than k tokens follow it (the match lies d tokens before the end: the text repeats with period d),
    the guess continues that period rather than stopping short: a loop keeps looping."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n

    def propose(self, token_ids: Sequence[int], k: int) -> list[int]:
        seq = np.asarray(token_ids, np.int64)
        L = len(seq)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            suffix = seq[L - n:]
            # Windows starting at 0 .. L - n - 1: every earlier occurrence of the suffix (not the suffix itself).
            windows = np.lib.stride_tricks.sliding_window_view(seq[:L - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return seq[start + np.arange(k) % (L - start)].tolist()
        return []
