"""StepPlan: everything one engine step computes, as host numpy arrays (built by the scheduler).

Tokens of all scheduled requests are flattened into one ragged batch: each request contributes a run
of consecutive tokens (1 for decode, a chunk for prefill) that belongs to its slot. Per-slot arrays are
always [S] (max_slots).

A plan is grouped as the device step reads it: `tokens`, `slots`, `sampling` (`inputs()` is the three
without the host's own `scheduled`). The runner registers these classes as pytrees (the host side never
imports jax), pads the token group to its bucket and passes them to the jitted step as they are.
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
class TokenInputs:
    """Per token. T: the plan's tokens, or the bucket once the runner has padded them (padding: valid False,
    every other field 0)."""

    ids: np.ndarray  # i32[T]: the id, or 0 where from_prev
    positions: np.ndarray  # i32[T]
    slot: np.ndarray  # i32[T]: the slot whose request the token belongs to
    from_prev: np.ndarray  # bool[T]: take the id the previous step sampled for this slot (still on device)
    is_output: np.ndarray  # bool[T]: a generated token (counted by presence/frequency penalties)
    valid: np.ndarray  # bool[T]: False for bucket padding


@dataclasses.dataclass(frozen=True)
class SlotInputs:
    """Per slot (S = max_slots)."""

    query_start: np.ndarray  # i32[S]: index of the slot's first token in this step
    query_len: np.ndarray  # i32[S]: 0 where the slot is idle this step
    kv_len: np.ndarray  # i32[S]: tokens in the slot's cache once this step's are written
    page_table: np.ndarray  # i32[S, max_pages]; padded with page 0
    sample: np.ndarray  # bool[S]
    gen_index: np.ndarray  # i32[S]: tokens the request had sampled before this one (folds into its key)
    reset: np.ndarray  # bool[S]: the slot has a new occupant that computes its sequence from the start
    #   (clear its penalty counts); an occupant with precomputed tokens has its counts seeded instead


@dataclasses.dataclass(frozen=True)
class SamplingInputs:
    """Per slot, each occupant's sampling parameters (idle slots: the neutral values)."""

    temperature: np.ndarray  # f32[S]
    top_k: np.ndarray  # i32[S]
    top_p: np.ndarray  # f32[S]
    min_p: np.ndarray  # f32[S]
    repetition_penalty: np.ndarray  # f32[S]
    presence_penalty: np.ndarray  # f32[S]
    frequency_penalty: np.ndarray  # f32[S]
    seed: np.ndarray  # u32[S]


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """What the device step reads of a plan."""

    tokens: TokenInputs
    slots: SlotInputs
    sampling: SamplingInputs


@dataclasses.dataclass(frozen=True)
class StepPlan:
    tokens: TokenInputs
    slots: SlotInputs
    sampling: SamplingInputs
    scheduled: tuple[Scheduled, ...]

    @classmethod
    def empty(cls, max_slots: int, max_pages_per_seq: int) -> StepPlan:
        """A plan of no tokens with every slot idle (the scheduler's idle values): it touches no page."""

        def per_slot(dtype, value=0):  # a fresh array per field: no two fields alias
            return np.full(max_slots, value, dtype)

        def none(dtype):
            return np.zeros(0, dtype)

        i32, f32 = np.int32, np.float32
        return cls(
            TokenInputs(ids=none(i32), positions=none(i32), slot=none(i32), from_prev=none(bool),
                        is_output=none(bool), valid=none(bool)),
            SlotInputs(query_start=per_slot(i32), query_len=per_slot(i32), kv_len=per_slot(i32),
                       page_table=np.zeros((max_slots, max_pages_per_seq), i32), sample=per_slot(bool),
                       gen_index=per_slot(i32), reset=per_slot(bool)),
            SamplingInputs(temperature=per_slot(f32), top_k=per_slot(i32), top_p=per_slot(f32, 1), min_p=per_slot(f32),
                           repetition_penalty=per_slot(f32, 1), presence_penalty=per_slot(f32),
                           frequency_penalty=per_slot(f32), seed=per_slot(np.uint32)),
            scheduled=())

    def inputs(self) -> StepInputs:
        """What the device step reads (every group but the host's own `scheduled`)."""
        return StepInputs(self.tokens, self.slots, self.sampling)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens.ids)

    @property
    def max_query_len(self) -> int:
        return int(self.slots.query_len.max(initial=0))
