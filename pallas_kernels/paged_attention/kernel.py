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
from jinfer.kernels.rms_norm.kernel import check_rows, row_factor
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
    q_ref,  # [T, Gp, H] for this program's KV head; with `fresh`, the step's whole fused product [T, N + 2K, H]
    k_ref, v_ref,  # [L * K * P, page_size, H]: every page of every layer and head
    # quantized pages: ks_ref, vs_ref f32[L * K * P, page_size], their scales; with `fresh` instead
    # freq_ref f32[H / 2], slot_ref i32[T] (`rope_decode_attention`) and with `eps` x_ref [T, D]; then the
    # outputs, this program's block: o_ref [block_q, Gp, H], m_ref, l_ref [block_q, Gp]; with `fresh` then
    # k_out, v_out (k_ref, v_ref aliased); with `direct` (fresh, one split, one block a token) o_ref is the
    # whole token-major output [T, K, Gp, H] and there are no m_ref, l_ref
    *refs,
    num_kv_heads: int, num_pages: int, block_q: int, pages_per_block: int, num_splits: int,
    sm_scale: float, group: int, quantized: bool, unmasked_steps: bool, fresh: bool = False,
    eps: float | None = None, direct: bool = False,
):
    if fresh:
        freq_ref, slot_ref, *refs = refs
        x_ref, *refs = refs if eps is not None else (None, *refs)
        o_ref, m_ref, l_ref, k_out, v_out = (refs[0], None, None, *refs[1:]) if direct else refs
        ks_ref = vs_ref = None
    else:
        ks_ref, vs_ref, o_ref, m_ref, l_ref = refs if quantized else (None, None, *refs)
    b, kh, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    max_pages = page_table_ref.shape[1]
    H = q_ref.shape[-1]
    Gp = o_ref.shape[2 if direct else 1]
    ps = k_ref.shape[1]
    rows = block_q * Gp
    block_k = pages_per_block * ps

    slot = blk_slot_ref[b]
    n_q = blk_len_ref[b]
    kv_len = kv_len_ref[slot]
    # Positions of this block's queries: the slot's chunk is the last query_len tokens of kv_len.
    first_pos = kv_len - query_len_ref[slot] + blk_qoff_ref[b]
    # Keys this block reads from the pages: [0, kv_end). With `fresh` (one query a block) the query's own key
    # is not read there but taken from the fused product (`_fresh_key`), which this call writes to its page.
    kv_end = jnp.where(n_q > 0, first_pos + n_q - int(fresh), 0)
    n_pages = pl.cdiv(kv_end, ps)
    per_split = pl.cdiv(pl.cdiv(n_pages, num_splits), pages_per_block) * pages_per_block
    p_begin = sp * per_split
    p_end = jnp.minimum(n_pages, p_begin + per_split)
    n_iter = jnp.maximum(pl.cdiv(p_end - p_begin, pages_per_block), 0)

    # Rows past the last token are clamped onto it (read, never used): no padded copy of q per call.
    n_tok = q_ref.shape[0]
    base = (layer_ref[0] * num_kv_heads + kh) * num_pages
    if fresh:
        tok = jnp.minimum(blk_row0_ref[b], n_tok - 1)
        scale = None if x_ref is None else row_factor(x_ref, tok, eps)
        q, k_new, v_new = _fresh_qkv(q_ref, freq_ref, tok, first_pos, kh, rows, Gp, group, num_kv_heads, scale)
    else:
        q_rows = jnp.minimum(blk_row0_ref[b] + lax.broadcasted_iota(jnp.int32, (block_q,), 0), n_tok - 1)
        q = q_ref[q_rows].reshape(rows, H)
    q_pos = first_pos + lax.broadcasted_iota(jnp.int32, (block_q, Gp), 0).reshape(rows)
    q_ok = (lax.broadcasted_iota(jnp.int32, (block_q, Gp), 0) < n_q).reshape(rows)

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
        m_new, m_safe, alpha = _new_max(m, s.max(axis=-1))
        p = jnp.exp(s - m_safe[:, None])
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
    n_full = jnp.clip((first_pos + 1 - int(fresh) - p_begin * ps) // block_k, 0, n_iter) if unmasked_steps else 0
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), init) if unmasked_steps else init
    o, m, l = lax.fori_loop(n_full, n_iter, functools.partial(body, masked=True), carry)
    if fresh:  # the first split takes the query's own key and writes it and its value to their page
        own = (sp == 0) & (n_q > 0)
        o, m, l = _fresh_key(q, k_new, v_new, (o, m, l), q_ok & own, sm_scale)

        @pl.when(own)
        def _():
            page, off = slot_ref[tok] // ps, slot_ref[tok] % ps
            k_out[base + page, off, :] = k_new.astype(k_out.dtype)
            v_out[base + page, off, :] = v_new.astype(v_out.dtype)
    if num_splits == 1:  # normalize here; no combine pass follows
        o = o / jnp.where(l == 0, 1.0, l)[:, None]
    if direct:  # the block's one query (row 0; zeros for an empty block) is token tok's row of the output
        first = lax.broadcasted_iota(jnp.int32, (block_q, Gp, H), 0) == 0
        plgpu.store(o_ref.at[pl.ds(tok, block_q), kh], o.reshape(block_q, Gp, H).astype(o_ref.dtype), mask=first)
        return
    # Only the block's own rows are written (an empty block writes its first, as zeros, for the padding
    # tokens that point at it): a decode block has one query in block_q rows, and at batch 1 the idle rows'
    # float32 partials were a quarter as many bytes as the K/V the kernel reads.
    live = lax.broadcasted_iota(jnp.int32, (block_q, Gp), 0) < jnp.maximum(n_q, 1)
    plgpu.store(o_ref, o.reshape(block_q, Gp, H).astype(o_ref.dtype),
                mask=jnp.broadcast_to(live[:, :, None], (block_q, Gp, H)))
    plgpu.store(m_ref, m.reshape(block_q, Gp), mask=live)
    plgpu.store(l_ref, l.reshape(block_q, Gp), mask=live)


