"""StepPlan: everything one engine dispatch computes, as host numpy arrays (built by the scheduler).

Each scheduled request is one *row*: per-row arrays have one entry per scheduled request, in the order of
`scheduled` (the runner pads them up to the step's bucket with idle rows), and a row names the engine slot
whose device state (the last sampled token, penalty counts) it reads and writes. Tokens of all rows are
flattened into one ragged batch: each row contributes a run of consecutive tokens.

Three kinds of plan (`decode`, `verify`, or neither):
- a prefill step: rows contribute a chunk of prompt (or recomputed) tokens or one decode token each, and
  each row samples at most one token, after its chunk's last token when that reaches the end of its sequence;
- a decode block: every row contributes the one token it has to feed and then runs `num_steps` decode steps
  on the device (each step feeding the token the previous one sampled), so it samples `num_steps` tokens in
  one dispatch; a row stops early on the device when it samples one of its `stop_ids`;
- a verify step (speculative decoding): every row contributes the token it has to feed and then
  `num_draft` proposed tokens (ids from a host proposer, or drafted on the device), and samples up to
  1 + num_draft tokens: the accepted run of proposals and one token of the target's own; the step returns
  -1 past the row's last emitted token.

A plan is grouped as the device step reads it: `tokens`, `rows`, `sampling` (`inputs()` is the three
without the host's own fields). The runner registers these classes as pytrees (the host side never imports
jax), pads them to the bucket and passes them to the jitted step as they are.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jinfer.engine.request import Request


@dataclasses.dataclass(frozen=True)
class Scheduled:
    request: Request
    slot: int
    row: int  # its index in the plan's per-row arrays
    start: int  # sequence position of the first token this dispatch computes for it
    num_tokens: int  # tokens this dispatch computes for the request (a decode block: one per step)
    num_samples: int  # tokens it samples: 0 or 1 in a prefill step, num_tokens in a decode block
    num_imported: int = 0  # leading tokens whose KV arrived with the request: the engine writes them into
    #   its pages (Runner.import_kv) before this step, its first, runs
    num_precomputed: int = 0  # at admission, leading tokens whose KV this step does not compute (a prefix
    #   cache hit or imported KV): the engine seeds the slot's penalty state with them before the step

    @property
    def samples(self) -> bool:
        return self.num_samples > 0


@dataclasses.dataclass(frozen=True)
class TokenInputs:
    """Per token. T: the plan's tokens, or the bucket once the runner has padded them (padding: valid False,
    next_id -1, every other field 0). In a decode block token r belongs to row r."""

    ids: np.ndarray  # i32[T]: the id, or 0 where from_prev
    positions: np.ndarray  # i32[T]
    row: np.ndarray  # i32[T]: the row the token belongs to
    from_prev: np.ndarray  # bool[T]: take the id the slot's previous step sampled (still on device)
    is_output: np.ndarray  # bool[T]: a generated token (counted by presence/frequency penalties)
    valid: np.ndarray  # bool[T]: False for bucket padding
    next_id: np.ndarray  # i32[T]: the prompt token that follows this one, where its request asks for prompt
    #   logprobs (the step returns its logprob and the position's top ones); -1 elsewhere


@dataclasses.dataclass(frozen=True)
class RowInputs:
    """Per row (R: the scheduled requests, or the bucket once padded; padding rows have query_len 0, slot
    max_slots, which every scatter into the per-slot state drops)."""

    slot: np.ndarray  # i32[R]
    query_start: np.ndarray  # i32[R]: index of the row's first token in this step
    query_len: np.ndarray  # i32[R]
    kv_len: np.ndarray  # i32[R]: tokens in the slot's cache once this step's (a block's first step's) are written
    page_table: np.ndarray  # i32[R, max_pages]; padded with page 0
    sample: np.ndarray  # bool[R]
    gen_index: np.ndarray  # i32[R]: tokens the request had sampled before this one (folds into its key)
    reset: np.ndarray  # bool[R]: the slot has a new occupant that computes its sequence from the start
    #   (clear its penalty counts); an occupant with precomputed tokens has its counts seeded instead
    num_steps: np.ndarray  # i32[R]: decode steps of the row in a decode block (1 in a prefill step)
    stop_ids: np.ndarray  # i32[R, M]: token ids that end the request, padded with -1 (a decode block stops
    #   the row's steps on them; M is the scheduler's fixed width)
    num_draft: np.ndarray  # i32[R]: proposed tokens after the row's first (a verify step; 0 elsewhere)
    draft_live: np.ndarray  # bool[R]: a draft model's cache follows the row (writes the K/V of its tokens);
    #   False once the row has stopped speculating for good (jinfer.engine.spec.policy)
    token_mask: np.ndarray  # i32[R, W]: the tokens the row may sample, a bitmask over the vocabulary
    #   (jinfer.grammar.params.mask_words); all ones (-1) for a row without a grammar. A row with a grammar
    #   samples one token per dispatch (its next mask needs that token), so the mask is its first step's


@dataclasses.dataclass(frozen=True)
class SamplingInputs:
    """Per row, each request's sampling parameters (padding rows: the neutral values)."""

    temperature: np.ndarray  # f32[R]
    top_k: np.ndarray  # i32[R]
    top_p: np.ndarray  # f32[R]
    min_p: np.ndarray  # f32[R]
    repetition_penalty: np.ndarray  # f32[R]
    presence_penalty: np.ndarray  # f32[R]
    frequency_penalty: np.ndarray  # f32[R]
    seed: np.ndarray  # u32[R]
    logprobs: np.ndarray  # bool[R]: the request asks for logprobs
    min_tokens: np.ndarray  # i32[R]: its stop tokens are banned while it has sampled fewer
    has_logit_bias: np.ndarray  # bool[R]: add its slot's logit bias (set at admission: Runner.set_logit_bias)

    NEUTRAL = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
                   frequency_penalty=0.0, seed=0, logprobs=False, min_tokens=0, has_logit_bias=False)
    DTYPES = dict(temperature=np.float32, top_k=np.int32, top_p=np.float32, min_p=np.float32,
                  repetition_penalty=np.float32, presence_penalty=np.float32, frequency_penalty=np.float32,
                  seed=np.uint32, logprobs=bool, min_tokens=np.int32, has_logit_bias=bool)


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """What the device step reads of a plan."""

    tokens: TokenInputs
    rows: RowInputs
    sampling: SamplingInputs


