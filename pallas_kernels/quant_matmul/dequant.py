"""In-register readings of a quantized tile, chosen by what the GPU does fast (checked on Triton 3.6's sm_90
machine code). A plain int-to-float cast (`astype`) becomes I2F, a conversion at a quarter of the FMA rate,
and float8 -> bfloat16 becomes F2F at the same rate: these cost more than the weight read. Instead:

- `fma_values`, for the CUDA-core path (x's few rows times float32 weights): float32 tiles f_j in [1, 2),
  the stored bits moved into the mantissa of 1.0 by one or two integer ops (no float op at all), with the
  stored values an affine mix of them: q_h = sum_j mix[h][j] f_j + const[h] (`FMA_MIX`), paid once per group
  on the tiles' sums, not per weight. int8: f = 1 + (q + 128) / 256, the sign-extended q times 2^15 plus
  the bits of 1.5 (one LEA). int4: f_h = 1 + nibble_h / 16, each nibble shifted into mantissa bits 19-22
  and masked under the bits of 1.0 (a shift and a LOP3 a weight); compiled, a PTX block does it for four
  bytes at once from the register they were loaded in (`INT4_PTX`; interpret mode computes the same bits
  with jnp). float8: Triton's own cast to float32 (F2FP unpacks two bytes into float16 numbers, HADD2.F32
  widens them at full rate). Products with bfloat16 x are exact in float32 (f has 9 significant bits); the
  constant terms cancel against sum(x) terms of similar size, costing ~1e-7 relative.
- `mma_values`, for the matrix-unit path: numbers in x's dtype. int4 in bfloat16: the nibble as the
  mantissa of 128.0, i.e. 128 + q exactly (0x4300 | q), the 128 taken back once per group through sum(x)
  (so int4 needs no conversion instruction at all); int8: Triton's cast (already PRMT + HADD2, no I2F);
  float8: through float32 as above, then packed to bfloat16 (exact: e4m3 has 3 mantissa bits).
- `pair_values`, for int4 stored "out_in" (`out_in.py`): each byte holds two consecutive inputs; the low
  nibbles and the high ones become two tiles in x's dtype, bias + nibble, with the same magic numbers as
  `mma_values`. Compiled, a PTX block (`INT4_PAIRS_PTX`) turns the two bytes a thread holds side by side
  into one register of two 16-bit numbers, the pair the matrix unit takes: a byte permute puts them in the
  two halves, then one LOP3 masks the nibbles under the magic (the high nibbles shifted down first): about
  one instruction a weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

# fmt -> (mix, const) of fma_values: the stored value of half h is sum_j mix[h][j] * f_j + const[h].
FMA_MIX = {
    "int8": (((256.0,),), (-384.0,)),
    "int4": (((16.0, 0.0), (0.0, 16.0)), (-16.0, -16.0)),
    "fp8": (((1.0,),), (0.0,)),
}
# The bias mma_values adds to each int4 value in bfloat16 / float16 (taken back through sum(x)).
MMA_INT4_BIAS = {jnp.dtype(jnp.bfloat16): 128.0, jnp.dtype(jnp.float16): 1024.0}


def halves(q: jax.Array, fmt: str) -> tuple[jax.Array, ...]:
    """int4's packed bytes as (low nibbles: even columns, high nibbles: odd columns), still uint8; others as is."""
    return ((q & 0xF), (q >> 4)) if fmt == "int4" else (q,)


def _int4_ptx(half: int) -> str:
    """PTX for four packed bytes ($4, byte i = element i) -> 1 + nibble_i / 16 ($0-$3), the low nibbles (half 0)
    or the high ones (1): each shifted to mantissa bits 19-22, then (t & 0x780000) | 0x3F800000 (LUT 0xEA).
    One block a half: Pallas' lowering takes one result an asm op."""
    lines = []
    for out in range(4):
        bit = 8 * out + 4 * half
        shift = f"shl.b32 t, $4, {19 - bit}" if bit <= 19 else f"shr.u32 t, $4, {bit - 19}"
        lines.append(f"{shift}; lop3.b32 ${out}, t, m, one, 0xEA;")
    return "{ .reg .b32 t, m, one; mov.b32 m, 0x780000; mov.b32 one, 0x3F800000; " + " ".join(lines) + " }"


