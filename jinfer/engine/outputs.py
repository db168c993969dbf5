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


@dataclasses.dataclass(frozen=True)
class Logprob:
    """One token's entry in a position's distribution (vLLM's `Logprob`): the model's raw distribution, no
    penalties, no temperature."""

    logprob: float
    rank: int | None  # 1 for the most likely token (1 + the tokens strictly more likely); None where not computed
    #   (a sampled token outside its position's reported top n)
    decoded_token: str | None = None  # the token's own text; None without a tokenizer


# Per prompt token: None for the first (nothing predicts it), otherwise token id -> Logprob for the prompt's
# token and the position's top n (as vLLM's `RequestOutput.prompt_logprobs`).
PromptLogprobs = list[dict[int, Logprob] | None]


def top_logprobs(entries: dict[int, Logprob], n: int) -> list[tuple[int, float]]:
    """The top n of one prompt position's entries as (token id, logprob), most likely first: the prompt token
    is among them only where it ranks (`n`: the request's SamplingParams.prompt_logprobs)."""
    return [(t, e.logprob) for t, e in sorted(entries.items(), key=lambda te: te[1].rank) if e.rank <= n][:n]


@dataclasses.dataclass
class RequestMetrics:
    arrival_time: float  # time.perf_counter() when the request was added
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    # Speculative decoding (EngineConfig.speculative): tokens proposed and verified, those accepted, and the
    # verify steps that carried a proposal.
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_verify_steps: int = 0

    @property
    def spec_acceptance_rate(self) -> float | None:
        """Accepted / proposed tokens; None before any proposal."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else None

    @property
    def spec_mean_accepted_length(self) -> float | None:
        """Tokens a verify step emitted on average (its accepted proposals plus the target's own token)."""
        return 1 + self.spec_accepted_tokens / self.spec_verify_steps if self.spec_verify_steps else None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]


# Per generated token: {token id: Logprob} of the sampled token and its position's top n (vLLM's SampleLogprobs).
SampleLogprobs = list[dict[int, Logprob]]


@dataclasses.dataclass
class CompletionOutput:
    """One completion of a prompt (vLLM's `CompletionOutput`; RequestOutput.outputs[i])."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None  # sum of the sampled tokens' logprobs, when logprobs were asked for
    logprobs: SampleLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it; None for EOS / length

    def finished(self) -> bool:
        return self.finish_reason is not None


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
    prompt_logprobs: PromptLogprobs | None = None  # when asked for (SamplingParams.prompt_logprobs); set
    #   with the first output token
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it; None for EOS / length
    completions: list[RequestOutput] | None = None  # SamplingParams.n > 1: each completion's own output (the
    #   flat fields above are the first's)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def outputs(self) -> list[CompletionOutput]:
        """vLLM's view: one CompletionOutput per completion (SamplingParams.n of them)."""
        return [c._completion(i) for i, c in enumerate(self.completions or [self])]

    def _completion(self, index: int) -> CompletionOutput:
        lps = cumulative = None
        if self.logprobs is not None:
            lps = [_sample_logprobs(t) for t in self.logprobs]
            cumulative = sum(t.logprob for t in self.logprobs)
        return CompletionOutput(index, self.text, list(self.token_ids), cumulative, lps, self.finish_reason,
                                self.stop_reason)


def _sample_logprobs(t: TokenLogprobs) -> dict[int, Logprob]:
    ranked = sorted(t.top.items(), key=lambda kv: -kv[1])
    out = {i: Logprob(v, r + 1) for r, (i, v) in enumerate(ranked)}
    if t.token_id not in out:
        out = {t.token_id: Logprob(t.logprob, None), **out}
    else:
        out = {t.token_id: out[t.token_id], **out}  # the sampled token first, as vLLM lists it
    return out
