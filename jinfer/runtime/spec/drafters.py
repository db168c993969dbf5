"""Device-side proposers (drafters): k guesses of each row's next tokens, made inside the verify step.

A drafter is called with the rows' first tokens (the token each row feeds) and returns k drafted tokens per row
and, for rows that sample (temperature > 0), the draft distribution q each was drawn from (greedy rows draft
the argmax of their penalized draft logits; `jinfer.runtime.spec.accept` then needs no q for them).
The draft logits get the rows' penalties (counting the tokens drafted before), temperature and cuts, as the
target's own logits will (the acceptance rule is exact for any q, but the closer q is to p, the more is accepted).

- `EarlyExitDrafter`: the target's first m layers, its final norm and LM head (self-speculation). It writes the
  K/V of those m layers at the drafted positions, which are the target's own (same weights, same tokens); the
  verify forward then writes all layers there, so it needs no cache of its own and no prefill.
- `DraftModelDrafter`: a separate, smaller model with the target's vocabulary. Its K/V live in a pool of its own
  (`DraftModel.kv`), indexed by the target's page tables (same page size and page count: a page id names the
  same tokens in both pools), so the prefix cache, preemption and page reuse need no bookkeeping of their own.
  Every step that writes the target's K/V runs the draft over the same tokens (`advance`), so its cache holds
  every live token; proposing runs k + 1 one-token steps, the last only to write the K/V of the k-th draft.
- `UniformDrafter`: uniformly random tokens (q = 1/V): the worst proposer, which the tests use to show that
  acceptance stays exact whatever q is.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp

from jinfer.attention.backend import AttentionBackend, PagedMeta, kv_slots, make_paged_attention
from jinfer.engine.step_plan import RowInputs, SamplingInputs
from jinfer.models import llama
from jinfer.models.config import ModelConfig
from jinfer.models.llama import ModelOps
from jinfer.runtime.branch import cond, unused_when
from jinfer.runtime.sampler import apply_penalties, sampling_logits
from jinfer.runtime.spec.accept import DRAFT_STREAM, substream


@dataclasses.dataclass(frozen=True)
class DraftInputs:
    """What every drafter reads (R rows; k drafts per row)."""

    first: jax.Array  # i32[R]: the token each row feeds first (already in the sequence)
    start: jax.Array  # i32[R]: its position
    rows: RowInputs
    sp: SamplingInputs
    counts: jax.Array  # i32[R, V]: the rows' generated-token counts, the first token included (penalties)
    prompt_mask: jax.Array  # bool[R, V]
    penalties: jax.Array  # bool[]: any row uses a penalty
    keys: jax.Array  # key[R, k]: the key of each drafted token's position (a drafter draws from a substream)
    meta: object  # the attention backend's metadata of an R-row, one-token step
    plain: str | None = None  # the verify step's `plain` (greedy / sampled, no penalty): no runtime branch


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftModel:
    """A draft model's device state: its params and its KV pool ([L_d, K_d, P, page_size, H_d] pages, as the
    target's)."""

    params: dict
    kv: tuple


class Drafter(Protocol):
    def propose(self, params, kv, draft: DraftModel | None, d: DraftInputs, *, config: ModelConfig,
                backend: AttentionBackend, k: int, ops: ModelOps = ModelOps()):
        """-> (drafts i32[R, k], q f32[R, k, V], kv, draft)."""
        ...

    def advance(self, draft: DraftModel | None, tokens, positions, meta: PagedMeta, width: int) -> DraftModel | None:
        """Writes the draft's K/V of a step's tokens (i32[T], at positions i32[T], laid out by `meta`, whose
        backend field holds the draft backend's metadata of that layout); a drafter without a cache of its own
        returns `draft` as it is."""
        ...


def _draw(logits, d: DraftInputs, i, counts):
    """One drafted token per row from its draft logits (f32[R, V]) at draft offset i -> (token i32[R], q f32[R, V])."""
    sp = d.sp
    pen = cond(d.penalties, lambda: apply_penalties(logits, counts, d.prompt_mask, sp.repetition_penalty,
                                                    sp.presence_penalty, sp.frequency_penalty),
               lambda: logits, known=unused_when(d.plain))
    greedy = jnp.argmax(pen, axis=-1).astype(jnp.int32)

    def sampled():
        z = sampling_logits(pen, sp.temperature, sp.top_k, sp.top_p, sp.min_p)
        keys = substream(d.keys[:, i], DRAFT_STREAM)
        tok = jax.vmap(jax.random.categorical)(keys, z).astype(jnp.int32)
        return jnp.where(sp.temperature > 0, tok, greedy), jax.nn.softmax(z, axis=-1)

    return cond(jnp.any(sp.temperature > 0), sampled, lambda: (greedy, jnp.zeros(pen.shape, jnp.float32)),
                known=None if d.plain is None else d.plain == "sampled")