def _new_max(m, seen):
    """The online softmax's new running max of rows whose max was m and whose new scores peak at `seen`: (the
    max, the max to subtract from scores (0 for rows that saw no key yet, which keep exp(.) = 0), the factor that
    rescales what was summed so far)."""
    m_new = jnp.maximum(m, seen)
    m_safe = jnp.where(m_new == NEG_INF, 0.0, m_new)
    return m_new, m_safe, jnp.exp(jnp.where(m == NEG_INF, NEG_INF, m - m_safe))


def _fresh_qkv(qkv_ref, freq_ref, tok, pos, kh, rows: int, Gp: int, group: int, K: int, scale=None):
    """Token `tok`'s queries of KV head kh (its `group` heads in each of the rows / Gp copies of Gp rows; padded
    heads repeat the last) and its key, rotated by RoPE at `pos`, and its value, from the fused product; each
    first multiplied by `scale` (float32) and rounded back, where given (`layers.scale_rows`)."""
    H = qkv_ref.shape[-1]
    half = H // 2
    N = qkv_ref.shape[1] - 2 * K
    col = lax.broadcasted_iota(jnp.int32, (H,), 0)
    other = (col + half) % H  # each column's partner in the rotation
    freqs = pos.astype(jnp.float32) * freq_ref[col % half]  # [H]
    # In the activations' dtype op by op, as the model's own rotation rounds (`jinfer.kernels.rope_kv`):
    # x * cos + partner * (-sin | sin) is lo * cos - hi * sin, hi * cos + lo * sin term for term.
    dtype = qkv_ref.dtype
    cos = jnp.cos(freqs).astype(dtype)
    sin = jnp.where(col < half, -jnp.sin(freqs), jnp.sin(freqs)).astype(dtype)

    def load(idx):
        x = qkv_ref[idx]
        return x if scale is None else (x.astype(jnp.float32) * scale).astype(dtype)

    def rotate(x, partner, c, s):
        return x * c + partner * s

    r = lax.broadcasted_iota(jnp.int32, (rows, H), 0)
    heads = kh * group + jnp.minimum(r % Gp, group - 1)
    cols = jnp.broadcast_to(col[None, :], (rows, H))
    tok2 = jnp.full((rows, H), tok, jnp.int32)
    q = rotate(load((tok2, heads, cols)), load((tok2, heads, jnp.broadcast_to(other[None, :], (rows, H)))),
               cos[None, :], sin[None, :])
    tok1 = jnp.full((H,), tok, jnp.int32)
    k_head, v_head = jnp.full((H,), N + kh, jnp.int32), jnp.full((H,), N + K + kh, jnp.int32)
    k = rotate(load((tok1, k_head, col)), load((tok1, k_head, other)), cos, sin)
    return q, k, load((tok1, v_head, col))


