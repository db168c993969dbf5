"""The engine's compiled steps (device side, pure functions of their arguments; the runner jits them).

`prefill_step`: one forward over a plan's ragged tokens, then each row's head (penalties, sampling,
logprobs) at its last token, and, at the tokens whose request asks for prompt logprobs, the logprob of the
prompt token that follows and the top ones of that position. `decode_block`: up to `max_steps` one-token
forwards in a device-side loop, each feeding the token the previous one sampled, a row ending on its step
count or a stop token, the loop on the first step at which no row is left; the host's work and the dispatch
are paid once per block.

Work a step does not need costs nothing: the penalty state is counted and applied, and logprobs computed
(the prompt's: the logits of every token of the step), under runtime conditionals on whether any row (token)
of the step asks for them (one compiled function serves every mix of requests; the sampler itself skips its
vocabulary cuts when every row is greedy). On the GPU such a conditional is a round trip to the host, so the
runner also compiles each step `plain` (greedy or sampled): for the steps in which the host saw that no row
needs any of it, with no conditional at all (`jinfer.runtime.branch.cond` decides each at trace time) and a
decode loop of a fixed count.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jinfer.attention.backend import AttentionBackend, PagedMeta, kv_slots, make_paged_attention
from jinfer.engine.step_plan import RowInputs, SamplingInputs, StepInputs
from jinfer.models import llama
from jinfer.models.config import ModelConfig
from jinfer.models.llama import ModelOps
from jinfer.runtime.branch import cond, regardless_when, unused_when
from jinfer.runtime.sampler import apply_penalties, apply_token_mask, ban_tokens, sample, step_keys


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotState:
    """Per-slot device state that outlives a step (S = max_slots)."""

    last_sampled: jax.Array  # i32[S]: the token each slot sampled last (fed by the next step, `from_prev`)
    output_counts: jax.Array  # i32[S, V]: occurrences of each token among the slot's generated tokens
    prompt_mask: jax.Array  # bool[S, V]: the token occurs in the slot's prompt
    logit_bias: jax.Array  # f32[S, V]: added to the slot's logits where its row has_logit_bias (set at admission,
    #   so a step carries none of it)

    @classmethod
    def zeros(cls, max_slots: int, vocab_size: int) -> SlotState:
        S, V = max_slots, vocab_size
        return cls(jnp.zeros(S, jnp.int32), jnp.zeros((S, V), jnp.int32), jnp.zeros((S, V), bool),
                   jnp.zeros((S, V), jnp.float32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepResult:
    """What a step hands back to the host: N = the steps of a decode block (1 for a prefill step); T = the
    step's tokens (a decode block: R, and its prompt fields are zeros)."""

    tokens: jax.Array  # i32[N, R]: row r's token of step n (rows and steps past their end hold garbage)
    logprob: jax.Array  # f32[N, R]: of the sampled token under the unpenalized, untempered distribution
    top_ids: jax.Array  # i32[N, R, max_logprobs]
    top_logprobs: jax.Array  # f32[N, R, max_logprobs]
    # Where TokenInputs.next_id names the prompt token after token t (garbage elsewhere), of the distribution
    # at t (unpenalized, untempered):
    prompt_logprob: jax.Array  # f32[T]: that token's logprob
    prompt_rank: jax.Array  # i32[T]: its rank (1 + the tokens strictly more likely)
    prompt_top_ids: jax.Array  # i32[T, max_logprobs]
    prompt_top_logprobs: jax.Array  # f32[T, max_logprobs]


def uses_penalties(sp: SamplingInputs) -> jax.Array:
    return jnp.any((sp.repetition_penalty != 1) | (sp.presence_penalty != 0) | (sp.frequency_penalty != 0))


def count_tokens(state: SlotState, slots, tokens, counted, is_output) -> SlotState:
    """A token counts for penalties once it enters its slot's cache (prompt tokens, then each generated token
    as it is fed back), so a recomputed (preempted) request rebuilds the same counts. Scatters to slot S
    (padding) are dropped."""
    counts = state.output_counts.at[slots, tokens].add((counted & is_output).astype(jnp.int32), mode="drop")
    mask = state.prompt_mask.at[slots, tokens].max(counted & ~is_output, mode="drop")
    return dataclasses.replace(state, output_counts=counts, prompt_mask=mask)


