"""The engine's attention-backend interface: how one step's ragged queries attend to the paged KV cache.

Cache layout: k_pages, v_pages: [L, K, P, page_size, H], KV-head major so that each (layer, head, page)
is one contiguous [page_size, H] tile for the kernels to load, and so a mesh can split heads. With a
`kv_cache_dtype` each is a `jinfer.quant.kv.QuantizedKV` instead: int8 / fp8 values in that layout and one
float32 scale per token and head ([L, K, P, page_size]); every backend dequantizes the tiles it loads. The model
runs on one flattened ragged batch of tokens ([1, T] with per-token rows); `PagedMeta` says which row
(one sequence) owns each token and where each row's pages are. Page 0 is reserved: padding tokens write there and no
request reads it.

A backend (`AttentionBackend`) has a host half and a device half, as vLLM v1 splits a metadata builder
from its backend: `step_metadata` lays out the backend's own per-step arrays from the plan's per-row
arrays (numpy, once per step, outside jit), and `attend` computes attention inside the jitted step,
reading them back from `PagedMeta.backend`. The runner and the model are the same for every backend:
`blocked.py` (plain `jnp`) and `pallas.py` (the Pallas GPU and TPU kernels) implement it, `select.py`
picks one for the platform.
"""

from __future__ import annotations

import dataclasses
from typing import Generic, Protocol, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.kernels.rope_kv import rope_and_store
from jinfer.models.layers import apply_rope, scale_rows
from jinfer.quant.kv import empty_kv, is_quantized_kv, round_trip_kv, store_tokens

M = TypeVar("M")  # a backend's own per-step metadata: a pytree of arrays


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedMeta(Generic[M]):
    """One step's attention metadata, a pytree of arrays only (no static fields): a step's compiled shape is
    these arrays' shapes plus the query width, a static argument of the runner's jitted step that reaches
    `attend` as `width`."""

    token_row: jax.Array  # i32[T]: the row (one sequence's pages) each token belongs to
    token_valid: jax.Array  # bool[T]: False for bucket padding (its K/V go to the reserved page 0)
    page_table: jax.Array  # i32[R, max_pages]
    kv_len: jax.Array  # i32[R]: after this step's tokens
    query_start: jax.Array  # i32[R]
    query_len: jax.Array  # i32[R]
    kv_slot: jax.Array  # i32[T]: where each token's K/V go, page * page_size + offset (`kv_slots`)
    backend: M  # the backend's own arrays, from its `step_metadata`


class AttentionBackend(Protocol[M]):
    """An attention backend of the engine (implemented by `blocked.BlockedBackend`,
    `pallas.PallasBackend` and `pallas.TPUPallasBackend`). A class attribute `rope_kv_kernel` (absent: False)
    says the backend's pages take a step's K/V through `jinfer.kernels.rope_kv` (RoPE and the write in one
    kernel; `attend` then gets k = v = None); `rope_decode` (absent: False) that its
    `rope_attend(qkv, inv_freq, k_pages, v_pages, layer, meta, width)` does RoPE, the write and attention of a
    decode step (width 1) in one, and with `rows=(x [T, D], eps)` first scales q, k, v by the RMSNorm factor of
    their token's row of x (folded norms, `llama.fold_norms`). A class attribute `partitionable` says whether XLA
    can split `attend` over a mesh by itself (plain jnp); where it cannot (a kernel), the runner wraps the
    backend in `sharded.HeadShardedBackend`."""

    def step_metadata(self, query_start: np.ndarray, query_len: np.ndarray, num_tokens: int, width: int) -> M:
        """Host half (numpy): the backend's per-step arrays for a step of `num_tokens` token rows (bucket
        padding included) and at most `width` queries per row, from the plan's query_start, query_len
        (i32[R]). Their shapes may depend only on (num_tokens, width, R): each distinct set compiles once."""
        ...

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
               layer: jax.Array, meta: PagedMeta[M], width: int) -> jax.Array:
        """Device half (under jit): q [T, N, H] against `layer` (i32[]) of the pages (float arrays or
        QuantizedKV), which already hold this step's K/V (also given as k, v [T, K, H], as the pages give them
        back, for a backend that attends to them directly), -> [T, N, H].
        `width` (static) is the one given to `step_metadata`."""
        ...


def page_size(pages) -> int:
    """Tokens a page of a pool holds (float or QuantizedKV, [L, K, P, page_size, H])."""
    return (pages.values if is_quantized_kv(pages) else pages).shape[3]


def kv_slots(page_table: jax.Array, token_row: jax.Array, token_valid: jax.Array, positions: jax.Array,
             pages) -> jax.Array:
    """i32[T]: page * page_size + offset of each token's K/V (at positions i32[T]) in its row's pages of `pages`
    (the K pool, float or QuantizedKV), 0 (the reserved page) for padding. Computed once a step, not in every
    layer: XLA leaves such loop-invariant arithmetic inside the layer loop, a kernel a layer where nothing fuses it."""
    ps = page_size(pages)
    page = page_table[token_row, positions // ps]
    return jnp.where(token_valid, page * ps + positions % ps, 0)


def paged_kv_cache(num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype,
                   kv_cache_dtype: str | None = None):
    """(k_pages, v_pages): float arrays of `dtype`, or QuantizedKV pools for kv_cache_dtype "int8" / "fp8"."""
    shape = (num_layers, num_kv_heads, num_pages, page_size, head_dim)
    return empty_kv(shape, dtype, kv_cache_dtype), empty_kv(shape, dtype, kv_cache_dtype)


def make_paged_attention(width: int, backend: AttentionBackend):
    """The `attention` callable of `llama.forward` for one compiled step shape (`width`: the most
    queries one row has in the step). It scales rows (`scales_rows`): with folded norms the kernel that rotates
    q and k (`rope_attend`, `rope_and_store`) multiplies q, k, v by their token's norm factor itself; without one
    XLA does it first."""

    @jax.named_scope("attention")  # benchmarks/step_profile.py sorts the step's time by these scopes
    def attention(q, k, v, k_pages, v_pages, layer, positions, meta: PagedMeta, inv_freq, rows=None):
        kernel = getattr(backend, "rope_kv_kernel", False) and not is_quantized_kv(k_pages)
        fused_decode = kernel and width <= 1 and getattr(backend, "rope_decode", False)
        if rows is not None and not kernel:
            q, k, v = (scale_rows(t, *rows) for t in (q, k, v))
        if kernel:
            # One kernel rotates q and k and writes k and v (the concatenation of the fused product's own slices
            # is that product again to XLA); the backend reads this step's K/V from the pages.
            qkv = jnp.concatenate([q, k, v], axis=2)[0]
            x, eps = (None, None) if rows is None else (rows[0][0], rows[1])  # the kernels take [T, D] rows
            if fused_decode:
                out, k_pages, v_pages = backend.rope_attend(qkv, inv_freq, k_pages, v_pages, layer, meta, width,
                                                            rows=None if x is None else (x, eps))
                return out[None], k_pages, v_pages
            q, k_pages, v_pages = rope_and_store(qkv, positions[0], inv_freq, k_pages, v_pages, layer, meta.kv_slot,
                                                 x, num_heads=q.shape[2], interpret=backend.interpret, eps=eps)
            return backend.attend(q, None, None, k_pages, v_pages, layer, meta, width)[None], k_pages, v_pages
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        ps = page_size(k_pages)
        page, offset = meta.kv_slot // ps, meta.kv_slot % ps
        k_pages = store_tokens(k_pages, layer, page, offset, k[0])
        v_pages = store_tokens(v_pages, layer, page, offset, v[0])
        if is_quantized_kv(k_pages):  # a backend that reads this step's K/V directly sees what the pages hold
            k, v = (round_trip_kv(x, k_pages.fmt) for x in (k, v))
        out = backend.attend(q[0], k[0], v[0], k_pages, v_pages, layer, meta, width)
        return out[None], k_pages, v_pages

    attention.scales_rows = True
    return attention
