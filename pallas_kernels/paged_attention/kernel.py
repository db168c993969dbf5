"""Ragged paged attention as a Pallas kernel (GPU Triton lowering; the CPU runs it in interpret mode).

Work is cut into *query blocks*: up to `block_q` consecutive queries of one slot. Each program takes one
query block, one KV head (all `G` query heads of that group together, so each K/V tile is read once
for the whole group) and one split of the context (Flash-Decoding: a long context alone still spreads
over many programs). It walks the slot's pages `pages_per_block` at a time with an online softmax and
writes an unnormalized partial output plus its running max and sum; `combine.combine_splits` merges the splits.

The host lays the query blocks out (`query_layout.query_blocks`), so the kernel grid is static:
`num_blocks` = tokens / block_q + slots covers any step of at most that many tokens.

Quantized pages (`jinfer.quant.kv.QuantizedKV`: int8 / fp8 values, one float32 scale per token and head)
are read as stored and cast to the queries' dtype (exact: both formats' values are exact in bf16); each key's
scale multiplies its column of the scores and each value's scale its column of the probabilities, a
[rows, block_k] product instead of dequantizing the [block_k, H] tiles.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jinfer.kernels.paged_attention.combine import combine_splits
from jinfer.kernels.paged_attention.validate import check_inputs
from jinfer.quant.kv import is_quantized_kv

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_q: queries of one slot per program (block_q x the group size padded to a power of two
    makes the rows of each matrix product; they must be >= 16). pages_per_block: pages loaded per inner
    step. num_splits: context splits per query block (Flash-Decoding; 1 for prefill-heavy steps).
    num_warps, num_stages: Triton launch options; combine_warps: the split combine's. unmasked_steps: run the
    steps whose keys every query of the block sees (a decode step's context but its last step) in a loop of
    their own without the masks, which cost about as many instructions as the rest of a step outside the
    products (sm_90 machine code, `benchmarks/sass_profile.py decode`: 377 instead of 515 a step at B8 ctx 32k,
    at about the same registers (128, 123); at some sizes the kernel then needs more registers, 156 instead of 125 at B64
    ctx 4096 with one split). Not yet timed on a GPU: off in the tuning table until it is."""

    block_q: int = 4
    pages_per_block: int = 8
    num_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2
    combine_warps: int = 4
    unmasked_steps: bool = False