def _autoregress(forward, d: DraftInputs, vocab_size: int, k: int, steps: int, kv):
    """`steps` one-token steps of a draft (`forward(tokens i32[R], positions, meta, kv) -> (logits, kv)`), each
    feeding the token drawn before; the first k draw the drafts. -> (drafts, q, kv)."""
    R, rows = d.first.shape[0], d.rows

    def body(i, carry):
        kv, feed, counts, drafts, q = carry
        active = i < rows.num_draft + (steps > k)  # a last step writes the k-th draft's K/V
        meta = PagedMeta(token_row=jnp.arange(R), token_valid=active, page_table=rows.page_table,
                         kv_len=d.start + i + 1, query_start=jnp.arange(R), query_len=active.astype(jnp.int32),
                         kv_slot=kv_slots(rows.page_table, jnp.arange(R), active, d.start + i, kv[0]), backend=d.meta)
        logits, kv = forward(feed, d.start + i, meta, kv)
        tok, qi = _draw(logits, d, jnp.minimum(i, k - 1), counts)
        counts = cond(d.penalties, lambda: counts.at[jnp.arange(R), tok].add(1), lambda: counts,
                      known=unused_when(d.plain))
        at = jnp.minimum(i, k - 1)  # the extra step's draw is discarded: `at` is k - 1 and i == k
        keep = i < k
        return (kv, tok, counts, drafts.at[:, at].set(jnp.where(keep, tok, drafts[:, at])),
                q.at[:, at].set(jnp.where(keep, qi, q[:, at])))

    init = (kv, d.first, d.counts, jnp.zeros((R, k), jnp.int32), jnp.zeros((R, k, vocab_size), jnp.float32))
    # As many steps as the longest row drafts (a probe of one token pays for one), not always k; a plain step
    # runs all of them (a loop bound read at run time is a host round trip on the GPU).
    n = steps if d.plain is not None else jnp.minimum(jnp.max(rows.num_draft) + (steps - k), steps)
    kv, _, _, drafts, q = jax.lax.fori_loop(0, n, body, init)
    return drafts, q, kv


@dataclasses.dataclass(frozen=True)
class EarlyExitDrafter:
    layers: int  # the target's leading layers that draft

    def propose(self, params, kv, draft, d: DraftInputs, *, config: ModelConfig, backend: AttentionBackend, k: int,
                ops: ModelOps = ModelOps()):
        attention = make_paged_attention(1, backend)

        def forward(tokens, positions, meta, kv):
            h, kv = llama.forward(params, tokens[None], positions[None], kv, meta, config=config, attention=attention,
                                  num_layers=self.layers, ops=ops)
            return llama.logits_from_hidden(params, h[0], config), kv

        drafts, q, kv = _autoregress(forward, d, config.vocab_size, k, k, kv)
        return drafts, q, kv, draft

    def advance(self, draft, tokens, positions, meta, width):
        return draft


@dataclasses.dataclass(frozen=True)
class DraftModelDrafter:
    config: ModelConfig  # the draft model's
    backend: AttentionBackend  # for the draft's head counts

    def propose(self, params, kv, draft: DraftModel, d: DraftInputs, *, config: ModelConfig,
                backend: AttentionBackend, k: int, ops: ModelOps = ModelOps()):
        attention = make_paged_attention(1, self.backend)

        def forward(tokens, positions, meta, dkv):
            h, dkv = llama.forward(draft.params, tokens[None], positions[None], dkv, meta, config=self.config,
                                   attention=attention, ops=ops)
            return llama.logits_from_hidden(draft.params, h[0], self.config), dkv

        drafts, q, dkv = _autoregress(forward, d, config.vocab_size, k, k + 1, draft.kv)
        return drafts, q, kv, DraftModel(draft.params, dkv)

    def advance(self, draft: DraftModel, tokens, positions, meta, width):
        _, dkv = llama.forward(draft.params, tokens[None], positions[None], draft.kv, meta, config=self.config,
                               attention=make_paged_attention(width, self.backend))
        return DraftModel(draft.params, dkv)


@dataclasses.dataclass(frozen=True)
class UniformDrafter:
    def propose(self, params, kv, draft, d: DraftInputs, *, config: ModelConfig, backend: AttentionBackend, k: int,
                ops: ModelOps = ModelOps()):
        R, V = d.first.shape[0], config.vocab_size
        keys = substream(d.keys, DRAFT_STREAM).reshape(-1)
        drafts = jax.vmap(lambda key: jax.random.randint(key, (), 0, V))(keys).reshape(R, k).astype(jnp.int32)
        return drafts, jnp.full((R, k, V), 1.0 / V, jnp.float32), kv, draft

    def advance(self, draft, tokens, positions, meta, width):
        return draft
