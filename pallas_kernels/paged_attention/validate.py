"""Input checks shared by the ragged paged attention kernels (GPU and TPU): every error names the offending
argument and shows its shape or dtype."""

from __future__ import annotations

import jax.numpy as jnp

from jinfer.quant.kv import SCALE_DTYPE, STORAGE, is_quantized_kv


def check_inputs(q, k_pages, v_pages, page_table, kv_len, query_len, blocks, tok_block, tok_row, num_blocks) -> None:
    """The shapes and dtypes of `ragged_paged_attention_*`'s arguments (see `kernel.ragged_paged_attention_triton`)."""
    if q.ndim != 3 or len(k_pages.shape) != 5:
        raise ValueError(f"q must be [T, N, H] and k_pages [L, K, P, page_size, H]; got {q.shape=} {k_pages.shape=}")
    T, N, H = q.shape
    _, K, _, _, Hk = k_pages.shape
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"{v_pages.shape=} must equal {k_pages.shape=}")
    if is_quantized_kv(k_pages) or is_quantized_kv(v_pages):
        _check_quantized(k_pages, v_pages)
    elif not q.dtype == k_pages.dtype == v_pages.dtype:
        raise ValueError(f"dtypes differ: {q.dtype=} {k_pages.dtype=} {v_pages.dtype=}")
    if Hk != H or N % K:
        raise ValueError(f"head dims {H=} vs {Hk=}, or query heads {N=} not a multiple of KV heads {K=}")
    if T < 1 or num_blocks < 1:
        raise ValueError(f"need at least one token row and one block: {q.shape=} {num_blocks=}")
    if page_table.ndim != 2:
        raise ValueError(f"page_table must be [S, max_pages]; got {page_table.shape=}")
    S = page_table.shape[0]
    for name, x, want in (("kv_len", kv_len, (S,)), ("query_len", query_len, (S,)),
                          ("tok_block", tok_block, (T,)), ("tok_row", tok_row, (T,))):
        if x.shape != want:
            raise ValueError(f"{name} must have shape {want}; got {x.shape}")
    if len(blocks) != 4 or any(x.shape != (num_blocks,) for x in blocks):
        raise ValueError(f"blocks must be 4 arrays of shape ({num_blocks=},); got {[x.shape for x in blocks]}")
    for name, x in (("page_table", page_table), ("kv_len", kv_len), ("query_len", query_len),
                    ("blocks", blocks[0]), ("tok_block", tok_block), ("tok_row", tok_row)):
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be an integer array; got {x.dtype}")


def _check_quantized(k_pages, v_pages) -> None:
    """Quantized pages (QuantizedKV): both K and V, one storage type, a float32 scale per vector."""
    if not (is_quantized_kv(k_pages) and is_quantized_kv(v_pages)):
        raise ValueError(f"k_pages and v_pages must both be quantized or both float; got "
                         f"{type(k_pages).__name__} and {type(v_pages).__name__}")
    for name, x in (("k_pages", k_pages), ("v_pages", v_pages)):
        if x.values.dtype not in [jnp.dtype(d) for d in STORAGE.values()] or x.values.dtype != k_pages.values.dtype:
            raise ValueError(f"{name}.values.dtype={x.values.dtype} must be int8 or float8_e4m3fn, as "
                             f"k_pages.values ({k_pages.values.dtype})")
        if x.scale.shape != x.values.shape[:-1] or x.scale.dtype != SCALE_DTYPE:
            raise ValueError(f"{name}.scale must be float32{list(x.values.shape[:-1])}; got "
                             f"{x.scale.dtype}{list(x.scale.shape)}")
