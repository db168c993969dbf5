"""Ragged paged attention as a Pallas TPU (Mosaic) kernel; the CPU runs it in TPU interpret mode.

Same step inputs as `kernel.ragged_paged_attention_triton` (query blocks laid out on the host by
`query_layout.query_blocks`), same output [T, N, H]. One program per (query block, KV head) walks the block's
whole visible context: a TPU has one or two large cores, so splitting the context only adds a combine
pass. Page table, lengths and block layout are scalar-prefetched into SMEM; K/V pages stay in HBM and
are DMA'd `pages_per_block` at a time into double-buffered VMEM (the next step's copies are in flight
while the current step computes), and only pages up to the block's last visible key are fetched.

Quantized pages (`jinfer.quant.kv.QuantizedKV`) are DMA'd as stored (int8 / fp8: half the bytes of bf16),
their float32 scales beside them, one [page_size] row per page; as in the GPU kernel, the values are cast
to the queries' dtype and the scales weight the columns of the scores (K) and of the probabilities (V).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jinfer.kernels.paged_attention.validate import check_inputs
from jinfer.quant.kv import is_quantized_kv

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class TPUBlockSizes:
    """block_q: queries of one slot per program; with all G query heads of the KV head they make the
    block_q*G rows of each matrix product (8 fills the f32 sublanes even at G = 1). pages_per_block:
    pages DMA'd per inner step; 16 pages of 16 tokens give 256 keys per step, a full MXU pass on v6e,
    while the VMEM held (2 buffers x K and V) stays at 256 KiB for bf16 with head dim 128."""

    block_q: int = 8
    pages_per_block: int = 16


def _kernel(
    # scalar prefetch (SMEM)
    layer_ref,  # i32[1]
    blk_slot_ref, blk_len_ref, blk_qoff_ref,  # i32[num_blocks]
    kv_len_ref, query_len_ref,  # i32[S]
    page_table_ref,  # i32[S * max_pages]: flat, so SMEM does not pad each row
    # operands
    q_ref,  # [rows, H] this block's queries, row = query * G + head in group
    k_hbm, v_hbm,  # [L, K, P, page_size, H] left in HBM
    # quantized pages: ks_hbm, vs_hbm f32[L, K, P, page_size] (HBM); then the output o_ref [rows, H]; then
    # scratch: k_buf, v_buf VMEM [2, pages_per_block * page_size, H], for quantized pages ks_buf, vs_buf
    # VMEM f32[2, pages_per_block, page_size]; sems DMA [2 (K, V) or 4 (K, V, their scales), 2 (buffer)]
    *refs,
    group: int, page_size: int, pages_per_block: int, max_pages: int, sm_scale: float, quantized: bool,
):
    if quantized:
        ks_hbm, vs_hbm, o_ref, k_buf, v_buf, ks_buf, vs_buf, sems = refs
    else:
        o_ref, k_buf, v_buf, sems = refs
    b, kh = pl.program_id(0), pl.program_id(1)
    rows, _ = q_ref.shape
    ps, ppb = page_size, pages_per_block
    block_k = ppb * ps

    slot = blk_slot_ref[b]
    n_q = blk_len_ref[b]
    layer = layer_ref[0]
    # The slot's chunk is the last query_len of its kv_len tokens; this block starts qoff into it.
    first_pos = kv_len_ref[slot] - query_len_ref[slot] + blk_qoff_ref[b]
    kv_end = jnp.where(n_q > 0, first_pos + n_q, 0)  # keys this block can see: [0, kv_end)
    n_pages = pl.cdiv(kv_end, ps)
    n_steps = pl.cdiv(n_pages, ppb)

    def page_copies(step, buf, fn):
        # Pages past n_pages are never fetched: their buffer rows keep stale data, masked below.
        for j in range(ppb):
            p = step * ppb + j

            @pl.when(p < n_pages)
            def _():
                page = page_table_ref[slot * max_pages + jnp.minimum(p, max_pages - 1)]
                dst = pl.ds(j * ps, ps)
                fn(pltpu.make_async_copy(k_hbm.at[layer, kh, page], k_buf.at[buf, dst], sems.at[0, buf]))
                fn(pltpu.make_async_copy(v_hbm.at[layer, kh, page], v_buf.at[buf, dst], sems.at[1, buf]))
                if quantized:
                    fn(pltpu.make_async_copy(ks_hbm.at[layer, kh, page], ks_buf.at[buf, j], sems.at[2, buf]))
                    fn(pltpu.make_async_copy(vs_hbm.at[layer, kh, page], vs_buf.at[buf, j], sems.at[3, buf]))

    @pl.when(n_steps > 0)
    def _():
        page_copies(0, 0, lambda c: c.start())

    q = q_ref[...]
    # float32 caches get full-precision products so f32 outputs stay exact against the reference.
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    row = lax.broadcasted_iota(jnp.int32, (rows, block_k), 0)
    col = lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    v_row = lax.broadcasted_iota(jnp.int32, (block_k, q.shape[1]), 0)

    def body(i, carry):
        acc, m, l = carry
        buf = i % 2

        @pl.when(i + 1 < n_steps)
        def _():
            page_copies(i + 1, 1 - buf, lambda c: c.start())

        page_copies(i, buf, lambda c: c.wait())
        k, v = k_buf[buf].astype(q.dtype), v_buf[buf].astype(q.dtype)  # [block_k, H]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32,
                            precision=prec) * sm_scale
        if quantized:  # stale or NaN scales of unfetched pages are masked just below
            s = s * ks_buf[buf].reshape(1, block_k)
        k_pos = i * block_k + col
        # Row r holds query r // G; "r // G >= k_pos - first_pos" is "r >= (k_pos - first_pos) * G",
        # which needs no vector integer division. Rows past n_q only see keys below kv_end.
        visible = (row >= (k_pos - first_pos) * group) & (k_pos < kv_end)
        s = jnp.where(visible, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # a row with no key yet keeps exp(.) = 0
        p = jnp.exp(s - m_safe)
        alpha = jnp.exp(jnp.where(m == NEG_INF, NEG_INF, m - m_safe))
        l = alpha * l + p.sum(axis=1, keepdims=True)
        # Rows past kv_len are stale, unfetched or NaN: zero V there so 0 * NaN cannot reach the output.
        v = jnp.where(i * block_k + v_row < kv_end, v, jnp.zeros_like(v))
        pw = p
        if quantized:  # the sum l stays over p; the values' scales weight p's columns (zeroed past kv_len too)
            key_ok = i * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1) < kv_end
            pw = p * jnp.where(key_ok, vs_buf[buf].reshape(1, block_k), 0.0)
        pv = jnp.dot(pw.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=prec)
        return alpha * acc + pv, m_new, l

    H = q.shape[1]
    init = (jnp.zeros((rows, H), jnp.float32), jnp.full((rows, 1), NEG_INF, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32))
    acc, _, l = lax.fori_loop(0, n_steps, body, init)
    o_ref[...] = (acc / jnp.where(l == 0, 1.0, l)).astype(o_ref.dtype)


def _validate(q, k_pages, v_pages, page_table, kv_len, query_len, blocks, tok_block, tok_row, num_blocks,
              bs, interpret):
    check_inputs(q, k_pages, v_pages, page_table, kv_len, query_len, blocks, tok_block, tok_row, num_blocks)
    ps = k_pages.shape[3]
    if bs.block_q < 1 or bs.pages_per_block < 1:
        raise ValueError(f"block sizes must be positive; got {bs.block_q=} {bs.pages_per_block=}")
    stored = k_pages.values.dtype if is_quantized_kv(k_pages) else k_pages.dtype
    sublanes = 32 // jnp.dtype(stored).itemsize  # one VMEM tile's rows: 8 f32, 16 bf16, 32 int8 / fp8
    if not interpret and ps % sublanes:
        # Each page is DMA'd to a row offset j * page_size of the VMEM buffer; Mosaic wants tile-aligned rows.
        raise ValueError(f"page_size={ps} must be a multiple of {sublanes} for {stored} pages on a TPU")


@functools.partial(jax.jit, static_argnames=("num_blocks", "block_sizes", "interpret", "sm_scale"))
def ragged_paged_attention_tpu(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [L, K, P, page_size, H], or a QuantizedKV of that shape
    v_pages: jax.Array,
    layer: jax.Array,  # i32[]
    page_table: jax.Array,  # i32[S, max_pages]
    kv_len: jax.Array,  # i32[S]
    query_len: jax.Array,  # i32[S]
    blocks: tuple[jax.Array, ...],  # (blk_slot, blk_row0, blk_len, blk_qoff), each i32[num_blocks]
    tok_block: jax.Array,  # i32[T]
    tok_row: jax.Array,  # i32[T]
    *,
    num_blocks: int,
    block_sizes: TPUBlockSizes,
    interpret: bool | pltpu.InterpretParams,  # True: TPU interpret mode with default params
    sm_scale: float | None = None,
) -> jax.Array:  # [T, N, H]; rows of tokens no block owns are zero
    _validate(q, k_pages, v_pages, page_table, kv_len, query_len, blocks, tok_block, tok_row, num_blocks,
              block_sizes, interpret)
    T, N, H = q.shape
    L, K, P, ps, _ = k_pages.shape
    G = N // K
    bq, ppb = block_sizes.block_q, block_sizes.pages_per_block
    rows = bq * G
    scale = H ** -0.5 if sm_scale is None else sm_scale
    blk_slot, blk_row0, blk_len, blk_qoff = (x.astype(jnp.int32) for x in blocks)

    # Gather each block's queries into one [rows, H] tile per KV head: a full-dims block for Mosaic, and
    # one small copy of q instead of a dynamic row window (rows past T are clamped onto the last token).
    q_rows = jnp.minimum(blk_row0[:, None] + jnp.arange(bq, dtype=jnp.int32), T - 1)  # [nb, bq]
    qb = q.reshape(T, K, G, H)[q_rows].transpose(0, 2, 1, 3, 4).reshape(num_blocks, K, rows, H)

    scalars = (jnp.reshape(layer, (1,)).astype(jnp.int32), blk_slot, blk_len, blk_qoff,
               kv_len.astype(jnp.int32), query_len.astype(jnp.int32), page_table.reshape(-1).astype(jnp.int32))
    quantized = is_quantized_kv(k_pages)
    pages = (k_pages.values, v_pages.values, k_pages.scale, v_pages.scale) if quantized else (k_pages, v_pages)
    scale_bufs = [pltpu.VMEM((2, ppb, ps), k_pages.scale.dtype)] * 2 if quantized else []
    kernel = functools.partial(_kernel, group=G, page_size=ps, pages_per_block=ppb,
                               max_pages=page_table.shape[1], sm_scale=scale, quantized=quantized)
    tile = pl.BlockSpec((None, None, rows, H), lambda b, h, *_: (b, h, 0, 0))
    o = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars),
            grid=(num_blocks, K),
            in_specs=[tile, *(pl.BlockSpec(memory_space=pl.ANY) for _ in pages)],
            out_specs=tile,
            scratch_shapes=[pltpu.VMEM((2, ppb * ps, H), pages[0].dtype),
                            pltpu.VMEM((2, ppb * ps, H), pages[1].dtype),
                            *scale_bufs,
                            pltpu.SemaphoreType.DMA((len(pages), 2))],
        ),
        out_shape=jax.ShapeDtypeStruct((num_blocks, K, rows, H), q.dtype),
        # Every (block, head) program is independent: both axes may be split across a chip's cores.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret is True else (interpret or False),
        name="ragged_paged_attention_tpu",
    )(*scalars, qb, *pages)

    o = o.reshape(num_blocks, K, bq, G, H)[tok_block, :, tok_row]  # [T, K, G, H]
    # Padding tokens point at some block's row; only a token that is that row keeps its output.
    owned = (tok_row < blk_len[tok_block]) & (blk_row0[tok_block] + tok_row == jnp.arange(T))
    return jnp.where(owned[:, None, None, None], o, 0).reshape(T, N, H)