@jax.named_scope("sampling")  # benchmarks/step_profile.py sorts the step's time by these scopes
def _head(params, h, state: SlotState, rows: RowInputs, sp: SamplingInputs, gen_index, penalties, masked,
          config: ModelConfig, max_logprobs: int, plain: str | None = None):
    """h: [R, D], each row's last hidden state -> (sampled i32[R], (logprob, top ids, top logprobs)). `penalties`,
    `masked`: bool[] whether any row uses penalties, a token mask (computed once per step function). `plain`
    ("greedy" or "sampled"): the caller knows that no row uses a logit processor or asks for logprobs, and
    whether every row is greedy, so no runtime branch is needed (`jinfer.runtime.branch`)."""
    R = h.shape[0]
    with jax.named_scope("lm_head"):
        logits = llama.logits_from_hidden(params, h, config)  # f32[R, V]

    def none():
        return jnp.zeros(R), jnp.zeros((R, max_logprobs), jnp.int32), jnp.zeros((R, max_logprobs))

    known = unused_when(plain)
    logits_p = _processed(logits, state, rows, sp, gen_index, penalties, masked, known)
    new = sample(logits_p, sp.temperature, sp.top_k, sp.top_p, step_keys(sp.seed, gen_index), sp.min_p,
                 all_greedy=None if plain is None else plain == "greedy")

    def logprobs():
        lp = jax.nn.log_softmax(logits, axis=-1)
        top_lp, top_ids = jax.lax.top_k(lp, max_logprobs)
        return jnp.take_along_axis(lp, new[:, None], axis=-1)[:, 0], top_ids, top_lp

    if not max_logprobs:
        return new, none()
    return new, cond(jnp.any(sp.logprobs), logprobs, none, known=known)


def _processed(logits, state: SlotState, rows: RowInputs, sp: SamplingInputs, gen_index, penalties, masked,
               known: bool | None = None):
    """The logits a row samples from, in vLLM's order: logit bias, min_tokens (stop tokens banned until the
    row has that many), penalties, then the structured output's token mask (`masked`: any row has one). Each
    under a runtime condition on whether any row uses it, so a step without it pays nothing (`known`: none
    does, in a plain step)."""
    has_bias = sp.has_logit_bias[:, None]
    logits = cond(jnp.any(sp.has_logit_bias), lambda x: x + jnp.where(has_bias, state.logit_bias[rows.slot], 0.0),
                  lambda x: x, logits, known=known)
    early = gen_index < sp.min_tokens
    logits = cond(jnp.any(early), lambda x: ban_tokens(x, rows.stop_ids, early), lambda x: x, logits, known=known)
    logits = cond(
        penalties,
        lambda x: apply_penalties(x, state.output_counts[rows.slot], state.prompt_mask[rows.slot],
                                  sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty),
        lambda x: x, logits, known=known)
    return cond(masked, lambda x: apply_token_mask(x, rows.token_mask), lambda x: x, logits, known=known)


def no_prompt_logprobs(T: int, max_logprobs: int):
    return (jnp.zeros(T), jnp.zeros(T, jnp.int32), jnp.zeros((T, max_logprobs), jnp.int32),
            jnp.zeros((T, max_logprobs)))


@jax.named_scope("prompt_logprobs")
def _prompt_logprobs(params, h, next_id, config: ModelConfig, max_logprobs: int, known: bool | None = None):
    """h: [T, D], every token's hidden state; next_id: i32[T] -> (logprob f32[T], rank i32[T], top ids
    i32[T, k], top logprobs f32[T, k]) of each token's next prompt token. The T x V logits are computed only
    when some token asks (a runtime branch: a step without such a request pays nothing; `known`: none asks)."""
    T = h.shape[0]

    def compute():
        lp = jax.nn.log_softmax(llama.logits_from_hidden(params, h, config), axis=-1)  # f32[T, V]
        chosen = jnp.take_along_axis(lp, jnp.maximum(next_id, 0)[:, None], axis=-1)  # f32[T, 1]
        rank = 1 + jnp.sum(lp > chosen, axis=-1, dtype=jnp.int32)
        if max_logprobs:
            top_lp, top_ids = jax.lax.top_k(lp, max_logprobs)
        else:
            _, _, top_ids, top_lp = no_prompt_logprobs(T, 0)
        return chosen[:, 0], rank, top_ids, top_lp

    return cond(jnp.any(next_id >= 0), compute, lambda: no_prompt_logprobs(T, max_logprobs), known=known)


