"""Block sizes of the quantized matmul kernels, keyed by (device kind, format, M bucket).

`python benchmarks/quant_matmul.py --variants` times a curated list of sizes per shape on the device (one
process, one profiler trace per case and round) and prints the best, to be copied into `TABLE` (which holds the
measured winners, below); `--sweep` times a grid.
Every entry leaves `split_k` to `block_sizes_for`, which picks it from the shape so that a decode matmul with
few output blocks still spreads over every multiprocessor (at M = 1 the whole cost is reading the weight once).
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class QuantMatmulBlockSizes:
    """path: "mma" (x's rows in blocks of block_m through the matrix units) or "fma" (all of x's M <= FMA_MAX_M
    rows per program, float32 FMAs on the CUDA cores; block_m unused): kernel.py's docstring says when each
    wins. block_m: rows of x per program (>= 16: Triton's matrix products need 16 rows; fewer rows are padded
    and masked). block_n: output columns per program (int4: block_n // 2 packed bytes, >= 32). block_k: inputs
    per inner step (>= 16; with groups, a divisor of group_size, so that one step lies in one group). All three
    powers of two. unroll ("fma", per-channel scales only): steps per loop iteration (with groups, a group's
    steps); prefetch ("fma"): load the next iteration's tiles before this one's FMAs (correct in interpret mode
    and compiled for sm_90, not yet timed on a GPU: the table leaves it off). prescale ("fma", with groups):
    scale each weight in the tile (one FMA a weight shared by all rows) instead of keeping a second tile of
    group sums per row; None: for M > 1. ptx ("fma", int4): unpack nibbles with `dequant.INT4_PTX` (compiled,
    where each thread holds a multiple of four bytes of the tile; otherwise and in interpret mode the same
    numbers come from jnp). num_warps, num_stages: Triton launch options
    (stages pipeline the "mma" path's weight loads).
    split_k: programs that share one output block, each reading a contiguous share of K and writing a float32
    partial that the wrapper sums (1: no partials, the output written in x's dtype)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    path: str = "mma"
    unroll: int = 1
    prefetch: bool = False
    prescale: bool | None = None
    ptx: bool = True


# The most rows the "fma" path takes: each row keeps its own [block_k, block_n] float32 accumulator.
FMA_MAX_M = 8

# M buckets: the largest M each serves (decode batches; above the last, the last bucket's sizes).
M_BUCKETS = (1, 2, 4, 8, 16, 64, 256)


def _fma(block_n, block_k, unroll=1, num_warps=4, prescale=None):
    return QuantMatmulBlockSizes(block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=1,
                                 path="fma", unroll=unroll, prefetch=False, prescale=prescale)


def _mma(block_m, block_n, block_k, num_warps, num_stages):
    return QuantMatmulBlockSizes(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps,
                                 num_stages=num_stages)


# Measured on an NVIDIA H200 (jax 0.11.2, Triton 3.6; `benchmarks/quant_matmul.py --variants`, device copy
# 4262 GB/s, weights rotated over > 150 MB of layers): the best of 5-11 candidates per case, device time
# (split-K's sum included) and fraction of copy bandwidth for the bytes read. int8 / fp8 per channel, int4 in
# groups of 128.
#   M = 1, "fma" (the "mma" path at M = 1: int8 28.8 / 29.0 us, int4 29.5 / 25.6 us, fp8 29.6 / 30.0 us on the
#   two large shapes):
#     4096x14336: int8 27.3 us 0.50, fp8 26.0 us 0.53, int4 28.0 us 0.28
#     14336x4096: int8 21.6 us 0.64, fp8 20.3 us 0.68, int4 28.0 us 0.28 (24.6 us with block_n 128, 2 warps)
#     4096x4096: int8 8.6 us 0.46, int4 9.6 us 0.23; 4096x1024: int8 5.2 us 0.19, int4 4.7 us 0.12
#   int4 at M = 1 again (session 31, nibbles unpacked by PTX, `dequant.INT4_PTX`): block_n 128, prescaled
#     weights (128 registers a thread, occupancy 25%, against 246 and 12.5% at block_n 256): 4096x14336 26.4 us
#     0.29, 14336x4096 23.9 us 0.32; block_n 256 with group sums: 24.4 us 0.32 and 42.8 us (29.6 us and 29.7
#     with the jnp unpack), so the smaller block serves both. 4096x4096 10.4 us, 4096x1024 5.1 us.
#   M = 4, "mma" (the "fma" path: int8 41.4 us, int4 57.0 us, fp8 41.0 us), 4096x14336: int8 28.3 us 0.49,
#     fp8 27.4 us 0.51, int4 30.3 us 0.26.
#   M = 16, 4096x14336: int8 28.2 us 0.49, fp8 28.8 us 0.48, int4 32.6 us 0.24.
#   M = 64, 4096x14336: int8 41.8 us 0.34, fp8 42.6 us 0.34, int4 61.4 us 0.14.
#   M = 256, 4096x14336: int8 96.8 us 0.17, fp8 94.2 us 0.17, int4 168.4 us 0.06.
# M = 2 and 8 were not measured: they take M = 4's sizes (the "fma" path's cost grows with M: one FMA per
# weight and row).
_INT8 = {1: _fma(128, 64, unroll=2, num_warps=2), 4: _mma(16, 128, 64, 4, 4), 16: _mma(16, 128, 64, 4, 5),
         64: _mma(64, 128, 128, 4, 3), 256: _mma(128, 128, 64, 8, 3)}
_INT4 = {1: _fma(128, 32, num_warps=4, prescale=True), 4: _mma(16, 256, 128, 4, 4), 16: _mma(16, 256, 128, 4, 4),
         64: _mma(64, 128, 128, 4, 3), 256: _mma(64, 128, 128, 4, 3)}
_BY_BUCKET = {1: 1, 2: 4, 4: 4, 8: 4, 16: 16, 64: 64, 256: 256}  # M bucket -> the measured entry it takes

# Weights stored "out_in" (`out_in.py`), by format and M bucket. Not timed on a GPU yet: chosen from the sm_90
# machine code (`python benchmarks/sass_profile.py quant --layout out_in`). int4: block_n 128, block_k 128,
# 4 warps compile to 3.3 instructions a weight at 127 registers a thread (25% occupancy); block_n 256 with 8
# warps to 3.0 (25%), with 4 warps to 2.7 at 255 registers (12.5%). At 64 rows x's per-step sums make it 6.6
# (the "mma" path 6.8). Four stages keep three steps' loads in flight. int8 (a byte a weight, so twice the
# instructions a byte allows): three stages of 16 KB tiles leave room for four programs a multiprocessor.
_OUT_IN = {"int4": {1: _mma(16, 128, 128, 4, 4), 16: _mma(16, 128, 128, 4, 4), 64: _mma(64, 128, 128, 4, 3)},
           "int8": {1: _mma(16, 128, 128, 4, 3), 16: _mma(16, 128, 128, 4, 3), 64: _mma(64, 128, 128, 4, 3)}}
OUT_IN_TABLE: dict[tuple[str, str, int], QuantMatmulBlockSizes] = {
    ("*", fmt, b): by_m[min((m for m in by_m if m >= b), default=64)] for fmt, by_m in _OUT_IN.items()
    for b in M_BUCKETS}

# Where weights are converted to "out_in" for the kernel (a substring of the device kind -> the formats);
# other devices and formats keep the importers' "in_out". Empty until a GPU has timed both layouts through
# the engine (`benchmarks/throughput.py --out-in int4`, `benchmarks/quant_matmul.py --variants`).
OUT_IN_FORMATS: dict[str, tuple[str, ...]] = {}


def out_in_formats(device_kind: str) -> tuple[str, ...]:
    return next((fmts for kind, fmts in OUT_IN_FORMATS.items() if kind in device_kind), ())


# (device kind, fmt, M bucket) -> block sizes; a missing key falls back to ("*", fmt, bucket), then DEFAULT.
TABLE: dict[tuple[str, str, int], QuantMatmulBlockSizes] = {
    ("*", fmt, b): table[m] for fmt, table in (("int8", _INT8), ("fp8", _INT8), ("int4", _INT4))
    for b, m in _BY_BUCKET.items()
}
DEFAULT = QuantMatmulBlockSizes()

# Multiprocessors per device kind (split_k aims at `WAVES` programs per multiprocessor); others: 132.
SM_COUNT = {"NVIDIA H100 80GB HBM3": 132, "NVIDIA H200": 132, "NVIDIA A100-SXM4-80GB": 108}
WAVES = {"mma": 2, "fma": 4}
MIN_STEPS_PER_SPLIT = 4  # fewer K steps per program leave the loads nothing to overlap


def m_bucket(m: int) -> int:
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1])


def fit_block_sizes(sizes: QuantMatmulBlockSizes, m: int, k: int, n: int, device_kind: str, group_size: int = 0
                    ) -> QuantMatmulBlockSizes:
    """`sizes` made to fit the shape: block_k cut to a divisor of group_size, block_m no larger than m needs,
    and split_k chosen to fill the device (`WAVES` programs per multiprocessor)."""
    bk = sizes.block_k
    while group_size and group_size % bk and bk > 16:
        bk //= 2
    bm = max(16, min(sizes.block_m, 1 << max(0, m - 1).bit_length()))
    if sizes.path == "fma":
        programs = math.ceil(n / sizes.block_n)
        units = math.ceil(k / (group_size or bk * sizes.unroll))  # chunks: split_k splits between them
        least = max(1, MIN_STEPS_PER_SPLIT * bk // (group_size or bk * sizes.unroll))
    else:
        programs = math.ceil(m / bm) * math.ceil(n / sizes.block_n)
        units = math.ceil(k / bk)
        least = MIN_STEPS_PER_SPLIT
    target = WAVES[sizes.path] * SM_COUNT.get(device_kind, 132)
    split = max(1, min(math.ceil(target / programs), units // least))
    return dataclasses.replace(sizes, block_m=bm, block_k=bk, split_k=split)


def block_sizes_for(m: int, k: int, n: int, fmt: str, device_kind: str, group_size: int = 0,
                    layout: str = "in_out") -> QuantMatmulBlockSizes:
    """The table's sizes for x [m, k] times a weight [k, n] of `fmt` stored in `layout`, fitted to the shape."""
    bucket = m_bucket(m)
    if layout == "out_in":
        sizes = OUT_IN_TABLE.get((device_kind, fmt, bucket)) or OUT_IN_TABLE[("*", fmt, bucket)]
        return fit_block_sizes(sizes, m, k, n, device_kind, group_size)
    sizes = TABLE.get((device_kind, fmt, bucket)) or TABLE.get(("*", fmt, bucket)) or DEFAULT
    if sizes.path == "fma" and m > FMA_MAX_M:
        sizes = DEFAULT
    return fit_block_sizes(sizes, m, k, n, device_kind, group_size)
