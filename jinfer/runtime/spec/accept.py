"""Which proposed tokens a verify step keeps: speculative sampling's acceptance rule, vectorized over rows.

Row r proposed d_1 .. d_n (n = num_draft[r]) after its last token; the target's distributions p_0 .. p_n come
from the verify forward (p_j: after the token at offset j, with temperature, the top-k / top-p / min-p cuts
and penalties applied as the target alone applies them). Two exact rules, chosen per row:
- a proposal that is a function of the context (a host proposer's lookup; a greedy row's argmax draft): the
  target samples x_j ~ p_j with the very key the step without speculation would use for that token, and
  d_{j+1} is accepted while x_j == d_{j+1}; the first x_j that differs, or x_n after a full run, is the
  token of the target's own. That accepts d with probability p(d) and on rejection draws from p without d,
  normalized: the rejection rule for a one-hot q. It gives the very tokens of a run without speculation
  (greedy, or sampled with a seed).
- a proposal sampled from a draft distribution q (a draft model or early exit at temperature > 0): accept
  d_{j+1} with probability min(1, p_j(d)/q_j(d)); at the first rejection draw from norm(max(0, p_j - q_j));
  after a full run, x_n ~ p_n is the bonus token (Leviathan et al.; Chen et al.).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.runtime.branch import cond
from jinfer.runtime.sampler import sampling_logits

ACCEPT_STREAM, RESIDUAL_STREAM, DRAFT_STREAM = 1, 2, 3  # fold_in tags: each use of a token's key its own stream


def substream(keys: jax.Array, tag: int) -> jax.Array:
    """Keys of an independent stream derived from per-row keys (key[...])."""
    return jax.vmap(lambda k: jax.random.fold_in(k, tag))(keys.reshape(-1)).reshape(keys.shape)


def accept(target_logits, x, drafts, num_draft, q, stochastic, sp, keys, known: bool | None = None):
    """target_logits: f32[R, W, V] penalized logits of the target at each offset (W = k + 1); x: i32[R, W] the
    target's own sample at each offset (the step's plain sampler, each with its token's key); drafts: i32[R, k];
    num_draft: i32[R]; q: f32[R, k, V] draft probabilities or None; stochastic: bool[R] rows that use q;
    sp: the rows' SamplingInputs; keys: key[R, W], each token's key; the stochastic rule's work is skipped at
    run time when no row needs it, unless `known` (True: computed regardless, masked per row: a plain step).
    -> (tokens i32[R, W]: the accepted run, then the target's token, then -1; accepted i32[R])."""
    R, W, V = target_logits.shape
    k = W - 1
    offset = jnp.arange(k)
    proposed = offset[None, :] < num_draft[:, None]  # [R, k]
    ok = x[:, :k] == drafts
    if q is not None:
        def stochastic_accept():
            rep = lambda a: jnp.repeat(a, k)  # noqa: E731
            z = sampling_logits(target_logits[:, :k].reshape(R * k, V), rep(sp.temperature), rep(sp.top_k),
                                rep(sp.top_p), rep(sp.min_p)).reshape(R, k, V)
            p = jax.nn.softmax(z, axis=-1)
            p_d = jnp.take_along_axis(p, drafts[..., None], axis=-1)[..., 0]
            q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
            u = jax.vmap(jax.random.uniform)(substream(keys[:, :k], ACCEPT_STREAM).reshape(-1)).reshape(R, k)
            return jnp.where(stochastic[:, None], u * q_d < p_d, ok), p

        ok, p = cond(jnp.any(stochastic), stochastic_accept, lambda: (ok, jnp.zeros((R, k, V), jnp.float32)),
                     known=known)
    run = jnp.cumprod(ok & proposed, axis=1)
    accepted = run.sum(axis=1).astype(jnp.int32)  # [R]
    own = jnp.take_along_axis(x, accepted[:, None], axis=1)[:, 0]  # x at the first rejection, or the bonus
    if q is not None:
        def residual():
            at = jnp.minimum(accepted, k - 1)[:, None, None]
            r = jnp.maximum(jnp.take_along_axis(p, at, axis=1)[:, 0] - jnp.take_along_axis(q, at, axis=1)[:, 0], 0)
            rkeys = substream(jnp.take_along_axis(keys, jnp.minimum(accepted, k - 1)[:, None], axis=1)[:, 0],
                              RESIDUAL_STREAM)
            y = jax.vmap(jax.random.categorical)(rkeys, jnp.log(r)).astype(jnp.int32)
            # p == q leaves nothing to draw from; a rejection then has probability 0, but guard the draw.
            return jnp.where(r.sum(-1) > 0, y, own)

        rejected = stochastic & (accepted < num_draft)
        own = jnp.where(rejected, cond(jnp.any(rejected), residual, lambda: own, known=known), own)
    j = jnp.arange(W)[None, :]
    padded = jnp.concatenate([drafts, jnp.zeros((R, 1), drafts.dtype)], axis=1)
    tokens = jnp.where(j < accepted[:, None], padded, jnp.where(j == accepted[:, None], own[:, None], -1))
    return tokens.astype(jnp.int32), accepted
