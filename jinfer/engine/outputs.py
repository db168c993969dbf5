"""What a request hands back to the caller: its tokens, text, finish reason, logprobs and timings."""

from __future__ import annotations

import dataclasses
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]


@dataclasses.dataclass
class TokenLogprobs:
    token_id: int
    logprob: float  # of the sampled token under the model's (unpenalized, untempered) distribution
    top: dict[int, float]  # the n most likely alternatives and their logprobs


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float  # time.perf_counter() when the request was added
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


@dataclasses.dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens, including the stop token when one ended the request
    text: str  # generated text; a matched stop string and special tokens are excluded
    finish_reason: FinishReason | None  # None while the request is still running
    request_id: str = ""
    logprobs: list[TokenLogprobs] | None = None
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
