"""The engine's attention backend: K/V written into a paged cache, then ragged paged attention.

Cache layout: k_pages, v_pages: [L, K, P, page_size, H], KV-head major so that each (layer, head, page)
is one contiguous [page_size, H] tile for the kernels to load, and so a mesh can split heads. The model runs on one flattened ragged batch
of tokens ([1, T] with per-token slots); `PagedMeta` says which slot owns each token and where each
slot's pages are. Page 0 is reserved: padding tokens write there and no request reads it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class PagedMeta(NamedTuple):
    token_slot: jax.Array  # i32[T]
    token_valid: jax.Array  # bool[T]: False for bucket padding
    page_table: jax.Array  # i32[S, max_pages]
    kv_len: jax.Array  # i32[S]: after this step's tokens
    query_start: jax.Array  # i32[S]
    query_len: jax.Array  # i32[S]
    extra: dict  # the attention backend's own per-step arrays


def paged_kv_cache(num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype):
    shape = (num_layers, num_kv_heads, num_pages, page_size, head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def make_paged_attention(width: int, backend):
    """The `attention` callable of `llama.forward` for one compiled step shape (`width`: the most
    queries one slot has in the step; see jinfer.attention.backends)."""

    def attention(q, k, v, k_pages, v_pages, layer, positions, meta: PagedMeta):
        ps = k_pages.shape[3]
        pos = positions[0]
        page = jnp.where(meta.token_valid, meta.page_table[meta.token_slot, pos // ps], 0)
        offset = jnp.where(meta.token_valid, pos % ps, 0)
        k_pages = k_pages.at[layer, :, page, offset].set(k[0].astype(k_pages.dtype))
        v_pages = v_pages.at[layer, :, page, offset].set(v[0].astype(v_pages.dtype))
        out = backend.attend(q[0], k_pages, v_pages, layer, meta, meta.extra, width)
        return out[None], k_pages, v_pages

    return attention