def _fresh_key(q, k, v, carry, use, sm_scale: float):
    """The online softmax of `carry` (o, m, l over rows) taking one more key k [H] and value v [H], for the rows
    where `use`."""
    o, m, l = carry
    s = jnp.sum(q.astype(jnp.float32) * k.astype(jnp.float32)[None, :], axis=1) * sm_scale
    s = jnp.where(use, s, NEG_INF)
    m_new, m_safe, alpha = _new_max(m, s)
    p = jnp.exp(s - m_safe)
    # The score is an elementwise product summed in float32, as precise as the tiles' products; P is rounded
    # to V's dtype before its product, as the tiles' P.V is.
    pv = p.astype(v.dtype).astype(jnp.float32)[:, None] * v.astype(jnp.float32)[None, :]
    return alpha[:, None] * o + pv, m_new, alpha * l + p


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
    G, Gp = _group(N, K)
    q4 = q.reshape(T, K, G, H)
    if Gp != G:
        q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    quantized = is_quantized_kv(k_pages)
    pages = (k_pages.values, v_pages.values, k_pages.scale, v_pages.scale) if quantized else (k_pages, v_pages)
    flat = [x.reshape(L * K * P, *x.shape[3:]) for x in pages]  # [pages, ps, H] values, [pages, ps] scales
    q_spec = pl.BlockSpec((T, None, Gp, H), lambda b, h, s: (0, h, 0, 0))
    o, m, l = _call(q4, q_spec, flat, (), layer, page_table, kv_len, query_len, blocks, num_blocks=num_blocks,
                    K=K, P=P, G=G, block_sizes=block_sizes, interpret=interpret, sm_scale=sm_scale,
                    quantized=quantized, fresh=False)
    return _rows(o, m, l, tok_block, tok_row, T, N, H, G, q.dtype, block_sizes, interpret)


@functools.partial(jax.jit, static_argnames=("num_heads", "num_blocks", "block_sizes", "interpret", "sm_scale",
                                             "eps"), donate_argnums=(3, 4))
