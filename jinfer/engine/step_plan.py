"""StepPlan: everything one engine step computes, as host numpy arrays (built by the scheduler).

Tokens of all scheduled requests are flattened into one ragged batch: each request contributes a run
of consecutive tokens (1 for decode, a chunk for prefill) that belongs to its slot. The runner pads the
token arrays to a bucket; per-slot arrays are always [S] (max_slots).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jinfer.engine.request import Request


@dataclasses.dataclass(frozen=True)
class Scheduled:
    request: Request
    slot: int
    num_tokens: int  # tokens this step computes for the request
    samples: bool  # the chunk reaches the end of the known sequence, so a token is sampled after it
    num_imported: int = 0  # leading tokens whose KV arrived with the request: the engine writes them into
    #   its pages (Runner.import_kv) before this step, its first, runs
    num_precomputed: int = 0  # at admission, leading tokens whose KV this step does not compute (a prefix
    #   cache hit or imported KV): the engine seeds the slot's penalty state with them before the step


@dataclasses.dataclass(frozen=True)
class StepPlan:
    # per token (T = tokens in this step, before padding)
    tokens: np.ndarray  # i32[T]: the id, or 0 where from_prev
    positions: np.ndarray  # i32[T]
    token_slot: np.ndarray  # i32[T]
    from_prev: np.ndarray  # bool[T]: take the id the previous step sampled for this slot (still on device)
    is_output: np.ndarray  # bool[T]: a generated token (counted by presence/frequency penalties)
    # per slot (S = max_slots)
    query_start: np.ndarray  # i32[S]: index of the slot's first token in this step
    query_len: np.ndarray  # i32[S]: 0 where the slot is idle this step
    kv_len: np.ndarray  # i32[S]: tokens in the slot's cache once this step's are written
    page_table: np.ndarray  # i32[S, max_pages]; padded with page 0
    sample: np.ndarray  # bool[S]
    gen_index: np.ndarray  # i32[S]: tokens the request had sampled before this one (folds into its key)
    reset: np.ndarray  # bool[S]: the slot has a new occupant that computes its sequence from the start
    #   (clear its penalty counts); an occupant with precomputed tokens has its counts seeded instead
    temperature: np.ndarray  # f32[S]
    top_k: np.ndarray  # i32[S]
    top_p: np.ndarray  # f32[S]
    min_p: np.ndarray  # f32[S]
    repetition_penalty: np.ndarray  # f32[S]
    presence_penalty: np.ndarray  # f32[S]
    frequency_penalty: np.ndarray  # f32[S]
    seed: np.ndarray  # u32[S]
    scheduled: tuple[Scheduled, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def max_query_len(self) -> int:
        return int(self.query_len.max(initial=0))
