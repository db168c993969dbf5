"""Input checks of the quantized matmul kernel: every error names the argument and prints its shape, dtype or
value."""

from __future__ import annotations

import math

import jax.numpy as jnp

from jinfer.kernels.quant_matmul.tuning import FMA_MAX_M, QuantMatmulBlockSizes

# fmt -> (dtype of the stored values, whether the format has an offset)
FORMATS = {"int8": (jnp.int8, False), "int4": (jnp.uint8, True), "fp8": (jnp.float8_e4m3fn, False)}
ACTIVATION_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def check_inputs(x, values, scale, offset, layer, *, fmt: str, group_size: int) -> None:
    """x [M, K]; values [L, K, N] (int4: u8[L, K, N // 2]); scale [L, G, N]; offset like scale (int4) or None;
    layer a scalar integer."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} must be one of {list(FORMATS)}")
    if x.ndim != 2 or values.ndim != 3 or scale.ndim != 3:
        raise ValueError(f"x must be [M, K], values [L, K, N] and scale [L, G, N]; got {x.shape=} "
                         f"{values.shape=} {scale.shape=}")
    L, K, width = values.shape
    if x.shape[1] != K:
        raise ValueError(f"x has {x.shape[1]} inputs (x.shape={x.shape}); the weight has K={K} "
                         f"(values.shape={values.shape})")
    _check_rest(x, values, scale, offset, layer, fmt, group_size, L, K, 2 * width if fmt == "int4" else width)


def check_out_in_inputs(x, values, scale, offset, layer, *, fmt: str, group_size: int) -> None:
    """Weights stored "out_in": x [M, K]; values u8[L, N, K // 2] (int4, K even) or i8[L, N, K] (int8); scale
    [L, G, N]; offset like scale (int4) or None."""
    if fmt not in ("int4", "int8"):
        raise ValueError(f"fmt={fmt!r}: the out_in kernel reads int4 and int8")
    if x.ndim != 2 or values.ndim != 3 or scale.ndim != 3:
        raise ValueError(f"x must be [M, K], values [L, N, K{' // 2' if fmt == 'int4' else ''}] and scale [L, G, "
                         f"N]; got {x.shape=} {values.shape=} {scale.shape=}")
    L, N, cols = values.shape
    K = 2 * cols if fmt == "int4" else cols
    if x.shape[1] != K:
        raise ValueError(f"x has {x.shape[1]} inputs (x.shape={x.shape}); values.shape={values.shape} holds "
                         f"K={K}{' (two a byte)' if fmt == 'int4' else ''}")
    _check_rest(x, values, scale, offset, layer, fmt, group_size, L, K, N)


def _check_rest(x, values, scale, offset, layer, fmt, group_size, L, K, N) -> None:
    stored, has_offset = FORMATS[fmt]
    if x.dtype not in [jnp.dtype(d) for d in ACTIVATION_DTYPES]:
        raise ValueError(f"x.dtype={x.dtype} must be float32, bfloat16 or float16")
    if values.dtype != stored:
        raise ValueError(f"values.dtype={values.dtype} must be {jnp.dtype(stored)} for fmt={fmt!r}")
    if not isinstance(group_size, int) or group_size < 0:
        raise ValueError(f"group_size={group_size!r} must be an integer >= 0 (0: one group)")
    G = math.ceil(K / (group_size or K))
    if scale.shape != (L, G, N) or scale.dtype not in (jnp.float32, jnp.float16):
        raise ValueError(f"scale must be float32 or float16 {[L, G, N]} (K={K}, group_size={group_size}); got "
                         f"{scale.dtype}{list(scale.shape)}")
    if has_offset != (offset is not None):
        raise ValueError(f"fmt={fmt!r} {'needs' if has_offset else 'takes no'} offset; got "
                         f"{None if offset is None else offset.shape}")
    if offset is not None and (offset.shape != scale.shape or offset.dtype not in (jnp.float32, jnp.float16)):
        raise ValueError(f"offset must be float32 or float16 {list(scale.shape)}, like scale; got "
                         f"{offset.dtype}{list(offset.shape)}")
    if jnp.ndim(layer) != 0 or not jnp.issubdtype(jnp.result_type(layer), jnp.integer):
        raise ValueError(f"layer must be a scalar integer; got shape {jnp.shape(layer)} dtype "
                         f"{jnp.result_type(layer)}")


def check_block_sizes(bs: QuantMatmulBlockSizes, *, fmt: str, group_size: int, m: int | None = None) -> None:
    """Powers of two no smaller than the matrix units take; a K step inside one group; the "fma" path only for
    the few rows it unrolls."""
    if not isinstance(bs, QuantMatmulBlockSizes):
        raise ValueError(f"block_sizes must be QuantMatmulBlockSizes; got {bs!r}")
    if bs.path not in ("mma", "fma"):
        raise ValueError(f"path={bs.path!r} must be 'mma' or 'fma'")
    if bs.path == "fma" and m is not None and m > FMA_MAX_M:
        raise ValueError(f"path='fma' takes at most {FMA_MAX_M} rows of x (one accumulator each); got M={m}")
    min_n = 32 if fmt == "int4" else 16  # int4: block_n // 2 bytes per row of a weight tile
    for name, v, least in (("block_m", bs.block_m, 16), ("block_n", bs.block_n, min_n), ("block_k", bs.block_k, 16)):
        if not _pow2(v) or v < least:
            raise ValueError(f"{name}={v} must be a power of two >= {least} (fmt={fmt!r})")
    if group_size and group_size % bs.block_k:
        raise ValueError(f"block_k={bs.block_k} must divide group_size={group_size}: one K step reads one group")
    if bs.split_k < 1 or bs.num_warps < 1 or bs.num_stages < 1 or bs.unroll < 1:
        raise ValueError(f"split_k={bs.split_k}, num_warps={bs.num_warps}, num_stages={bs.num_stages} and "
                         f"unroll={bs.unroll} must be >= 1")