def _kernel(
    # scalar-ish inputs (whole arrays)
    layer_ref, blk_slot_ref, blk_row0_ref, blk_len_ref, blk_qoff_ref, kv_len_ref, query_len_ref, page_table_ref,
    # tensors
    q_ref,  # [T, Gp, H] for this program's KV head
    k_ref, v_ref,  # [L * K * P, page_size, H]: every page of every layer and head
    # quantized pages: ks_ref, vs_ref f32[L * K * P, page_size], their scales; then the outputs, this
    # program's block: o_ref [block_q, Gp, H], m_ref, l_ref [block_q, Gp]
    *refs,
    num_kv_heads: int, num_pages: int, block_q: int, pages_per_block: int, num_splits: int,
    sm_scale: float, group: int, quantized: bool, unmasked_steps: bool,
):
    ks_ref, vs_ref, o_ref, m_ref, l_ref = refs if quantized else (None, None, *refs)
    b, kh, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    max_pages = page_table_ref.shape[1]
    _, Gp, H = q_ref.shape
    ps = k_ref.shape[1]
    rows = block_q * Gp
    block_k = pages_per_block * ps

    slot = blk_slot_ref[b]
    n_q = blk_len_ref[b]
    kv_len = kv_len_ref[slot]
    # Positions of this block's queries: the slot's chunk is the last query_len tokens of kv_len.
    first_pos = kv_len - query_len_ref[slot] + blk_qoff_ref[b]
    kv_end = jnp.where(n_q > 0, first_pos + n_q, 0)  # keys this block can see: [0, kv_end)
    n_pages = pl.cdiv(kv_end, ps)
    per_split = pl.cdiv(pl.cdiv(n_pages, num_splits), pages_per_block) * pages_per_block
    p_begin = sp * per_split
    p_end = jnp.minimum(n_pages, p_begin + per_split)
    n_iter = jnp.maximum(pl.cdiv(p_end - p_begin, pages_per_block), 0)

    # Rows past the last token are clamped onto it (read, never used): no padded copy of q per call.
    n_tok = q_ref.shape[0]
    q_rows = jnp.minimum(blk_row0_ref[b] + lax.broadcasted_iota(jnp.int32, (block_q,), 0), n_tok - 1)
    q = q_ref[q_rows].reshape(rows, H)
    q_pos = first_pos + lax.broadcasted_iota(jnp.int32, (block_q, Gp), 0).reshape(rows)
    q_ok = (lax.broadcasted_iota(jnp.int32, (block_q, Gp), 0) < n_q).reshape(rows)
    base = (layer_ref[0] * num_kv_heads + kh) * num_pages

    # float32 caches get full-precision products (Triton would otherwise use tf32), so the engine's
    # float32 outputs stay token-exact against the reference.
    prec = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(i, carry, masked: bool):
        """One step of block_k keys. masked=False: every key of the step lies at or before the block's first
        query (so every query sees it, and it lies below kv_len, written): no mask at all."""
        o, m, l = carry
        p0 = p_begin + i * pages_per_block
        # Columns past the table are clamped onto its last one: those keys are masked, and V is zeroed.
        cols = jnp.minimum(p0 + lax.broadcasted_iota(jnp.int32, (pages_per_block,), 0), max_pages - 1)
        ids = page_table_ref[slot, cols]
        k = k_ref[base + ids].reshape(block_k, H).astype(q.dtype)
        v = v_ref[base + ids].reshape(block_k, H).astype(q.dtype)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=prec) * sm_scale
        if quantized:  # a NaN scale past kv_len is masked just below
            s = s * ks_ref[base + ids].reshape(1, block_k)
        if masked:
            k_pos = p0 * ps + lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
            visible = (k_pos <= q_pos[:, None]) & (k_pos < kv_end) & q_ok[:, None]
            s = jnp.where(visible, s, NEG_INF)
        m_new = jnp.maximum(m, s.max(axis=-1))
        m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)  # rows that saw no key yet keep exp(.) = 0
        p = jnp.exp(s - m_safe[:, None])
        alpha = jnp.exp(jnp.where(m == NEG_INF, NEG_INF, m - m_safe))
        l = alpha * l + p.sum(axis=-1)
        if masked:  # keys past kv_len may be stale or NaN: zero V there so 0 * NaN cannot reach the output
            v = jnp.where((p0 * ps + lax.broadcasted_iota(jnp.int32, (block_k, H), 0)) < kv_end, v, 0)
        pv = p
        if quantized:  # the sum l stays over p; the values' scales weight p's columns (zeroed past kv_len too)
            vs = vs_ref[base + ids].reshape(1, block_k)
            if masked:
                vs = jnp.where((p0 * ps + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)) < kv_end, vs, 0.0)
            pv = p * vs
        o = alpha[:, None] * o + jnp.dot(pv.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=prec)
        return o, m_new, l

    init = (jnp.zeros((rows, H), jnp.float32), jnp.full((rows,), NEG_INF, jnp.float32), jnp.zeros((rows,), jnp.float32))
    # unmasked_steps: the leading steps whose keys are all at or before the first query run without masks.
    n_full = jnp.clip((first_pos + 1 - p_begin * ps) // block_k, 0, n_iter) if unmasked_steps else 0
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), init) if unmasked_steps else init
    o, m, l = lax.fori_loop(n_full, n_iter, functools.partial(body, masked=True), carry)
    if num_splits == 1:  # normalize here; no combine pass follows
        o = o / jnp.where(l == 0, 1.0, l)[:, None]
    # Only the block's own rows are written (an empty block writes its first, as zeros, for the padding
    # tokens that point at it): a decode block has one query in block_q rows, and at batch 1 the idle rows'
    # float32 partials were a quarter as many bytes as the K/V the kernel reads.
    live = lax.broadcasted_iota(jnp.int32, (block_q, Gp), 0) < jnp.maximum(n_q, 1)
    plgpu.store(o_ref, o.reshape(block_q, Gp, H).astype(o_ref.dtype),
                mask=jnp.broadcast_to(live[:, :, None], (block_q, Gp, H)))
    plgpu.store(m_ref, m.reshape(block_q, Gp), mask=live)
    plgpu.store(l_ref, l.reshape(block_q, Gp), mask=live)


