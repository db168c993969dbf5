"""Plain-`jnp` ragged paged attention: the reference every kernel (and the blocked `jnp` attention the
engine uses off the GPU, `blocked.py`) is checked against.

Layout. Queries of all requests are flattened: q [T, N, H]; request (slot) s owns the rows
query_start[s] .. query_start[s] + query_len[s] - 1, which are the last query_len[s] tokens of its
sequence of kv_len[s] tokens (so decode is query_len 1, a prefill chunk is query_len > 1 starting at
an offset into a longer cached context). Its K/V live in pages, KV-head major so that one head's page
is one contiguous [page_size, head_dim] tile: token i of slot s, head h is at
pages[h, page_table[s, i // page_size], i % page_size]. Causal: a query at position p sees keys 0..p.
Pages may be quantized (`jinfer.quant.kv.QuantizedKV`: int8 / fp8 values with one scale per token and
head), read here by `jinfer.quant.kv.load_kv`, the same dequantization the dense reference loop applies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.quant.kv import load_kv


def ragged_paged_attention_reference(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [K, P, page_size, H], or [L, K, P, page_size, H] with `layer`; or a QuantizedKV
    v_pages: jax.Array,  # likewise
    page_table: jax.Array,  # i32[S, max_pages]
    kv_len: jax.Array,  # i32[S]
    query_start: jax.Array,  # i32[S]
    query_len: jax.Array,  # i32[S]; 0 for idle slots
    *,
    max_query_len: int,  # static: no slot has more queries than this
    sm_scale: float | None = None,
    layer: jax.Array | None = None,  # i32[]: which layer of stacked pages (read in place, never sliced out)
) -> jax.Array:  # [T, N, H]; rows no slot owns are zero
    T, N, H = q.shape
    S = page_table.shape[0]
    K, P, ps, _ = k_pages.shape[-4:]
    G = N // K
    scale = H ** -0.5 if sm_scale is None else sm_scale
    j = jnp.arange(max_query_len)
    q_valid = j[None, :] < query_len[:, None]  # [S, Qm]
    q_rows = jnp.where(q_valid, query_start[:, None] + j[None, :], 0)  # [S, Qm]
    q_pos = kv_len[:, None] - query_len[:, None] + j[None, :]  # [S, Qm]
    qs = q[q_rows].reshape(S, max_query_len, K, G, H)

    ctx = page_table.shape[1] * ps
    key_pos = jnp.arange(ctx)
    # With `layer`, one gather from the stacked cache (slicing the layer out first would copy its whole pool);
    # quantized pages are dequantized as gathered, into the queries' dtype.
    index = (slice(None), page_table) if layer is None else (layer, slice(None), page_table)
    k, v = load_kv(k_pages, index, q.dtype), load_kv(v_pages, index, q.dtype)
    # [K, S, max_pages, ps, H] (or [S, max_pages, K, ps, H] after mixed indexing) -> [S, ctx, K, H]
    if layer is None:
        k, v = (jnp.moveaxis(x, 0, 3).reshape(S, ctx, K, H) for x in (k, v))
    else:
        k, v = (jnp.swapaxes(x, 2, 3).reshape(S, ctx, K, H) for x in (k, v))
    # Positions past kv_len may hold anything (stale or NaN pages): zero them so 0 * NaN cannot leak.
    key_valid = key_pos[None, :] < kv_len[:, None]  # [S, ctx]
    k = jnp.where(key_valid[:, :, None, None], k, 0)
    v = jnp.where(key_valid[:, :, None, None], v, 0)

    scores = jnp.einsum("SQKGH,SCKH->SKGQC", qs, k, preferred_element_type=jnp.float32) * scale
    mask = (key_pos[None, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :] & q_valid[:, :, None]
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    # A query row with no visible key (an idle slot's padding) would be all -inf: give it zeros instead.
    probs = jnp.where(mask[:, None, None], jax.nn.softmax(scores, axis=-1), 0.0).astype(v.dtype)
    out = jnp.einsum("SKGQC,SCKH->SQKGH", probs, v).reshape(S, max_query_len, N, H)
    dest = jnp.where(q_valid, q_rows, T)  # invalid rows scatter past the end and are dropped
    return jnp.zeros_like(q).at[dest.reshape(-1)].set(out.reshape(-1, N, H).astype(q.dtype), mode="drop")