def _advance_draft(drafter, draft, tokens, positions, meta: PagedMeta, draft_meta, token_row, live, width: int,
                   known: bool | None = None):
    """The draft's K/V of the step's tokens of the rows it still follows (`live`: bool[R]); nothing at all (a
    runtime branch) when it follows none of them, unless `known` (a plain step writes regardless)."""
    follow = meta.token_valid & live[token_row]
    draft_layout = dataclasses.replace(meta, token_valid=follow, backend=draft_meta)
    return cond(jnp.any(follow), lambda d: drafter.advance(d, tokens, positions, draft_layout, width), lambda d: d,
                draft, known=known)


def keep_sampled(state: SlotState, rows: RowInputs, new, take) -> SlotState:
    S = state.last_sampled.shape[0]
    last = state.last_sampled.at[jnp.where(take, rows.slot, S)].set(new, mode="drop")
    return dataclasses.replace(state, last_sampled=last)


def prefill_step(params, kv, state: SlotState, inputs: StepInputs, attn_meta, *, config: ModelConfig,
                 backend: AttentionBackend, width: int, max_logprobs: int, drafter=None, draft=None, draft_meta=None,
                 ops: ModelOps = ModelOps(), plain: str | None = None):
    """One forward over T tokens of R rows (chunks of at most `width` tokens each); each sampling row samples
    one token after its last. A draft model (`drafter`, its state `draft`, its backend's metadata of this
    layout `draft_meta`) writes its own K/V of the same tokens. `plain`: the plan's `plain_sampler` when the
    runner compiled a step without runtime branches for it (see `decode_block`).
    -> (kv, state, StepResult with N = 1, draft)."""
    tok, rows, sp = inputs.tokens, inputs.rows, inputs.sampling
    S = state.last_sampled.shape[0]
    token_slot = rows.slot[tok.row]
    tokens = jnp.where(tok.from_prev, state.last_sampled[token_slot], tok.ids)
    penalties = uses_penalties(sp)

    def count(state):
        reset = jnp.where(rows.reset, rows.slot, S)
        state = dataclasses.replace(state, output_counts=state.output_counts.at[reset].set(0, mode="drop"),
                                    prompt_mask=state.prompt_mask.at[reset].set(False, mode="drop"))
        return count_tokens(state, token_slot, tokens, tok.valid, tok.is_output)

    state = cond(penalties, count, lambda s: s, state, known=unused_when(plain))
    meta = PagedMeta(token_row=tok.row, token_valid=tok.valid, page_table=rows.page_table, kv_len=rows.kv_len,
                     query_start=rows.query_start, query_len=rows.query_len,
                     kv_slot=kv_slots(rows.page_table, tok.row, tok.valid, tok.positions, kv[0]), backend=attn_meta)
    h, kv = llama.forward(params, tokens[None], tok.positions[None], kv, meta, config=config,
                          attention=make_paged_attention(width, backend), ops=ops)
    if drafter is not None:
        draft = _advance_draft(drafter, draft, tokens, tok.positions, meta, draft_meta, tok.row, rows.draft_live,
                               width, known=regardless_when(plain))
    last = jnp.maximum(rows.query_start + rows.query_len - 1, 0)
    new, (lp, top_ids, top_lp) = _head(params, h[0, last], state, rows, sp, rows.gen_index, penalties,
                                       jnp.any(rows.token_mask != -1), config, max_logprobs, plain=plain)
    state = keep_sampled(state, rows, new, rows.sample)
    prompt = _prompt_logprobs(params, h[0], tok.next_id, config, max_logprobs, known=unused_when(plain))
    return kv, state, StepResult(new[None], lp[None], top_ids[None], top_lp[None], *prompt), draft


