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
def blocked_paged_attention(
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
    """One row of work per slot, its queries padded to max_query_len."""
    j = jnp.arange(max_query_len)
    q_valid = j[None, :] < query_len[:, None]  # [S, Qm]
    q_rows = jnp.where(q_valid, query_start[:, None] + j[None, :], 0)
    q_pos = kv_len[:, None] - query_len[:, None] + j[None, :]
    return _attend_rows(q, k_pages, v_pages, page_table, kv_len, q_rows, q_pos, q_valid, layer,
                        pages_per_block=pages_per_block, sm_scale=sm_scale)


@functools.partial(jax.jit, static_argnames=("block_q", "pages_per_block", "sm_scale"))
def blocked_paged_attention_qblocks(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [L, K, P, page_size, H]
    v_pages: jax.Array,
    page_table: jax.Array,  # i32[S, max_pages]
    kv_len: jax.Array,  # i32[S]
    query_len: jax.Array,  # i32[S]
    blocks: tuple[jax.Array, ...],  # (blk_slot, blk_row0, blk_len, blk_qoff) i32[NB], from query_layout.query_blocks
    layer: jax.Array,  # i32[]
    *,
    block_q: int,
    pages_per_block: int,
    sm_scale: float | None = None,
) -> jax.Array:  # [T, N, H]
    """One row of work per query block (up to block_q queries of one slot): a step with a few long prefill
    chunks among many decodes pads to NB x block_q query rows instead of slots x chunk width (on 16 slots
    and a 128-token chunk, 512 rows instead of 2,048 for 256 tokens)."""
    blk_slot, blk_row0, blk_len, blk_qoff = blocks
    j = jnp.arange(block_q)
    q_valid = j[None, :] < blk_len[:, None]  # [NB, bq]
    q_rows = jnp.where(q_valid, blk_row0[:, None] + j[None, :], 0)
    first = kv_len[blk_slot] - query_len[blk_slot] + blk_qoff  # position of each block's first query
    q_pos = first[:, None] + j[None, :]
    kv_rows = jnp.where(blk_len > 0, kv_len[blk_slot], 0)  # unused blocks see no key
    return _attend_rows(q, k_pages, v_pages, page_table[blk_slot], kv_rows, q_rows, q_pos, q_valid, layer,
                        pages_per_block=pages_per_block, sm_scale=sm_scale)


def _attend_rows(q, k_pages, v_pages, page_table, kv_len, q_rows, q_pos, q_valid, layer, *, pages_per_block,
                 sm_scale):
    """Rows of queries (q_rows, q_pos, q_valid: [R, Qm]), each row against one sequence's pages
    (page_table [R, max_pages], kv_len [R]) -> [T, N, H], rows no query owns zero."""
    T, N, H = q.shape
    R, max_pages = page_table.shape
    Qm = q_rows.shape[1]
    _, K, _, ps, _ = k_pages.shape
    G = N // K
    ppb = min(pages_per_block, max_pages)
    C = ppb * ps  # keys per block
    scale = H ** -0.5 if sm_scale is None else sm_scale
    width = -(-max_pages // ppb) * ppb
    page_table = jnp.pad(page_table, ((0, 0), (0, width - max_pages)))  # whole blocks; padding is masked
    qs = q[q_rows].reshape(R, Qm, K, G, H)

    def body(i, carry):
        o, m, l = carry  # [R, K, G, Qm, H], [R, K, G, Qm] x 2
        ids = lax.dynamic_slice_in_dim(page_table, i * ppb, ppb, axis=1)  # [R, ppb]
        k = k_pages[layer, :, ids]  # [R, ppb, K, ps, H] (mixed advanced indexing puts R, ppb first)
        v = v_pages[layer, :, ids]
        k, v = (jnp.swapaxes(x, 2, 3).reshape(R, C, K, H) for x in (k, v))
        key_pos = i * C + jnp.arange(C)
        key_valid = key_pos[None, :] < kv_len[:, None]  # [R, C]
        # Positions past kv_len may hold anything (stale or NaN pages): zero them so 0 * NaN cannot leak.
        k = jnp.where(key_valid[:, :, None, None], k, 0)
        v = jnp.where(key_valid[:, :, None, None], v, 0)
        s = jnp.einsum("RQKGH,RCKH->RKGQC", qs, k, preferred_element_type=jnp.float32) * scale
        mask = (key_pos[None, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :] & q_valid[:, :, None]
        s = jnp.where(mask[:, None, None], s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # rows with no visible key yet keep exp(.) = 0
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(jnp.where(m == NEG_INF, NEG_INF, m - m_safe))
        l = alpha * l + p.sum(axis=-1)
        o = alpha[..., None] * o + jnp.einsum("RKGQC,RCKH->RKGQH", p.astype(v.dtype), v,
                                              preferred_element_type=jnp.float32)
        return o, m_new, l

    init = (jnp.zeros((R, K, G, Qm, H), jnp.float32), jnp.full((R, K, G, Qm), NEG_INF, jnp.float32),
            jnp.zeros((R, K, G, Qm), jnp.float32))
    n_blocks = (jnp.max(kv_len) + C - 1) // C  # dynamic trip count: the longest sequence of this step
    o, _, l = lax.fori_loop(0, n_blocks, body, init)
    o = o / jnp.where(l == 0, 1.0, l)[..., None]
    out = jnp.moveaxis(o, 3, 1).reshape(R * Qm, N, H)  # [R, Qm, K, G, H] -> rows
    dest = jnp.where(q_valid, q_rows, T).reshape(-1)  # invalid rows scatter past the end and are dropped
    return jnp.zeros_like(q).at[dest].set(out.astype(q.dtype), mode="drop")
