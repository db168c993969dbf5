"""Request: one generation's host-side state, owned by the scheduler (no jax here)."""

from __future__ import annotations

import dataclasses
import enum
import time

from jinfer.engine.spec.policy import SpecState
from jinfer.inputs import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds a slot and pages
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stop_ids: frozenset[int]  # token ids that end the request (EOS unless ignore_eos, plus stop_token_ids)
    seed: int
    arrival: int  # admission order; preemption takes the newest
    status: Status = Status.WAITING
    output_ids: list[int] = dataclasses.field(default_factory=list)  # tokens whose values reached the host
    num_sampled: int = 0  # tokens sampled so far, including ones still in flight on the device
    num_computed: int = 0  # tokens whose KV is in the cache (or scheduled into it)
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache at (first) admission
    num_imported: int = 0  # leading prompt tokens whose KV arrived with the request (computed outside the
    #   engine, e.g. by ring attention); written into its pages at first admission, then 0
    kv_imported: bool = False  # its current pages hold imported KV: never offered to the prefix cache
    pages: list[int] = dataclasses.field(default_factory=list)
    num_indexed_pages: int = 0  # leading pages already offered to the prefix cache
    slot: int | None = None
    finish_reason: str | None = None
    num_preemptions: int = 0
    logprobs: list = dataclasses.field(default_factory=list)  # per output token, when asked for
    prompt_logprobs: list = dataclasses.field(default_factory=list)  # entry p: the record of prompt token p + 1
    #   (computed at position p), when asked for; filled in order, so a recomputed position is not added twice
    arrival_time: float = dataclasses.field(default_factory=time.perf_counter)
    token_times: list[float] = dataclasses.field(default_factory=list)
    spec: SpecState | None = None  # its speculation record, when the engine speculates
    parent: "Request | None" = None  # another completion of the same prompt (SamplingParams.n): admitted only
    #   once the parent's prompt pages are in the prefix cache, so that it reads them instead of recomputing
    grammar: object | None = None  # its structured output's matcher (jinfer.grammar.matcher.TokenMatcher):
    #   it has consumed every token in output_ids

    @property
    def num_tokens(self) -> int:
        """Prompt plus sampled tokens, known or in flight."""
        return len(self.prompt_ids) + self.num_sampled

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def needs_prompt_logprobs(self) -> bool:
        """It asks for prompt logprobs and some have not reached the host: its prompt must be computed (not
        taken from the prefix cache) from the first missing position."""
        return self.sampling.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids) - 1

    def next_prompt_id(self, i: int) -> int:
        """The prompt token after position i when its logprob is still wanted, else -1 (TokenInputs.next_id)."""
        if self.sampling.prompt_logprobs is None or not len(self.prompt_logprobs) <= i < len(self.prompt_ids) - 1:
            return -1
        return self.prompt_ids[i + 1]

    def token_at(self, i: int) -> int | None:
        """The id at sequence position i, or None while it is still on the device."""
        p = len(self.prompt_ids)
        if i < p:
            return self.prompt_ids[i]
        return self.output_ids[i - p] if i - p < len(self.output_ids) else None

    def known_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids
