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
    backend: M  # the backend's own arrays, from its `step_metadata`


class AttentionBackend(Protocol[M]):
    """An attention backend of the engine (implemented by `blocked.BlockedBackend`,
    `pallas.PallasBackend` and `pallas.TPUPallasBackend`). A class attribute `partitionable` says whether XLA
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


def paged_kv_cache(num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, dtype,
                   kv_cache_dtype: str | None = None):
    """(k_pages, v_pages): float arrays of `dtype`, or QuantizedKV pools for kv_cache_dtype "int8" / "fp8"."""
    shape = (num_layers, num_kv_heads, num_pages, page_size, head_dim)
    return empty_kv(shape, dtype, kv_cache_dtype), empty_kv(shape, dtype, kv_cache_dtype)


def make_paged_attention(width: int, backend: AttentionBackend):
    """The `attention` callable of `llama.forward` for one compiled step shape (`width`: the most
    queries one row has in the step)."""

    @jax.named_scope("attention")  # benchmarks/step_profile.py sorts the step's time by these scopes
    def attention(q, k, v, k_pages, v_pages, layer, positions, meta: PagedMeta):
        ps = k_pages.shape[3]
        pos = positions[0]
        page = jnp.where(meta.token_valid, meta.page_table[meta.token_row, pos // ps], 0)
        offset = jnp.where(meta.token_valid, pos % ps, 0)
        k_pages = store_tokens(k_pages, layer, page, offset, k[0])
        v_pages = store_tokens(v_pages, layer, page, offset, v[0])
        if is_quantized_kv(k_pages):  # a backend that reads this step's K/V directly sees what the pages hold
            k, v = (round_trip_kv(x, k_pages.fmt) for x in (k, v))
        out = backend.attend(q[0], k[0], v[0], k_pages, v_pages, layer, meta, width)
        return out[None], k_pages, v_pages

    return attention
