"""Data parallelism as engine replicas: each replica is a whole Engine (scheduler, pages, prefix cache,
compiled steps) on its own `tensor_parallel` devices; a request lives on one replica from start to end.

Why replicas rather than one scheduler over a data-sharded batch: page tables and prefix-cache pages
then never cross devices (a request's pages are on the devices that read them), the scheduler stays the
single-device one, and each replica's steps compile to the same few shapes. New requests go to the
replica with the least work outstanding. `step()` steps every replica with work: each dispatches its
next step before reading its previous one, so all replicas' devices are busy while the host reads.
"""

from __future__ import annotations

import itertools
from typing import Sequence

from jinfer.engine.engine import Engine, EngineLoad, StepEvent
from jinfer.inputs import CheckedRequest, PromptInput, SamplingParams


class DataParallelEngine:
    """The Engine API over replicas (`jinfer.runtime.make_engine` builds them, each on its own
    `tensor_parallel` devices); host side only, like the Engine."""

    def __init__(self, replicas: Sequence[Engine]):
        if not replicas:
            raise ValueError("a DataParallelEngine needs at least one replica")
        self.replicas = list(replicas)
        first = self.replicas[0]
        self.config, self.model_config, self.tokenizer = first.config, first.model_config, first.tokenizer
        self.max_model_len, self.eos_token_ids = first.max_model_len, first.eos_token_ids
        self._ids = itertools.count()

    def warmup(self) -> None:
        for e in self.replicas:
            e.warmup()

    @property
    def inputs(self):
        return self.replicas[0].inputs  # every replica has the same limits

    @property
    def num_pages(self) -> int:
        return self.replicas[0].num_pages

    def add_request(self, prompt: PromptInput | CheckedRequest, sampling: SamplingParams | None = None,
                    request_id: str | None = None, prefill=None, same_prompt_as: str | None = None) -> str:
        checked = prompt if isinstance(prompt, CheckedRequest) else self.inputs.request(prompt, sampling)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if any(request_id in e.scheduler.requests for e in self.replicas):
            raise ValueError(f"request_id={request_id!r} is already in use")
        # Another completion of a prompt goes where the prompt's pages are (Engine.add_request's same_prompt_as).
        sibling = [e for e in self.replicas if same_prompt_as is not None and same_prompt_as in e.scheduler.requests]
        replica = sibling[0] if sibling else min(self.replicas, key=lambda e: len(e.scheduler.requests))
        return replica.add_request(checked, request_id=request_id, prefill=prefill,
                                   same_prompt_as=same_prompt_as if sibling else None)

    def cancel(self, request_id: str) -> bool:
        return any([e.cancel(request_id) for e in self.replicas])  # a list: every replica is asked

    @property
    def has_work(self) -> bool:
        return any(e.has_work for e in self.replicas)

    def load(self) -> EngineLoad:
        return sum((e.load() for e in self.replicas[1:]), self.replicas[0].load())

    def step(self) -> list[StepEvent]:
        return [ev for e in self.replicas if e.has_work for ev in e.step()]

    def run_until_done(self) -> None:
        while self.has_work:
            self.step()

