"""StepPlan: everything one engine step computes, as host numpy arrays (built by the scheduler).

Tokens of all scheduled requests are flattened into one ragged batch: each request contributes a run
of consecutive tokens (1 for decode, a chunk for prefill) that belongs to its slot. Per-slot arrays are
always [S] (max_slots).

`StepPlan.inputs()` groups the arrays the device step reads (`StepInputs`: tokens, slots, sampling). The
runner registers these classes as pytrees (the host side never imports jax), pads the token group to its
bucket and passes them to the jitted step as they are.
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
    """Per token: StepPlan's token arrays (ids: its `tokens`, slot: its `token_slot`). T: the plan's tokens,
    or the bucket once the runner has padded them (padding: valid False, every other field 0)."""

    ids: np.ndarray  # i32[T]: the id, or 0 where from_prev
    positions: np.ndarray  # i32[T]
    slot: np.ndarray  # i32[T]
    from_prev: np.ndarray  # bool[T]
    is_output: np.ndarray  # bool[T]
    valid: np.ndarray  # bool[T]: False for bucket padding


@dataclasses.dataclass(frozen=True)
class SlotInputs:
    """Per slot, as StepPlan's fields of the same names."""

    query_start: np.ndarray  # i32[S]
    query_len: np.ndarray  # i32[S]
    kv_len: np.ndarray  # i32[S]
    page_table: np.ndarray  # i32[S, max_pages]
    sample: np.ndarray  # bool[S]
    gen_index: np.ndarray  # i32[S]
    reset: np.ndarray  # bool[S]


@dataclasses.dataclass(frozen=True)
class SamplingInputs:
    """Per slot, each occupant's sampling parameters (idle slots: the neutral values), as StepPlan's fields."""

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

    @classmethod
    def empty(cls, max_slots: int, max_pages_per_seq: int) -> StepPlan:
        """A plan of no tokens with every slot idle (the scheduler's idle values): it touches no page."""

        def per_slot(dtype, value=0):  # a fresh array per field: no two fields alias
            return np.full(max_slots, value, dtype)

        i32, f32 = np.int32, np.float32
        return cls(
            tokens=np.zeros(0, i32), positions=np.zeros(0, i32), token_slot=np.zeros(0, i32),
            from_prev=np.zeros(0, bool), is_output=np.zeros(0, bool), query_start=per_slot(i32),
            query_len=per_slot(i32), kv_len=per_slot(i32), page_table=np.zeros((max_slots, max_pages_per_seq), i32),
            sample=per_slot(bool), gen_index=per_slot(i32), reset=per_slot(bool), temperature=per_slot(f32),
            top_k=per_slot(i32), top_p=per_slot(f32, 1), min_p=per_slot(f32), repetition_penalty=per_slot(f32, 1),
            presence_penalty=per_slot(f32), frequency_penalty=per_slot(f32), seed=per_slot(np.uint32), scheduled=())

    def inputs(self) -> StepInputs:
        """The arrays the device step reads, grouped: the plan's own arrays, the tokens not yet padded."""
        return StepInputs(
            tokens=TokenInputs(ids=self.tokens, positions=self.positions, slot=self.token_slot,
                               from_prev=self.from_prev, is_output=self.is_output,
                               valid=np.ones(self.num_tokens, bool)),
            slots=SlotInputs(query_start=self.query_start, query_len=self.query_len, kv_len=self.kv_len,
                             page_table=self.page_table, sample=self.sample, gen_index=self.gen_index,
                             reset=self.reset),
            sampling=SamplingInputs(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                    min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                                    presence_penalty=self.presence_penalty,
                                    frequency_penalty=self.frequency_penalty, seed=self.seed))

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def max_query_len(self) -> int:
        return int(self.query_len.max(initial=0))