INT4_PTX = (_int4_ptx(0), _int4_ptx(1))


def fma_values(q: jax.Array, fmt: str, *, ptx: bool = False) -> tuple[jax.Array, ...]:
    """float32 tiles f_j, the stored values an affine mix of them (`FMA_MIX[fmt]`). ptx: int4 through
    `INT4_PTX` (compiled kernels only; the same bits as the jnp form)."""
    if fmt == "int8":  # bits of 1.5 + q / 256 = 1 + (q + 128) / 256, q sign-extended
        return (lax.bitcast_convert_type((q.astype(jnp.int32) << 15) + 0x3FC00000, jnp.float32),)
    if fmt == "int4" and ptx:
        f32 = jax.ShapeDtypeStruct(q.shape, jnp.float32)
        return tuple(plgpu.elementwise_inline_asm(asm, args=[q], constraints="=r,=r,=r,=r,r", pack=4,
                                                  result_shape_dtypes=[f32])[0] for asm in INT4_PTX)
    if fmt == "int4":
        u = q.astype(jnp.int32)  # the byte, zero-extended: low nibble in bits 0-3, high in 4-7
        return tuple(lax.bitcast_convert_type(((u << s) & 0x780000) | 0x3F800000, jnp.float32)
                     for s in (19, 15))  # 1 + lo / 16, 1 + hi / 16
    return (q.astype(jnp.float32),)


def mma_values(q: jax.Array, fmt: str, dtype) -> tuple[jax.Array, ...]:
    """Tiles in `dtype` (x's) for the matrix units: q exactly, except int4 in bfloat16 / float16, which is
    q + MMA_INT4_BIAS[dtype]."""
    dtype = jnp.dtype(dtype)
    if fmt == "int4" and dtype in MMA_INT4_BIAS:
        magic = 0x4300 if dtype == jnp.bfloat16 else 0x6400  # 128.0 in bfloat16, 1024.0 in float16
        return tuple(lax.bitcast_convert_type(h.astype(jnp.uint16) | jnp.uint16(magic), dtype)
                     for h in halves(q, fmt))
    if fmt == "fp8" and dtype != jnp.float32:
        return (q.astype(jnp.float32).astype(dtype),)
    return tuple(h.astype(dtype) for h in halves(q, fmt))


def _pairs_ptx(high: bool, magic: int) -> str:
    """PTX for two packed bytes ($1, pack=2: byte 0 then 1) -> $0, the 16-bit numbers magic | nibble of byte 0
    (low half) and of byte 1 (high half): the low nibbles, or the high ones."""
    shift = "shr.u32 t, t, 4; " if high else ""
    return ("{ .reg .b32 t, m, c; mov.b32 m, 0x000F000F; "
            f"mov.b32 c, {magic * 0x10001:#010x}; prmt.b32 t, $1, 0, 0x4140; {shift}lop3.b32 $0, t, m, c, 0xEA; }}")


# dtype -> (low, high) PTX blocks of `pair_values`, for the 16-bit dtypes the magic numbers serve.
INT4_PAIRS_PTX = {jnp.dtype(d): (_pairs_ptx(False, m), _pairs_ptx(True, m))
                  for d, m in ((jnp.bfloat16, 0x4300), (jnp.float16, 0x6400))}


def pair_values(q: jax.Array, dtype, *, ptx: bool = False) -> tuple[jax.Array, jax.Array]:
    """uint8 pairs -> (low nibbles, high nibbles) in `dtype`, each bias + nibble (MMA_INT4_BIAS; float32: 0).
    ptx: through `INT4_PAIRS_PTX` (compiled kernels, 16-bit dtypes; the same bits as the jnp form)."""
    dtype = jnp.dtype(dtype)
    if ptx and dtype in INT4_PAIRS_PTX:
        out = jax.ShapeDtypeStruct(q.shape, dtype)
        return tuple(plgpu.elementwise_inline_asm(asm, args=[q], constraints="=r,r", pack=2,
                                                  result_shape_dtypes=[out])[0] for asm in INT4_PAIRS_PTX[dtype])
    return mma_values(q, "int4", dtype)
