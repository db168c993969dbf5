"""Weight-only quantized matmul as Pallas kernels (GPU Triton lowering; the CPU runs them in interpret mode):
out [M, N] = x [M, K] @ W, W stored as a QTensor's int8 / int4 / fp8 values with per-group scales (and offsets).

Decode reads each weight once and does little else, so both kernels read the stored bytes as they lie in HBM
and dequantize in registers (`dequant.py`: integer bit tricks, not the GPU's slow int/float8 conversions).
The block sizes' `path` picks one:

- "fma", for a few rows (decode, M up to ~4): no matrix units. A program owns block_n output columns and all
  M rows, and walks its share of K block_k inputs at a time: each weight tile becomes float32 numbers f
  (q = alpha f + beta) and every row accumulates x[r, k] * f[k, n] into its own [block_k, block_n] float32
  tile with plain FMAs on the tile as loaded, summed over k once at the end. Feeding a [16, block_k] x
  [block_k, block_n] `jnp.dot` instead would send the weight tile through shared memory a byte per load
  into the matrix layout and pad x to 16 rows. Scales stay out of the inner loop: per output channel they
  scale the final sums; per group the group's tile sums are scaled once per group (`chunk_steps` steps make
  one group), and beta's share comes from the group's sum of x. With groups and M > 1 the weights are
  scaled in the tile instead (one FMA per weight shared by all rows, in place of a second accumulator per
  row).
- "mma", for more rows: grid (M blocks, N blocks, K splits), M fastest, so the programs that share a weight
  tile run side by side and the second reads it from L2. Each step multiplies x's [block_m, block_k] tile by
  the converted weight tile in the matrix units (float32 products) and scales the step's product by its
  group's scale, one [block_m, block_n] multiply a step instead of one per weight:

      acc += (x_t @ q_t) * scale[g]  (+ rowsum(x_t) * (offset[g] - bias * scale[g]) for int4)

  where int4's tile is q + bias in bfloat16 (`dequant.mma_values`).

Both: a K step lies inside one group (block_k divides group_size); K, N and M need not be multiples of their
blocks: loads and stores past an edge are masked (the short last group of K = 576 by 128 is the same mask).
split_k > 1 gives each of split_k programs a contiguous share of K (whole groups) and a float32 partial that
the wrapper sums.

int4 holds output columns 2c and 2c + 1 in byte c (low, high nibble). A program loads block_n // 2 bytes
a row and keeps two accumulators, the even columns' from the low nibbles and the odd ones' from the high.
Their scales and the output are addressed through free [..., N // 2, 2] views, so element [c, 0] is column 2c
and [c, 1] column 2c + 1: a stride-2 load of each scale row and a stride-2 store of each accumulator, both
small, and the packed weights and scales stay as stored.

Stacked weights ([L, K, N], a model's layers) are read in place: the layer index is a scalar input that
offsets every weight, scale and offset address, so no per-call copy of one layer is made.

Where it stands (H200, `tuning.py` has the table): at M = 1 the "fma" path reads int8 / fp8 at 0.50-0.68 of
copy bandwidth on the large shapes and int4 at 0.29-0.32 (0.28 before its nibbles were unpacked by PTX);
"mma" at M = 4-16 reads int8 / fp8 at ~0.49 and int4 at ~0.25. Both are bound by instruction issue and
latency, not by bytes: Triton emits each weight's unpack and FMA as separate scalar instructions (int8 ~3.5
SASS instructions a weight in the "fma" loop, fp8 ~3; "mma" ~4.3-5.8, the weight tile reaching the matrix
layout through byte-wise shared-memory loads), and the "fma" accumulator tiles cost 128-250 registers a
thread (12-25% occupancy). At int4's two weights a byte, even 3 instructions a weight need ~3/4 of a
multiprocessor's issue rate to keep up with HBM: reaching the bandwidth takes packed (bfloat16x2) or
matrix-unit arithmetic on a layout repacked for it, not a better float32 loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jinfer.kernels.quant_matmul.common import both, i32, iota, launch, load, split_range
from jinfer.kernels.quant_matmul.dequant import FMA_MIX, MMA_INT4_BIAS, fma_values, mma_values
from jinfer.kernels.quant_matmul.tuning import QuantMatmulBlockSizes
from jinfer.kernels.quant_matmul.validate import check_block_sizes, check_inputs


def _zero_undefined(tiles, fmt, mask):
    """float8 lanes off the edge are undefined (maybe NaN), not 0: zero them (other formats load 0 there)."""
    if fmt != "fp8" or mask is None:
        return tiles
    return tuple(jnp.where(mask, t, 0) for t in tiles)


class _Tiles:
    """Addressing shared by both kernels: one program's columns [c0, c0 + cols) of the stored values (int4:
    bytes), masks at the edges (None where a block cannot cross one: aligned shapes load unmasked), and the
    scale / offset rows of a group."""

    def __init__(self, x_ref, v_ref, layer, c0, cols, block_k, k_chunk):
        self.K = x_ref.shape[1]
        self.layer, self.c0, self.cols, self.block_k = layer, c0, cols, block_k
        width = v_ref.shape[2]  # columns of stored values: N, or N // 2 bytes
        self.col_ok = (c0 + iota(cols) < width) if width % cols else None  # [cols]
        self.ragged_k = self.K % k_chunk != 0  # some step reads past K

    def k_ok(self, k0):  # [block_k] or None
        return (k0 + iota(self.block_k) < self.K) if self.ragged_k else None

    def weights_mask(self, k0):  # [block_k, cols] or None
        k_ok = self.k_ok(k0)
        return both(None if k_ok is None else k_ok[:, None], None if self.col_ok is None else self.col_ok[None, :])

    def weights(self, v_ref, k0):
        """The stored [block_k, cols] tile at row k0 and its mask (None: unmasked)."""
        mask = self.weights_mask(k0)
        return load(v_ref.at[self.layer, pl.ds(k0, self.block_k), pl.ds(self.c0, self.cols)], mask), mask

    def group_row(self, ref, g, packed):
        """float32 [cols] of one group's scale (or offset) row; int4: (even, odd) columns, read as one
        contiguous [cols, 2] block (vector loads) and split in registers."""
        if not packed:
            return (load(ref.at[self.layer, g, pl.ds(self.c0, self.cols)], self.col_ok).astype(jnp.float32),)
        pairs = load(ref.at[self.layer, g, pl.ds(self.c0, self.cols), pl.ds(0, 2)],
                      None if self.col_ok is None else self.col_ok[:, None]).astype(jnp.float32)
        half = lax.broadcasted_iota(jnp.int32, (self.cols, 2), 1)
        return tuple(jnp.sum(jnp.where(half == h, pairs, 0.0), axis=1) for h in (0, 1))

    def store(self, o_ref, split, row, values, packed, mask=None):
        """values per half: [cols], output row `row`; or [rows, cols] from row `row`, under `mask`."""
        for h, a in enumerate(values):
            rows, m = ((row,), self.col_ok) if a.ndim == 1 else ((pl.ds(row, a.shape[0]),), mask)
            at = o_ref.at[split, *rows, pl.ds(self.c0, self.cols), *((i32(h),) if packed else ())]
            plgpu.store(at, a.astype(o_ref.dtype), mask=None if m is None else jnp.broadcast_to(m, a.shape))


def _fma_kernel(
    layer_ref,  # i32[1]
    x_ref,  # [M, K]
    v_ref,  # [L, K, N] int8 | fp8; u8[L, K, N // 2] for int4
    s_ref,  # f32 | f16 [L, G, N]; int4: [L, G, N // 2, 2]
    *refs,  # int4: offset_ref like s_ref; then o_ref [S, M, N] (int4: [S, M, N // 2, 2])
    fmt: str, group_size: int, num_chunks: int, chunks_per_split: int, chunk_steps: int,
    block_n: int, block_k: int, prescale: bool, prefetch: bool, ptx: bool,
):
    packed = fmt == "int4"
    off_ref, o_ref = refs if packed else (None, *refs)
    j, split = pl.program_id(1), pl.program_id(2)
    M = x_ref.shape[0]
    cols = block_n // 2 if packed else block_n
    t = _Tiles(x_ref, v_ref, layer_ref[0], j * cols, cols, block_k, block_k * chunk_steps)
    mix, const = FMA_MIX[fmt]
    nh = len(const)
    tile0 = jnp.zeros((block_k, cols), jnp.float32)

    def rows(g):  # group g's per-half scales, and what sum(x) adds to each half: const * scale + offset
        s = t.group_row(s_ref, g, packed)
        o = t.group_row(off_ref, g, packed) if packed else (0.0,) * nh
        return s, tuple(c * a + b for c, a, b in zip(const, s, o))

    def mixed(tiles, s, h):  # sum_j mix[h][j] * s * tiles[j], s a [cols] row: half h's scaled values
        terms = [f * (m * s)[None, :] for m, f in zip(mix[h], tiles) if m]
        return functools.reduce(lambda a, b: a + b, terms)

    def load_chunk(c):  # the chunk's stored tiles, masked (its masks are recomputed where they are used)
        return tuple(t.weights(v_ref, (c * chunk_steps + u) * block_k)[0] for u in range(chunk_steps))

    def chunk(c, carry, qs):
        """chunk_steps steps of block_k (one group, with groups). carry, by mode: per channel (acc, xsum),
        acc[r][j] the sum of x[r, k] * f_j[k, :]; grouped (tot, corr), tot[r][h] the scaled sums of the groups
        so far and corr[r][h] their sum(x) terms, acc and xsum fresh per group; prescaled (acc,), acc[r][h]
        the sum of x[r, k] * w_h[k, :]."""
        if not group_size:
            acc, xsum = carry
        elif prescale:
            (acc,), xsum = carry, None
            s, b = rows(c)
        else:
            tot, corr = carry
            acc, xsum = ((tile0,) * nh,) * M, (jnp.zeros((block_k,), jnp.float32),) * M
        acc, xsum = [list(a) for a in acc], None if xsum is None else list(xsum)
        for u in range(chunk_steps):
            k0 = (c * chunk_steps + u) * block_k
            q = t.weights(v_ref, k0)[0] if qs is None else qs[u]  # None: load here, step by step
            w = _zero_undefined(fma_values(q, fmt, ptx=ptx), fmt, t.weights_mask(k0))
            if prescale:
                w = tuple(mixed(w, s[h], h) + b[h][None, :] for h in range(nh))
            for r in range(M):
                xr = load(x_ref.at[i32(r), pl.ds(k0, block_k)], t.k_ok(k0)).astype(jnp.float32)
                acc[r] = [a + xr[:, None] * f for a, f in zip(acc[r], w)]
                if xsum is not None:
                    xsum[r] = xsum[r] + xr
        acc = tuple(tuple(a) for a in acc)
        if not group_size:
            return acc, tuple(xsum)
        if prescale:
            return (acc,)
        s, b = rows(c)
        tot = tuple(tuple(tt + mixed(acc[r], s[h], h) for h, tt in enumerate(tot[r])) for r in range(M))
        corr = tuple(tuple(cc + jnp.sum(xsum[r]) * bh for cc, bh in zip(corr[r], b)) for r in range(M))
        return tot, corr

    first, last = split_range(split, chunks_per_split, num_chunks)
    tiles = ((tile0,) * nh,) * M
    if not group_size:
        init = (tiles, (jnp.zeros((block_k,), jnp.float32),) * M)
    elif prescale:
        init = (tiles,)
    else:
        init = (tiles, ((jnp.zeros((cols,), jnp.float32),) * nh,) * M)
    if prefetch:  # the next chunk's loads go out before this chunk's FMAs, and land while they run
        def body(c, carry):
            acc, qs = carry
            nxt = load_chunk(jnp.minimum(c + 1, last - 1))
            return chunk(c, acc, qs), nxt

        out, _ = lax.fori_loop(first, last, body, (init, load_chunk(first)))
    else:
        out = lax.fori_loop(first, last, lambda c, carry: chunk(c, carry, None), init)
    if not group_size:
        s, b = rows(i32(0))
    for r in range(M):
        if not group_size:
            sums, xs = [jnp.sum(a, axis=0) for a in out[0][r]], jnp.sum(out[1][r])
            res = [sum(m * f for m, f in zip(mix[h], sums) if m) * s[h] + xs * b[h] for h in range(nh)]
        elif prescale:
            res = [jnp.sum(a, axis=0) for a in out[0][r]]
        else:
            res = [jnp.sum(a, axis=0) + cc for a, cc in zip(out[0][r], out[1][r])]
        t.store(o_ref, split, i32(r), res, packed)


def _mma_kernel(
    layer_ref, x_ref, v_ref, s_ref, *refs,  # as _fma_kernel's
    fmt: str, group_size: int, num_steps: int, steps_per_split: int,
    block_m: int, block_n: int, block_k: int,
):
    packed = fmt == "int4"
    off_ref, o_ref = refs if packed else (None, *refs)
    i, j, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    M = x_ref.shape[0]
    cols = block_n // 2 if packed else block_n
    m0 = i * block_m
    t = _Tiles(x_ref, v_ref, layer_ref[0], j * cols, cols, block_k, block_k)
    row_ok = (m0 + iota(block_m) < M)[:, None] if M % block_m else None  # [bm, 1]
    dtype = x_ref.dtype
    bias = MMA_INT4_BIAS.get(jnp.dtype(dtype), 0.0) if packed else 0.0
    # float32 activations get full-precision products (Triton would otherwise round them to tf32).
    prec = lax.Precision.HIGHEST if dtype == jnp.float32 else None

    def offsets(g):  # int4: offset - bias * scale, the multiple of rowsum(x) each half adds
        return tuple(o - bias * s for o, s in zip(t.group_row(off_ref, g, packed), t.group_row(s_ref, g, packed)))

    def step(s, carry):
        acc, xsum = carry
        k0 = s * block_k
        k_ok = t.k_ok(k0)
        x = load(x_ref.at[pl.ds(m0, block_m), pl.ds(k0, block_k)],
                  both(row_ok, None if k_ok is None else k_ok[None, :]))
        q, mask = t.weights(v_ref, k0)
        w = _zero_undefined(mma_values(q, fmt, dtype), fmt, mask)
        parts = tuple(jnp.dot(x, h, precision=prec, preferred_element_type=jnp.float32) for h in w)
        part_sum = jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True) if packed else None  # [bm, 1]
        if not group_size:  # one scale for all of K: applied after the loop
            return tuple(a + p for a, p in zip(acc, parts)), (xsum + part_sum if packed else xsum)
        g = k0 // group_size
        acc = tuple(a + p * sc[None, :] for a, p, sc in zip(acc, parts, t.group_row(s_ref, g, packed)))
        if packed:
            acc = tuple(a + part_sum * o[None, :] for a, o in zip(acc, offsets(g)))
        return acc, xsum

    first, last = split_range(split, steps_per_split, num_steps)
    zeros = jnp.zeros((block_m, cols), jnp.float32)
    init = ((zeros, zeros) if packed else (zeros,), jnp.zeros((block_m, 1), jnp.float32))
    acc, xsum = lax.fori_loop(first, last, step, init)
    if not group_size:
        acc = tuple(a * sc[None, :] for a, sc in zip(acc, t.group_row(s_ref, i32(0), packed)))
        if packed:
            acc = tuple(a + xsum * o[None, :] for a, o in zip(acc, offsets(i32(0))))
    t.store(o_ref, split, m0, acc, packed, both(row_ok, None if t.col_ok is None else t.col_ok[None, :]))


def _packs_by_four(bs: QuantMatmulBlockSizes) -> bool:
    """Whether each thread holds a multiple of four bytes of a weight tile, as `INT4_PTX` (pack=4) needs; smaller
    tiles unpack with jnp."""
    per_thread, rest = divmod(bs.block_k * bs.block_n // 2, 32 * bs.num_warps)
    return not rest and per_thread % 4 == 0


def kernel_name(fmt: str, bs: QuantMatmulBlockSizes, splits: int) -> str:
    """The compiled kernel's name: profiles tell variants apart by it (a: ptx, c: prescale, n for by M; XLA
    renames a "-")."""
    return (f"quantized_matmul_{fmt}_{bs.path}_m{bs.block_m}n{bs.block_n}k{bs.block_k}u{bs.unroll}"
            f"w{bs.num_warps}s{bs.num_stages}p{int(bs.prefetch)}a{int(bs.ptx)}"
            f"c{'n' if bs.prescale is None else int(bs.prescale)}x{splits}")


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "block_sizes", "interpret", "sum_splits"))
def quantized_matmul_triton(
    x: jax.Array,  # [M, K] f32 | bf16 | f16
    values: jax.Array,  # [L, K, N] int8 | float8_e4m3fn; int4: u8[L, K, N // 2]
    scale: jax.Array,  # f32 | f16 [L, G, N], G = ceil(K / group_size)
    offset: jax.Array | None,  # like scale (int4), else None
    layer: jax.Array,  # i32[]: which of the L weights
    *,
    fmt: str,
    group_size: int,
    block_sizes: QuantMatmulBlockSizes,
    interpret: bool,
    sum_splits: bool = True,
) -> jax.Array:  # [M, N] in x's dtype; sum_splits=False: the splits' partials [S, M, N] (float32 where S > 1)
    check_inputs(x, values, scale, offset, layer, fmt=fmt, group_size=group_size)
    check_block_sizes(block_sizes, fmt=fmt, group_size=group_size, m=x.shape[0])
    bs = block_sizes
    M, K = x.shape
    L, _, width = values.shape
    packed = fmt == "int4"
    N = 2 * width if packed else width
    fma = bs.path == "fma"
    if fma:  # K in chunks: one group each (with groups), else `unroll` steps
        chunk_steps = group_size // bs.block_k if group_size else bs.unroll
        units = pl.cdiv(K, bs.block_k * chunk_steps)
    else:
        units = pl.cdiv(K, bs.block_k)
    per_split = pl.cdiv(units, min(bs.split_k, units))
    splits = pl.cdiv(units, per_split)  # no split left without a step
    if packed:  # free views: [..., c, 0] is column 2c, [..., c, 1] column 2c + 1
        scale, offset = (a.reshape(*a.shape[:-1], width, 2) for a in (scale, offset))
    out_cols = (width, 2) if packed else (N,)
    out_dtype = x.dtype if splits == 1 else jnp.float32
    operands = (jnp.reshape(layer, (1,)).astype(jnp.int32), x, values, scale,
                *((offset,) if packed else ()))

    if fma:
        kernel = functools.partial(_fma_kernel, fmt=fmt, group_size=group_size, num_chunks=units,
                                   chunks_per_split=per_split, chunk_steps=chunk_steps, block_n=bs.block_n,
                                   block_k=bs.block_k, prefetch=bs.prefetch, ptx=bs.ptx and not interpret
                                   and _packs_by_four(bs),
                                   prescale=bool(group_size) and (M > 1 if bs.prescale is None else bs.prescale))
        grid = (1, pl.cdiv(N, bs.block_n), splits)
    else:
        kernel = functools.partial(_mma_kernel, fmt=fmt, group_size=group_size, num_steps=units,
                                   steps_per_split=per_split, block_m=bs.block_m, block_n=bs.block_n,
                                   block_k=bs.block_k)
        grid = (pl.cdiv(M, bs.block_m), pl.cdiv(N, bs.block_n), splits)
    out = launch(kernel, operands, jax.ShapeDtypeStruct((splits, M, *out_cols), out_dtype), grid, bs,
                 interpret=interpret, name=kernel_name(fmt, bs, splits))
    if not sum_splits:
        return out.reshape(splits, M, N)
    if splits > 1:
        out = out.sum(axis=0)
    return out.reshape(M, N).astype(x.dtype)