@functools.partial(jax.jit, static_argnames=("num_blocks", "block_sizes", "interpret", "sm_scale"))
def ragged_paged_attention_triton(
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
    block_sizes: BlockSizes,
    interpret: bool,
    sm_scale: float | None = None,
) -> jax.Array:  # [T, N, H]
    check_inputs(q, k_pages, v_pages, page_table, kv_len, query_len, blocks, tok_block, tok_row, num_blocks)
    T, N, H = q.shape
    L, K, P, ps, _ = k_pages.shape
    G = N // K
    Gp = max(1, 1 << (G - 1).bit_length())  # Triton tiles want powers of two
    bs = block_sizes
    bq, ppb, splits = bs.block_q, bs.pages_per_block, bs.num_splits
    scale = H ** -0.5 if sm_scale is None else sm_scale
    if bq * Gp < 16:
        raise ValueError(f"block_q={bq} x padded group size {Gp} = {bq * Gp} rows; the matrix units need >= 16")
    if not interpret and jnp.dtype(q.dtype).itemsize == 2 and ppb * ps < 16:
        # Measured on the H100 (Triton 3.6): a 16-bit P.V product over 8 keys came out 2x, over 4 keys 4x.
        raise ValueError(f"pages_per_block={ppb} x page_size={ps} = {ppb * ps} keys per step; 16-bit products on "
                         f"the GPU need at least 16")

    q4 = q.reshape(T, K, G, H)
    if Gp != G:
        q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    quantized = is_quantized_kv(k_pages)
    pages = (k_pages.values, v_pages.values, k_pages.scale, v_pages.scale) if quantized else (k_pages, v_pages)
    flat = [x.reshape(L * K * P, *x.shape[3:]) for x in pages]  # [pages, ps, H] values, [pages, ps] scales
    out_dtype = q.dtype if splits == 1 else jnp.float32

    def whole(x):
        return pl.BlockSpec(x.shape, lambda b, h, s: (0,) * x.ndim)

    scalars = (jnp.reshape(layer, (1,)).astype(jnp.int32), *blocks, kv_len, query_len, page_table)
    kernel = functools.partial(_kernel, num_kv_heads=K, num_pages=P, block_q=bq, pages_per_block=ppb,
                               num_splits=splits, sm_scale=scale, group=G, quantized=quantized,
                               unmasked_steps=bs.unmasked_steps)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(num_blocks, K, splits),
        in_specs=[*(whole(x) for x in scalars),
                  pl.BlockSpec((T, None, Gp, H), lambda b, h, s: (0, h, 0, 0)),
                  *(whole(x) for x in flat)],
        out_specs=[pl.BlockSpec((None, None, bq, None, Gp, H), lambda b, h, s: (s, b, 0, h, 0, 0)),
                   pl.BlockSpec((None, None, bq, None, Gp), lambda b, h, s: (s, b, 0, h, 0)),
                   pl.BlockSpec((None, None, bq, None, Gp), lambda b, h, s: (s, b, 0, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((splits, num_blocks, bq, K, Gp, H), out_dtype),
                   jax.ShapeDtypeStruct((splits, num_blocks, bq, K, Gp), jnp.float32),
                   jax.ShapeDtypeStruct((splits, num_blocks, bq, K, Gp), jnp.float32)],
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        # Named by its shape of work, so a profile tells decode blocks (many splits) from prefill chunks.
        name=f"ragged_paged_attention_q{bq}_s{splits}{'_u' if bs.unmasked_steps else ''}",
    )(*scalars, q4, *flat)

    if splits > 1:  # merge the partial softmaxes of each token's row
        o = combine_splits(o, m, l, tok_block, tok_row, out_dtype=q.dtype, interpret=interpret,
                           num_warps=bs.combine_warps)
    else:  # gather each token's row
        o = o[0, tok_block, tok_row]  # [T, K, Gp, H]
    return o[:, :, :G].reshape(T, N, H).astype(q.dtype)
