"""Ragged paged attention in plain `jnp`, walking the context a block of pages at a time (online softmax)
and only as far as the longest sequence of the step: the engine's attention where no Pallas kernel
runs natively (the CPU).

The reference (`reference.py`) gathers every slot's whole page table, max_model_len keys per slot, in
one go: simple and independent, the oracle of the tests, but on a 8k-context model with 16 slots that is
~100 MB of K per layer per step even when the sequences hold 200 tokens. Here the trip count of the loop
is ceil(max(kv_len) / block): shapes stay static (one compilation per step shape), the work follows the
sequences. Same layout and arguments as the reference; the pages may be quantized (`jinfer.quant.kv.QuantizedKV`),
each gathered block then dequantized to the queries' dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jinfer.quant.kv import load_kv

NEG_INF = float("-inf")


@functools.partial(jax.jit, static_argnames=("max_query_len", "pages_per_block", "sm_scale"))
def blocked_paged_attention(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [L, K, P, page_size, H], or a QuantizedKV of that shape
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


def _attend_rows(q, k_pages, v_pages, page_table, kv_len, q_rows, q_pos, q_valid, layer, *, pages_per_block,
                 sm_scale):
    """Rows of queries (q_rows, q_pos, q_valid: [R, Qm]), each row against one sequence's pages
    (page_table [R, max_pages], kv_len [R]) -> [T, N, H], rows no query owns zero."""
    stats = _rows_stats(q, k_pages, v_pages, page_table, kv_len, q_rows, q_pos, q_valid, layer,
                        pages_per_block=pages_per_block, sm_scale=sm_scale)
    o, _, l = _to_tokens(q.shape[0], q_rows, q_valid, *stats)
    return (o / jnp.where(l == 0, 1.0, l)[..., None]).reshape(q.shape).astype(q.dtype)


def _rows_stats(q, k_pages, v_pages, page_table, kv_len, q_rows, q_pos, q_valid, layer, *, pages_per_block,
                sm_scale):
    """Per row of work: unnormalized (o f32[R, K, G, Qm, H], m, l f32[R, K, G, Qm])."""
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

    def block(first_page, n_pages, carry):  # keys [first_page * ps, + n_pages * ps) of every row
        o, m, l = carry  # [R, K, G, Qm, H], [R, K, G, Qm] x 2
        n = n_pages * ps
        ids = lax.dynamic_slice_in_dim(page_table, first_page, n_pages, axis=1)  # [R, n_pages]
        # [R, n_pages, K, ps, H] (mixed advanced indexing puts R, n_pages first); quantized pages dequantized
        k = load_kv(k_pages, (layer, slice(None), ids), q.dtype)
        v = load_kv(v_pages, (layer, slice(None), ids), q.dtype)
        k, v = (jnp.swapaxes(x, 2, 3).reshape(R, n, K, H) for x in (k, v))
        key_pos = first_page * ps + jnp.arange(n)
        key_valid = key_pos[None, :] < kv_len[:, None]  # [R, n]
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

    longest = jnp.max(kv_len)
    n_blocks = (longest + C - 1) // C  # dynamic trip count: the longest sequence of this step
    # The gathers move every key of a block whether valid or not, so the first block, all that short contexts
    # need, comes in quarter sizes: the smallest that holds the longest context (capped at a whole block).
    sizes = sorted({max(1, ppb * f // 4) for f in range(1, 5)})
    pick = jnp.searchsorted(jnp.array([n * ps for n in sizes]), jnp.minimum(longest, C))
    first = lax.switch(pick, [functools.partial(block, 0, n) for n in sizes], _empty_stats(R, K, G, Qm, H))
    return lax.fori_loop(1, n_blocks, lambda i, carry: block(i * ppb, ppb, carry), first)


def _empty_stats(R, K, G, Qm, H):
    return (jnp.zeros((R, K, G, Qm, H), jnp.float32), jnp.full((R, K, G, Qm), NEG_INF, jnp.float32),
            jnp.zeros((R, K, G, Qm), jnp.float32))


def _to_tokens(T, q_rows, q_valid, o, m, l):
    """Per-row stats [R, K, G, Qm, ...] -> per token [T, K, G, ...]; tokens no row owns get (0, -inf, 0)."""
    R, K, G, Qm = m.shape
    dest = jnp.where(q_valid, q_rows, T).reshape(-1)  # invalid rows scatter past the end and are dropped

    def scatter(x, fill):
        x = jnp.moveaxis(x, 3, 1).reshape(R * Qm, K, G, *x.shape[4:])
        return jnp.full((T, *x.shape[1:]), fill, x.dtype).at[dest].set(x, mode="drop")

    return scatter(o, 0.0), scatter(m, NEG_INF), scatter(l, 0.0)


def _prefix_stats(q, k_pages, v_pages, page_table, prefix, q_rows, q_pos, q_valid, layer, *, group, pages_per_block,
                  sm_scale):
    """`_rows_stats` -> `_to_tokens` for rows of which only some have keys before the step (prefix > 0): those rows
    are moved to the front and walked `group` rows at a time, as many groups as hold such rows, so a step
    that continues a few sequences (decode rows beside fresh prompts) pays for those rows, not for all."""
    T = q.shape[0]
    R, Qm = q_rows.shape
    n_groups = -(-R // group)
    pad = n_groups * group - R
    has = prefix > 0
    order = jnp.argsort(~has, stable=True)  # rows with a prefix first
    rows = [jnp.pad(x[order], ((0, pad),) + ((0, 0),) * (x.ndim - 1)) for x in
            (page_table, prefix, q_rows, q_pos, q_valid)]
    _, K, _, _, H = k_pages.shape
    G = q.shape[1] // K

    def body(g, acc):
        sl = [lax.dynamic_slice_in_dim(x, g * group, group, axis=0) for x in rows]
        stats = _rows_stats(q, k_pages, v_pages, *sl, layer, pages_per_block=pages_per_block, sm_scale=sm_scale)
        return tuple(lax.dynamic_update_slice_in_dim(a, x, g * group, axis=0) for a, x in zip(acc, stats))

    acc = lax.fori_loop(0, (jnp.sum(has) + group - 1) // group, body, _empty_stats(n_groups * group, K, G, Qm, H))
    return _to_tokens(T, rows[2], rows[4], *acc)


def _own_tokens(q, k, v, q_slot, k_slot, q_pos, k_pos, q_valid, k_valid, scale):
    """Queries [Tq, N, H] against the step's own keys [Tk, K, H] (same sequence, causal) -> unnormalized
    (o f32[Tq, K, G, H], m, l f32[Tq, K, G])."""
    Tq, N, H = q.shape
    K = k.shape[1]
    mask = ((q_slot[:, None] == k_slot[None, :]) & (k_pos[None, :] <= q_pos[:, None]) & q_valid[:, None]
            & k_valid[None, :])
    s = jnp.einsum("TKGH,SKH->KGTS", q.reshape(Tq, K, N // K, H), k, preferred_element_type=jnp.float32) * scale
    s = jnp.where(mask, s, NEG_INF)
    m = s.max(axis=-1)  # [K, G, Tq]
    p = jnp.exp(s - jnp.where(m == NEG_INF, 0.0, m)[..., None])
    o = jnp.einsum("KGTS,SKH->TKGH", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o, jnp.moveaxis(m, 2, 0), jnp.moveaxis(p.sum(axis=-1), 2, 0)


@functools.partial(jax.jit, static_argnames=("block_q", "pages_per_block", "prefix_group", "sm_scale"))
def blocked_prefill_attention(
    q: jax.Array,  # [T, N, H]
    k: jax.Array,  # [T, K, H]: this step's keys (also written into the pages)
    v: jax.Array,  # [T, K, H]
    k_pages: jax.Array,  # [L, K, P, page_size, H], or a QuantizedKV of that shape
    v_pages: jax.Array,
    page_table: jax.Array,  # i32[S, max_pages]
    kv_len: jax.Array,  # i32[S]: after this step's tokens
    query_start: jax.Array,  # i32[S]
    query_len: jax.Array,  # i32[S]
    token_slot: jax.Array,  # i32[T]
    token_valid: jax.Array,  # bool[T]
    blocks: tuple[jax.Array, ...],  # query blocks over the same tokens (query_layout.query_blocks)
    layer: jax.Array,  # i32[]
    *,
    block_q: int,
    pages_per_block: int,
    prefix_group: int = 8,
    sm_scale: float | None = None,
) -> jax.Array:  # [T, N, H]; rows no slot owns are zero
    """Attention of a step that prefills chunks, in two parts merged by their softmax statistics: the step's
    own tokens against each other (dense products masked to same sequence and causal order, up to 8 blocks of
    queries each against the keys up to its end: a few large matmuls instead of many small ones; the tokens
    must lie sequence after sequence, each in position order, as the scheduler lays them out), and each
    query block against its sequence's keys from before this step (the cached prefix, earlier chunks, or
    the whole context of a decode row), walked page block by page block as far as the longest such prefix,
    only for the blocks that have one, `prefix_group` blocks at a time (none at all when every chunk starts
    its sequence)."""
    T, N, H = q.shape
    scale = H ** -0.5 if sm_scale is None else sm_scale
    start = kv_len - query_len  # [S]: keys before this step
    pos = start[token_slot] + jnp.arange(T) - query_start[token_slot]
    # Tokens of one sequence sit in order and sequences do not interleave, so token t sees no token after it:
    # query block b needs only the keys before its end, which skips ~half the causal product.
    n_qb = max(1, min(8, T // 64))
    bounds = [T * b // n_qb for b in range(n_qb + 1)]
    parts = [_own_tokens(q[a:e], k[:e], v[:e], token_slot[a:e], token_slot[:e], pos[a:e], pos[:e],
                         token_valid[a:e], token_valid[:e], scale) for a, e in zip(bounds, bounds[1:])]
    o1, m1, l1 = (jnp.concatenate(x, axis=0) for x in zip(*parts))  # [T, K, G, H], [T, K, G] x 2

    blk_slot, blk_row0, blk_len, blk_qoff = blocks
    j = jnp.arange(block_q)
    q_valid = j[None, :] < blk_len[:, None]
    q_rows = jnp.where(q_valid, blk_row0[:, None] + j[None, :], 0)
    q_pos = start[blk_slot][:, None] + blk_qoff[:, None] + j[None, :]
    prefix = jnp.where(blk_len > 0, start[blk_slot], 0)  # keys before the step only; unused blocks see none
    o2, m2, l2 = _prefix_stats(q, k_pages, v_pages, page_table[blk_slot], prefix, q_rows, q_pos, q_valid, layer,
                               group=prefix_group, pages_per_block=pages_per_block, sm_scale=sm_scale)
    m = jnp.maximum(m1, m2)
    m_safe = jnp.where(m == NEG_INF, 0.0, m)
    a1 = jnp.exp(jnp.where(m1 == NEG_INF, NEG_INF, m1 - m_safe))
    a2 = jnp.exp(jnp.where(m2 == NEG_INF, NEG_INF, m2 - m_safe))
    l = a1 * l1 + a2 * l2
    o = (a1[..., None] * o1 + a2[..., None] * o2) / jnp.where(l == 0, 1.0, l)[..., None]
    return jnp.where(token_valid[:, None, None], o.reshape(T, N, H), 0).astype(q.dtype)