# Padding values of the per-row arrays (every other field pads with 0); `slot` pads with max_slots.
ROW_PADDING = dict(stop_ids=-1, token_mask=-1)
TOKEN_PADDING = dict(next_id=-1)  # likewise per token


@dataclasses.dataclass(frozen=True)
class StepPlan:
    tokens: TokenInputs
    rows: RowInputs
    sampling: SamplingInputs
    scheduled: tuple[Scheduled, ...]
    decode: bool = False  # a decode block (see the module docstring)
    verify: bool = False  # a verify step

    @classmethod
    def empty(cls, max_pages_per_seq: int, stop_width: int, mask_words: int, decode: bool = False,
              verify: bool = False) -> StepPlan:
        """A plan of no tokens and no rows: padded to any bucket, it touches no page (warm-up)."""

        def none(dtype, *shape):
            return np.zeros((0, *shape), dtype)

        i32 = np.int32
        return cls(
            TokenInputs(ids=none(i32), positions=none(i32), row=none(i32), from_prev=none(bool),
                        is_output=none(bool), valid=none(bool), next_id=none(i32)),
            RowInputs(slot=none(i32), query_start=none(i32), query_len=none(i32), kv_len=none(i32),
                      page_table=none(i32, max_pages_per_seq), sample=none(bool), gen_index=none(i32),
                      reset=none(bool), num_steps=none(i32), stop_ids=none(i32, stop_width), num_draft=none(i32),
                      draft_live=none(bool),
                      token_mask=none(i32, mask_words)),
            SamplingInputs(**{k: none(t) for k, t in SamplingInputs.DTYPES.items()}),
            scheduled=(), decode=decode, verify=verify)

    def inputs(self) -> StepInputs:
        """What the device step reads (every group but the host's own fields)."""
        return StepInputs(self.tokens, self.rows, self.sampling)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens.ids)

    @property
    def num_rows(self) -> int:
        return len(self.rows.slot)

    @property
    def max_query_len(self) -> int:
        return int(self.rows.query_len.max(initial=0))

    @property
    def max_steps(self) -> int:
        return int(self.rows.num_steps.max(initial=0))

    @property
    def wants_logprobs(self) -> bool:
        return bool(self.sampling.logprobs.any())

    @property
    def wants_prompt_logprobs(self) -> bool:
        return bool((self.tokens.next_id >= 0).any())

    @property
    def plain_sampler(self) -> str | None:
        """"greedy" (every row) or "sampled" when no row of the step uses a logit processor (bias, min_tokens,
        penalties, a token mask) or asks for logprobs: the device may then run a step without runtime
        branches (`jinfer.runtime.step`); None when some row does."""
        s, r = self.sampling, self.rows
        if (self.wants_logprobs or self.wants_prompt_logprobs or s.has_logit_bias.any() or (r.token_mask != -1).any()
                or (r.gen_index < s.min_tokens).any() or (s.repetition_penalty != 1).any()
                or (s.presence_penalty != 0).any() or (s.frequency_penalty != 0).any()):
            return None
        return "greedy" if (s.temperature <= 0).all() else "sampled"
