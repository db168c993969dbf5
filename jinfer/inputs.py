"""SamplingParams: how one request's tokens are chosen and when its generation stops.

Validated on construction, so a bad value fails at the API boundary with the field named, not deep
inside a compiled step. Defaults follow vLLM's.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 (or -1) means no top-k cut
    top_p: float = 1.0  # in (0, 1]
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one; in [0, 1]
    repetition_penalty: float = 1.0  # > 0; divides positive (multiplies negative) logits of seen tokens
    presence_penalty: float = 0.0  # in [-2, 2]; subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # in [-2, 2]; subtracted per occurrence in the generated tokens
    seed: int | None = None  # None draws a fresh seed per request
    stop: tuple[str, ...] = ()  # stop strings; the matched string is not emitted
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # return this many top alternatives' logprobs (and the chosen token's)

    def __post_init__(self):
        # Accept a single string or any iterable for the sequence fields, as vLLM users write them.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            try:
                object.__setattr__(self, "stop", tuple(self.stop))
            except TypeError:
                raise ValueError(f"stop={self.stop!r} must be a string or a list of strings") from None
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop contains {s!r}; every stop must be a non-empty string")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids contains {t!r}; every entry must be a non-negative integer")
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be a positive integer")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be a number >= 0")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (or -1 for no cut)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1]")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2 <= v <= 2:
                raise ValueError(f"{name}={v!r} must be in [-2, 2]")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise ValueError(f"logprobs={self.logprobs!r} must be an integer >= 0")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**32):
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2**32)")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # rejects NaN
