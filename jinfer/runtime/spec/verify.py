"""The verify step of speculative decoding (device side; the runner jits it per verify shape).

Each row feeds its token and up to k proposed ones (R rows x W = k + 1 token slots, laid out ragged as in a
prefill step): host proposals arrive as token ids, a drafter (`jinfer.runtime.spec.drafters`) drafts them here
first. One forward of the target over all of them writes their K/V and gives its logits at every offset;
penalties count the proposals before each offset; the target samples each offset with the key of that token's
index (so a row that accepts everything samples what a run without speculation would); `accept` keeps the
accepted run and one token of the target's own. The slot's last token and penalty counts follow the kept
tokens; the host rewinds the KV length to them (K/V past it are overwritten later).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.attention.backend import AttentionBackend, PagedMeta, kv_slots, make_paged_attention
from jinfer.engine.step_plan import StepInputs
from jinfer.models import llama
from jinfer.models.config import ModelConfig
from jinfer.models.llama import ModelOps
from jinfer.runtime.branch import cond, regardless_when, unused_when
from jinfer.runtime.sampler import apply_penalties, sample, step_keys
from jinfer.runtime.spec.accept import accept
from jinfer.runtime.spec.drafters import Drafter, DraftInputs
from jinfer.runtime.step import (
    SlotState,
    StepResult,
    count_tokens,
    keep_sampled,
    no_prompt_logprobs,
    uses_penalties,
)


def verify_step(params, kv, state: SlotState, inputs: StepInputs, attn_meta, *, config: ModelConfig,
                backend: AttentionBackend, width: int, max_logprobs: int, drafter: Drafter | None = None,
                draft=None, draft_meta=None, ops: ModelOps = ModelOps(), plain: str | None = None):
    """`draft_meta`: the drafter's backend metadata of an R-row one-token step; `draft`: a draft model's state.
    `plain` ("greedy" / "sampled", the plan's `plain_sampler`; the GPU's runner): no row uses a penalty or asks
    for logprobs, so the step compiles without runtime branches (see `jinfer.runtime.step.decode_block`).
    -> (kv, state, StepResult with N = width: row r's kept tokens, then -1, draft)."""
    tok, rows, sp = inputs.tokens, inputs.rows, inputs.sampling
    T, R, W, k = tok.ids.shape[0], rows.slot.shape[0], width, width - 1
    V = config.vocab_size
    token_slot = rows.slot[tok.row]
    tokens = jnp.where(tok.from_prev, state.last_sampled[token_slot], tok.ids)
    first = tokens[rows.query_start]
    start = tok.positions[rows.query_start]
    live = rows.query_len > 0
    penalties = uses_penalties(sp)
    unused = unused_when(plain)  # a plain step knows that no row uses a penalty or asks for logprobs

    # The first token enters the cache now (counted as a step without speculation counts it); the kept
    # proposals are counted at the end.
    state = cond(penalties, lambda s: count_tokens(s, rows.slot, first, live, tok.is_output[rows.query_start]),
                 lambda s: s, state, known=unused)
    counts0, prompt_mask = cond(
        penalties, lambda: (state.output_counts[rows.slot], state.prompt_mask[rows.slot]),
        lambda: (jnp.zeros((R, V), jnp.int32), jnp.zeros((R, V), bool)), known=unused)
    offsets = jnp.arange(W)
    rep = lambda a: jnp.repeat(a, W)  # noqa: E731  (per row -> per token slot)
    keys = step_keys(rep(sp.seed), (rows.gen_index[:, None] + offsets).reshape(-1)).reshape(R, W)
    draft_index = rows.query_start[:, None] + 1 + offsets[:k]  # [R, k]: the token slots of the proposals
    proposed = offsets[:k] < rows.num_draft[:, None]
    q = None
    if drafter is not None:
        d = DraftInputs(first=first, start=start, rows=rows, sp=sp, counts=counts0, prompt_mask=prompt_mask,
                        penalties=penalties, keys=keys[:, :k], meta=draft_meta, plain=plain)
        drafts, q, kv, draft = drafter.propose(params, kv, draft, d, config=config, backend=backend, k=k,
                                               ops=ops)
        tokens = tokens.at[jnp.where(proposed, draft_index, T)].set(drafts, mode="drop")
    drafts = jnp.where(proposed, tokens[jnp.minimum(draft_index, T - 1)], 0)

    meta = PagedMeta(token_row=tok.row, token_valid=tok.valid, page_table=rows.page_table, kv_len=rows.kv_len,
                     query_start=rows.query_start, query_len=rows.query_len,
                     kv_slot=kv_slots(rows.page_table, tok.row, tok.valid, tok.positions, kv[0]), backend=attn_meta)
    h, kv = llama.forward(params, tokens[None], tok.positions[None], kv, meta, config=config,
                          attention=make_paged_attention(W, backend), ops=ops)
    at = jnp.minimum(rows.query_start[:, None] + offsets, T - 1)  # [R, W]
    with jax.named_scope("lm_head"):
        logits = llama.logits_from_hidden(params, h[0][at], config)  # f32[R, W, V]

    def penalized():
        # Offset j follows the first token and the proposals d_1 .. d_j, all generated tokens.
        seen = jnp.cumsum(jax.nn.one_hot(drafts, V, dtype=jnp.int32) * proposed[..., None], axis=1)
        counts = counts0[:, None] + jnp.concatenate([jnp.zeros((R, 1, V), jnp.int32), seen], axis=1)
        return apply_penalties(logits.reshape(R * W, V), counts.reshape(R * W, V), jnp.repeat(prompt_mask, W, axis=0),
                               rep(sp.repetition_penalty), rep(sp.presence_penalty),
                               rep(sp.frequency_penalty)).reshape(R, W, V)

    pen = cond(penalties, penalized, lambda: logits, known=unused)
    x = sample(pen.reshape(R * W, V), rep(sp.temperature), rep(sp.top_k), rep(sp.top_p), keys.reshape(-1),
               rep(sp.min_p), all_greedy=None if plain is None else plain == "greedy").reshape(R, W)
    stochastic = sp.temperature > 0
    out, accepted = accept(pen, x, drafts, rows.num_draft, None if plain == "greedy" else q, stochastic, sp, keys,
                           known=regardless_when(plain))
    last = jnp.take_along_axis(out, accepted[:, None], axis=1)[:, 0]
    state = keep_sampled(state, rows, last, live)
    kept = (offsets[:k] < accepted[:, None]) & live[:, None]
    state = cond(
        penalties, lambda s: count_tokens(s, jnp.repeat(rows.slot, k), drafts.reshape(-1), kept.reshape(-1),
                                          jnp.ones(R * k, bool)), lambda s: s, state, known=unused)

    def logprobs():
        lp = jax.nn.log_softmax(logits, axis=-1)  # the raw distribution, as a step without speculation reports
        top_lp, top_ids = jax.lax.top_k(lp, max_logprobs)
        chosen = jnp.take_along_axis(lp, jnp.maximum(out, 0)[..., None], axis=-1)[..., 0]
        return chosen.T, jnp.swapaxes(top_ids, 0, 1), jnp.swapaxes(top_lp, 0, 1)

    def none():
        return jnp.zeros((W, R)), jnp.zeros((W, R, max_logprobs), jnp.int32), jnp.zeros((W, R, max_logprobs))

    lp = cond(jnp.any(sp.logprobs), logprobs, none, known=unused) if max_logprobs else none()
    return kv, state, StepResult(out.T, *lp, *no_prompt_logprobs(T, max_logprobs)), draft

