"""Ragged paged attention in plain `jnp`, walking the context a block of pages at a time (online softmax)
and only as far as the longest sequence of the step: the engine's attention where no Pallas kernel
runs natively (the CPU).

The reference (`reference.py`) gathers every slot's whole page table, max_model_len keys per slot, in
one go: simple and independent, the oracle of the tests, but on a 8k-context model with 16 slots that is
~100 MB of K per layer per step even when the sequences hold 200 tokens. Here the trip count of the loop
is ceil(max(kv_len) / block): shapes stay static (one compilation per step shape), the work follows the
sequences. Same layout and arguments as the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = float("-inf")


@functools.partial(jax.jit, static_argnames=("max_query_len", "pages_per_block", "sm_scale"))
def ragged_paged_attention_blocked(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [L, K, P, page_size, H]
    v_pages: jax.Array,
    page_table: jax.Array,  # i32[S, max_pages]
    kv_len: jax.Array,  # i32[S]
    query_start: jax.Array,  # i32[S]
    query_len: jax.Array,  # i32[S]; 0 for idle slots
    layer: jax.Array,  # i32[]
    *,
    max_query_len: int,
    pages_per_block: int,
    sm_scale: float | None = None,
) -> jax.Array:  # [T, N, H]; rows no slot owns are zero
    T, N, H = q.shape
    S, max_pages = page_table.shape
    _, K, _, ps, _ = k_pages.shape
    G = N // K
    ppb = min(pages_per_block, max_pages)
    C = ppb * ps  # keys per block
    scale = H ** -0.5 if sm_scale is None else sm_scale
    width = -(-max_pages // ppb) * ppb
    page_table = jnp.pad(page_table, ((0, 0), (0, width - max_pages)))  # whole blocks; padding is masked

    j = jnp.arange(max_query_len)
    q_valid = j[None, :] < query_len[:, None]  # [S, Qm]
    q_rows = jnp.where(q_valid, query_start[:, None] + j[None, :], 0)
    q_pos = kv_len[:, None] - query_len[:, None] + j[None, :]  # [S, Qm]
    qs = q[q_rows].reshape(S, max_query_len, K, G, H)

    def body(i, carry):
        o, m, l = carry  # [S, K, G, Qm, H], [S, K, G, Qm] x 2
        ids = lax.dynamic_slice_in_dim(page_table, i * ppb, ppb, axis=1)  # [S, ppb]
        k = k_pages[layer, :, ids]  # [S, ppb, K, ps, H] (mixed advanced indexing puts S, ppb first)
        v = v_pages[layer, :, ids]
        k, v = (jnp.swapaxes(x, 2, 3).reshape(S, C, K, H) for x in (k, v))
        key_pos = i * C + jnp.arange(C)
        key_valid = key_pos[None, :] < kv_len[:, None]  # [S, C]
        # Positions past kv_len may hold anything (stale or NaN pages): zero them so 0 * NaN cannot leak.
        k = jnp.where(key_valid[:, :, None, None], k, 0)
        v = jnp.where(key_valid[:, :, None, None], v, 0)
        s = jnp.einsum("SQKGH,SCKH->SKGQC", qs, k, preferred_element_type=jnp.float32) * scale
        mask = (key_pos[None, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :] & q_valid[:, :, None]
        s = jnp.where(mask[:, None, None], s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # rows with no visible key yet keep exp(.) = 0
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(jnp.where(m == NEG_INF, NEG_INF, m - m_safe))
        l = alpha * l + p.sum(axis=-1)
        o = alpha[..., None] * o + jnp.einsum("SKGQC,SCKH->SKGQH", p.astype(v.dtype), v,
                                              preferred_element_type=jnp.float32)
        return o, m_new, l

    init = (jnp.zeros((S, K, G, max_query_len, H), jnp.float32),
            jnp.full((S, K, G, max_query_len), NEG_INF, jnp.float32),
            jnp.zeros((S, K, G, max_query_len), jnp.float32))
    n_blocks = (jnp.max(kv_len) + C - 1) // C  # dynamic trip count: the longest sequence of this step
    o, _, l = lax.fori_loop(0, n_blocks, body, init)
    o = o / jnp.where(l == 0, 1.0, l)[..., None]
    out = jnp.moveaxis(o, 3, 1).reshape(S * max_query_len, N, H)  # [S, Qm, K, G, H] -> rows
    dest = jnp.where(q_valid, q_rows, T).reshape(-1)  # invalid rows scatter past the end and are dropped
    return jnp.zeros_like(q).at[dest].set(out.astype(q.dtype), mode="drop")