def decode_block(params, kv, state: SlotState, inputs: StepInputs, attn_meta, *, config: ModelConfig,
                 backend: AttentionBackend, max_steps: int, max_logprobs: int, drafter=None, draft=None,
                 draft_meta=None, ops: ModelOps = ModelOps(), plain: str | None = None):
    """Up to `max_steps` decode steps of R rows, token r being row r's first token to feed. Row r runs
    `num_steps[r]` steps unless it samples one of its `stop_ids` first; the loop ends once no row runs. A
    draft model writes its K/V of each fed token (as in `prefill_step`).

    `plain` ("greedy" or "sampled", the plan's `plain_sampler`; the GPU's runner): no row uses a logit
    processor or asks for logprobs, so the block needs no runtime branch, and it runs exactly `max_steps`
    steps (rows past their end compute for nothing). On the GPU every runtime branch and every while
    condition is a round trip to the host, which also holds the host inside the call until the block ends; a
    block without any returns at once, so the host prepares the next step while this one runs.
    -> (kv, state, StepResult with N = max_steps, draft)."""
    tok, rows, sp = inputs.tokens, inputs.rows, inputs.sampling
    R = rows.slot.shape[0]
    penalties = uses_penalties(sp)
    first = jnp.where(tok.from_prev, state.last_sampled[rows.slot], tok.ids)
    masked = jnp.any(rows.token_mask != -1)
    attention = make_paged_attention(1, backend)
    empty = StepResult(jnp.zeros((max_steps, R), jnp.int32), jnp.zeros((max_steps, R)),
                       jnp.zeros((max_steps, R, max_logprobs), jnp.int32), jnp.zeros((max_steps, R, max_logprobs)),
                       *no_prompt_logprobs(R, max_logprobs))  # a decode block feeds no prompt token

    def running(i, stopped):
        return (i < rows.num_steps) & ~stopped

    def body(carry, plain):
        i, kv, state, feed, stopped, out, draft = carry
        active = running(i, stopped)
        is_output = tok.is_output | (i > 0)
        state = cond(penalties, lambda s: count_tokens(s, rows.slot, feed, active, is_output), lambda s: s, state,
                     known=unused_when(plain))
        # A row that has stopped keeps a valid length (its pages' own) and writes to the reserved page 0.
        kv_len = rows.kv_len + jnp.clip(i, 0, jnp.maximum(rows.num_steps - 1, 0))
        meta = PagedMeta(token_row=jnp.arange(R), token_valid=active, page_table=rows.page_table, kv_len=kv_len,
                         query_start=rows.query_start, query_len=rows.query_len,
                         kv_slot=kv_slots(rows.page_table, jnp.arange(R), active, tok.positions + i, kv[0]),
                         backend=attn_meta)
        h, kv = llama.forward(params, feed[None], (tok.positions + i)[None], kv, meta, config=config,
                              attention=attention, ops=ops)
        if drafter is not None:
            draft = _advance_draft(drafter, draft, feed, tok.positions + i, meta, draft_meta, jnp.arange(R),
                                   rows.draft_live, 1, known=regardless_when(plain))
        # A row with a grammar runs one step (its mask is its first step's): later steps skip the mask.
        new, (lp, top_ids, top_lp) = _head(params, h[0], state, rows, sp, rows.gen_index + i, penalties,
                                           masked & (i == 0), config, max_logprobs, plain=plain)
        state = keep_sampled(state, rows, new, active & rows.sample)
        stopped = stopped | (active & jnp.any(new[:, None] == rows.stop_ids, axis=-1))
        if plain is None:
            out = dataclasses.replace(out, tokens=out.tokens.at[i].set(new), logprob=out.logprob.at[i].set(lp),
                                      top_ids=out.top_ids.at[i].set(top_ids),
                                      top_logprobs=out.top_logprobs.at[i].set(top_lp))
        else:  # no row asks for logprobs: they stay the zeros they start as (three writes a step fewer on the GPU)
            out = dataclasses.replace(out, tokens=out.tokens.at[i].set(new))
        return i + 1, kv, state, new, stopped, out, draft

    def more(carry):
        i, _, _, _, stopped, _, _ = carry
        return (i < max_steps) & jnp.any(running(i, stopped))

    init = (jnp.int32(0), kv, state, first, jnp.zeros(R, bool), empty, draft)
    if plain is None:
        carry = jax.lax.while_loop(more, functools.partial(body, plain=None), init)
    else:
        carry = jax.lax.fori_loop(0, max_steps, lambda _, c: body(c, plain), init)
    _, kv, state, _, _, out, draft = carry
    return kv, state, out, draft