def rope_decode_attention_triton(
    qkv: jax.Array,  # [T, N + 2K, H]: the fused product of a decode step (one query a slot), not yet rotated
    inv_freq: jax.Array,  # f32[H / 2]: the rotary frequencies
    kv_slot: jax.Array,  # i32[T]: where each token's key and value go, page * page_size + offset
    k_pages: jax.Array,  # [L, K, P, page_size, H] float, donated: this step's keys are written in place
    v_pages: jax.Array,
    layer: jax.Array,  # i32[]
    page_table: jax.Array,  # i32[S, max_pages]
    kv_len: jax.Array,  # i32[S]
    query_len: jax.Array,  # i32[S]: 0 or 1 (every block holds at most one query: its key is the block's own)
    blocks: tuple[jax.Array, ...],  # (blk_slot, blk_row0, blk_len, blk_qoff), each i32[num_blocks]
    tok_block: jax.Array,  # i32[T]
    tok_row: jax.Array,  # i32[T]
    x: jax.Array | None = None,  # [T, D]: with eps, each token's q, k, v are first scaled by x's RMSNorm factor
    *,
    num_heads: int,
    num_blocks: int,
    block_sizes: BlockSizes,
    interpret: bool,
    sm_scale: float | None = None,
    eps: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # (out [T, N, H], k_pages, v_pages)
    """RoPE of a decode step's queries and keys, the write of its keys and values into their pages, and its
    attention, in one launch (plus the split combine): `rope_and_store` then `ragged_paged_attention_triton`.

    Why: at batch 1 on the H200 the RoPE-and-write kernel cost 3.6 us a layer for a few kB (RESULTS.md, session
    36). Each program rotates its query rows and its KV head's key from the fused product; the one of the first
    split also attends to that key straight from registers and writes it and the value to their page, so no
    program reads the step's own key from the pages.

    With x and eps, qkv is the product of unnormalized rows whose norm gain was folded into the weights
    (`llama.fold_norms`): each program reduces its token's row of x to the norm factor and scales what it loads
    of qkv by it (`layers.scale_rows` before `rope_and_store`), so the norm launches no kernel of its own."""
    T, heads, H = qkv.shape
    N = num_heads
    L, K, P, ps, _ = k_pages.shape
    if heads != N + 2 * K or H % 2 or is_quantized_kv(k_pages) or inv_freq.shape != (H // 2,) \
            or kv_slot.shape != (T,):
        raise ValueError(f"qkv {qkv.shape} must hold num_heads={N} query heads and K={K} key and value heads of an "
                         f"even head dim; pages float ({type(k_pages).__name__}); inv_freq {inv_freq.shape} "
                         f"[{H // 2}]; kv_slot {kv_slot.shape} [{T}]")
    check_rows(x, eps, T)
    q = jax.ShapeDtypeStruct((T, N, H), qkv.dtype)
    check_inputs(q, k_pages, v_pages, page_table, kv_len, query_len, blocks, tok_block, tok_row, num_blocks)
    G, _ = _group(N, K)
    flat = [pages.reshape(L * K * P, ps, H) for pages in (k_pages, v_pages)]
    whole = pl.BlockSpec(qkv.shape, lambda b, h, s: (0, 0, 0))
    extra = (jnp.asarray(inv_freq, jnp.float32), kv_slot.astype(jnp.int32), *(() if x is None else (x,)))
    # One split and a block a token (`query_blocks` gives each padding token an empty block): the kernel writes
    # each token's row itself, normalized, and no combine or gather of the blocks' rows follows.
    direct = block_sizes.num_splits == 1 and num_blocks == T
    outs = _call(qkv, whole, flat, extra, layer, page_table, kv_len, query_len, blocks, num_blocks=num_blocks, K=K,
                 P=P, G=G, block_sizes=block_sizes, interpret=interpret, sm_scale=sm_scale, quantized=False,
                 fresh=True, eps=eps, direct=direct)
    if direct:
        o, k_flat, v_flat = outs
        out = o[:, :, :G].reshape(T, N, H)
    else:
        o, m, l, k_flat, v_flat = outs
        out = _rows(o, m, l, tok_block, tok_row, T, N, H, G, qkv.dtype, block_sizes, interpret)
    return out, k_flat.reshape(k_pages.shape), v_flat.reshape(v_pages.shape)


def _group(N: int, K: int) -> tuple[int, int]:
    """Query heads a KV head, and that padded to a power of two (Triton tiles want one)."""
    G = N // K
    return G, max(1, 1 << (G - 1).bit_length())


def _call(q_in, q_spec, flat, extra, layer, page_table, kv_len, query_len, blocks, *, num_blocks: int, K: int,
          P: int, G: int, block_sizes: BlockSizes, interpret: bool, sm_scale, quantized: bool, fresh: bool,
          eps: float | None = None, direct: bool = False):
    """The kernel's launch: (o, m, l) partials of each split, or with `direct` the token-major output
    [T, K, Gp, H], then with `fresh` the written pages."""
    H = q_in.shape[-1]
    _, Gp = _group(G * K, K)
    bs = block_sizes
    bq, ppb, splits = bs.block_q, bs.pages_per_block, bs.num_splits
    ps = flat[0].shape[1]
    scale = H ** -0.5 if sm_scale is None else sm_scale
    if bq * Gp < 16:
        raise ValueError(f"block_q={bq} x padded group size {Gp} = {bq * Gp} rows; the matrix units need >= 16")
    if not interpret and jnp.dtype(q_in.dtype).itemsize == 2 and ppb * ps < 16:
        # Measured on the H100 (Triton 3.6): a 16-bit P.V product over 8 keys came out 2x, over 4 keys 4x.
        raise ValueError(f"pages_per_block={ppb} x page_size={ps} = {ppb * ps} keys per step; 16-bit products on "
                         f"the GPU need at least 16")
    out_dtype = q_in.dtype if splits == 1 else jnp.float32

    def whole(x):
        return pl.BlockSpec(x.shape, lambda b, h, s: (0,) * x.ndim)

    scalars = (jnp.reshape(layer, (1,)).astype(jnp.int32), *blocks, kv_len, query_len, page_table)
    kernel = functools.partial(_kernel, num_kv_heads=K, num_pages=P, block_q=bq, pages_per_block=ppb,
                               num_splits=splits, sm_scale=scale, group=G, quantized=quantized,
                               unmasked_steps=bs.unmasked_steps, fresh=fresh, eps=eps, direct=direct)
    inputs = (*scalars, q_in, *flat, *extra)
    page_outs = tuple(flat) if fresh else ()
    first_page = len(scalars) + 1
    if direct:  # the token-major output, written row by row by the kernel itself
        out = jax.ShapeDtypeStruct((q_in.shape[0], K, Gp, H), q_in.dtype)
        outs, out_specs = [out], [whole(out)]
    else:  # each split's partials, a block of the grid each
        outs = [jax.ShapeDtypeStruct((splits, num_blocks, bq, K, Gp, H), out_dtype),
                jax.ShapeDtypeStruct((splits, num_blocks, bq, K, Gp), jnp.float32),
                jax.ShapeDtypeStruct((splits, num_blocks, bq, K, Gp), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, bq, None, Gp, H), lambda b, h, s: (s, b, 0, h, 0, 0)),
                     pl.BlockSpec((None, None, bq, None, Gp), lambda b, h, s: (s, b, 0, h, 0)),
                     pl.BlockSpec((None, None, bq, None, Gp), lambda b, h, s: (s, b, 0, h, 0))]
    return pl.pallas_call(
        kernel,
        grid=(num_blocks, K, splits),
        in_specs=[*(whole(x) for x in scalars), q_spec, *(whole(x) for x in (*flat, *extra))],
        out_specs=[*out_specs, *(whole(x) for x in page_outs)],
        out_shape=[*outs, *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in page_outs)],
        input_output_aliases={first_page + i: len(outs) + i for i in range(len(page_outs))},
        interpret=interpret,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages),
        # Named by its shape of work, so a profile tells decode blocks (many splits) from prefill chunks.
        name=f"{'rope_' if fresh else ''}{'norm_' if eps is not None else ''}ragged_paged_attention_q{bq}_s{splits}{'_u' if bs.unmasked_steps else ''}",
    )(*inputs)


def _rows(o, m, l, tok_block, tok_row, T: int, N: int, H: int, G: int, dtype, block_sizes: BlockSizes,
          interpret: bool) -> jax.Array:
    """Each token's output [T, N, H] from the splits' partials."""
    K = N // G
    if block_sizes.num_splits > 1:  # merge the partial softmaxes of each token's row
        o = combine_splits(o, m, l, tok_block, tok_row, out_dtype=dtype, interpret=interpret,
                           num_warps=block_sizes.combine_warps)
    else:  # gather each token's row
        o = o[0, tok_block, tok_row]  # [T, K, Gp, H]
    return o[:, :, :G].reshape(T, K * G, H).astype(dtype)
