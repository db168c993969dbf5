"""The quantized weight leaf of a params pytree, and the one matmul that reads every weight format.

A weight of the model contracts its leading `n_in` axes (after any stacked-layer axes) with the input and
keeps its trailing axes as outputs: wq [D, N, H] has n_in = 1, wo [N, H, D] has n_in = 2. Quantized, it is

    w[..., i, o] ~= q[..., i, o] * scale[..., g(i), o] + offset[..., g(i), o]

with the inputs (flattened) cut into groups of `group_size` (0: one group, i.e. per output channel) and g(i)
the group of input i; the last group may be shorter (SmolLM2's 576 inputs are 4.5 groups of 128). Formats (`fmt`):
- "int8": q int8 in [-127, 127], no offset (symmetric);
- "int4": q in [0, 15], two to a byte (uint8, the even output index in the low nibble, packed along the
  last axis), with an offset (asymmetric: RTN's min, GGUF's Q4_1 min, AWQ/GPTQ's -zero * scale);
- "fp8": q float8_e4m3fn, no offset.
Every array field keeps the stacked-layer axes in front, so slicing a layer out of a stacked QTensor (a
scan, `llama.unstack_layers`) slices each field alike; the static fields count trailing axes only.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
    values: jax.Array  # int8 | uint8 (int4 pairs) | float8_e4m3fn  [..., *in, *out] (int4: last axis halved)
    scale: jax.Array  # f32 (or f16, as GGUF stores them)[..., G, *out]
    offset: jax.Array | None  # like scale (int4), else None
    fmt: str = dataclasses.field(metadata=dict(static=True))
    n_in: int = dataclasses.field(metadata=dict(static=True))  # contracted (input) axes
    n_out: int = dataclasses.field(metadata=dict(static=True))  # output axes
    group_size: int = dataclasses.field(metadata=dict(static=True))  # inputs per group; 0: all of them

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the float weight this stands for."""
        s = tuple(self.values.shape)
        return s[:-1] + (2 * s[-1],) if self.fmt == "int4" else s

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in (self.values, self.scale, self.offset)
                   if x is not None)


def is_qtensor(x) -> bool:
    return isinstance(x, QTensor)


def unpack_int4(packed: jax.Array) -> jax.Array:
    """uint8[..., n] -> uint8[..., 2n]: the low nibble is the even index."""
    low, high = packed & 0xF, packed >> 4
    return jnp.stack([low, high], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def pack_int4(q) -> np.ndarray:
    """Integers in [0, 15], [..., 2n] -> uint8[..., n] (numpy or jax in, the same kind out)."""
    xp = jnp if isinstance(q, jax.Array) else np
    q = q.astype(xp.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _groups(n_inputs: int, group_size: int) -> tuple[int, int]:
    """(group size, number of groups) over n_inputs flattened inputs."""
    g = group_size or n_inputs
    return g, math.ceil(n_inputs / g)


def group_inputs(w: jax.Array, n_in: int, group_size: int, lead: int, pad: str = "constant") -> jax.Array:
    """w [*lead, *in, *out] -> f32[*lead, G, g, *out]: the inputs flattened and cut into groups, the last
    one padded (`pad`: jnp.pad's mode; "edge" repeats the last input, so a group's min and max stay its own)."""
    in_shape, out_shape = w.shape[lead:lead + n_in], w.shape[lead + n_in:]
    n = math.prod(in_shape)
    g, G = _groups(n, group_size)
    w = w.reshape(*w.shape[:lead], n, *out_shape).astype(jnp.float32)
    w = jnp.pad(w, [(0, 0)] * lead + [(0, G * g - n)] + [(0, 0)] * len(out_shape), mode=pad)
    return w.reshape(*w.shape[:lead], G, g, *out_shape)


def ungroup_inputs(x: jax.Array, in_shape: tuple[int, ...], lead: int) -> jax.Array:
    """The inverse of `group_inputs`: [*lead, G, g, *out] -> [*lead, *in, *out], the padding dropped."""
    n = math.prod(in_shape)
    x = x.reshape(*x.shape[:lead], -1, *x.shape[lead + 2:])[(slice(None),) * lead + (slice(0, n),)]
    return x.reshape(*x.shape[:lead], *in_shape, *x.shape[lead + 1:])


def dequantize(w: QTensor, dtype=jnp.float32) -> jax.Array:
    """The float weight, [..., *in, *out] in `dtype` (computed in float32)."""
    q = unpack_int4(w.values) if w.fmt == "int4" else w.values
    lead = q.ndim - w.n_in - w.n_out  # stacked-layer axes in front
    x = group_inputs(q, w.n_in, w.group_size, lead) * jnp.expand_dims(w.scale, lead + 1)
    if w.offset is not None:
        x = x + jnp.expand_dims(w.offset, lead + 1)
    return ungroup_inputs(x, q.shape[lead:lead + w.n_in], lead).astype(dtype)


def qeinsum(spec: str, x: jax.Array, w) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for a float weight or a QTensor (dequantized in the step; XLA fuses the
    dequantization into the matmul's operand where its backend can)."""
    if isinstance(w, QTensor):
        w = dequantize(w, x.dtype)
    return jnp.einsum(spec, x, w)
