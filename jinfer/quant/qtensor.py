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
`layout` (static) is the order of the stored axes: "in_out" as above (every importer and quantizer makes it),
or "out_in", for int4 and int8: values [..., *out, *in] (int4: the pairs packed along the last input axis, the
even input in the low nibble), which the GPU kernel reads as matrix-unit operands (`to_out_in`; `jinfer.runtime.
matmul` converts to it where that kernel runs). Scales and offsets are the same in both.
Every array field keeps the stacked-layer axes in front, so slicing a layer out of a stacked QTensor (a
scan, `llama.unstack_layers`) slices each field alike; the static fields count trailing axes only.

Two optional parts come from calibrated methods (jinfer.quant.calibrated):
- `input_scale` s (f32[..., *in]): the stored weight is W·diag(s) (input row i multiplied by s[i]) and the
  matmul divides the activation by s before the dot, so x·W = (x/s)·(W·diag(s)). AWQ's scales (which make the
  inputs that matter most coarser-grained in x and finer in W) and SmoothQuant's (which move activation
  outliers into the weight) both are this. They stay per matrix rather than folded into the preceding norm
  or matmul: wq, wk and wv share an input but get scales of their own, wo's input (attention output) and
  w_down's (silu(gate)·up) have no per-channel weight before them that could absorb a scale, and the float
  params stay untouched for every other format.
- `act` (static): how the activation is quantized. None: the activation stays float and the weight is
  dequantized into the matmul. "int8" (W8A8): each token's activation (over the contracted axes) is rounded
  to int8 by its own scale amax/127 at run time, the int8 x int8 dot accumulates in int32, and the result is
  multiplied by the token's and the output channel's scales; it needs fmt "int8" per output channel
  (group_size 0), so one scale per output multiplies the whole int32 sum.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

ACTS = (None, "int8")  # activation formats: float, or int8 per token (W8A8)
LAYOUTS = ("in_out", "out_in")
OUT_IN_FORMATS = ("int4", "int8")  # the formats "out_in" stores


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
    input_scale: jax.Array | None = None  # f32[..., *in]: stored weight = W·diag(s), x divided by s; None: 1
    act: str | None = dataclasses.field(default=None, metadata=dict(static=True))  # None | "int8" (W8A8)
    layout: str = dataclasses.field(default="in_out", metadata=dict(static=True))  # LAYOUTS: stored axis order

    def __post_init__(self):
        # Static fields only: jax rebuilds the dataclass with placeholder leaves when it unflattens.
        if self.act not in ACTS:
            raise ValueError(f"QTensor.act={self.act!r} must be one of {list(ACTS)}")
        if self.act == "int8" and (self.fmt != "int8" or self.group_size != 0):
            raise ValueError(f"QTensor.act='int8' (W8A8) needs fmt='int8' with group_size=0 (one scale per "
                             f"output channel); got fmt={self.fmt!r}, group_size={self.group_size}")
        if self.layout not in LAYOUTS or (self.layout == "out_in" and (self.fmt not in OUT_IN_FORMATS
                                                                        or self.act is not None)):
            raise ValueError(f"QTensor.layout={self.layout!r} must be one of {list(LAYOUTS)}, and 'out_in' needs "
                             f"fmt in {list(OUT_IN_FORMATS)} without act; got fmt={self.fmt!r}, act={self.act!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the float weight this stands for."""
        s = tuple(self.values.shape)
        s = s[:-1] + (2 * s[-1],) if self.fmt == "int4" else s
        if self.layout == "out_in":  # [*lead, *out, *in] -> [*lead, *in, *out]
            lead = len(s) - self.n_in - self.n_out
            s = s[:lead] + s[len(s) - self.n_in:] + s[lead:len(s) - self.n_in]
        return s

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(x.shape)) * x.dtype.itemsize
                   for x in (self.values, self.scale, self.offset, self.input_scale) if x is not None)


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


def dequantize(w: QTensor, dtype=jnp.float32, *, keep_input_scale: bool = False) -> jax.Array:
    """The float weight this stands for, [..., *in, *out] in `dtype` (computed in float32): W, with any
    `input_scale` divided back out, so `einsum(spec, x, dequantize(w))` is the float matmul the leaf
    replaces (`act` is ignored: it is how the activation is rounded, not part of the weight).
    keep_input_scale=True gives the stored W·diag(s) instead (what `qeinsum` multiplies x/s by)."""
    q = unpack_int4(w.values) if w.fmt == "int4" else w.values
    lead = q.ndim - w.n_in - w.n_out  # stacked-layer axes in front
    if w.layout == "out_in":
        q = _swap_in_out(q, lead, w.n_out)
    x = group_inputs(q, w.n_in, w.group_size, lead) * jnp.expand_dims(w.scale, lead + 1)
    if w.offset is not None:
        x = x + jnp.expand_dims(w.offset, lead + 1)
    x = ungroup_inputs(x, q.shape[lead:lead + w.n_in], lead)
    if w.input_scale is not None and not keep_input_scale:
        x = x / w.input_scale.astype(jnp.float32).reshape(w.input_scale.shape + (1,) * w.n_out)
    return x.astype(dtype)


def _swap_in_out(a, lead: int, n_first: int):
    """[*lead, *A, *B] -> [*lead, *B, *A], A being the n_first axes after lead."""
    order = (*range(lead), *range(lead + n_first, a.ndim), *range(lead, lead + n_first))
    return a.transpose(order)


def why_not_out_in(w: QTensor) -> str | None:
    """Why `w` cannot be stored "out_in", or None when it can."""
    if w.fmt not in OUT_IN_FORMATS or w.act is not None:
        return (f"layout 'out_in' is for {' and '.join(OUT_IN_FORMATS)} weights without act; got fmt={w.fmt!r}, "
                f"act={w.act!r}")
    if w.fmt == "int4" and w.shape[len(w.shape) - w.n_out - 1] % 2:
        return f"the last input axis of a weight of shape {list(w.shape)} (n_in={w.n_in}) is odd; 'out_in' packs its pairs"
    return None


def to_out_in(w: QTensor) -> QTensor:
    """The QTensor stored "out_in": values [..., *out, *in] (int4: the pairs packed along the last input axis,
    which must be even). The same weight: `dequantize` gives the same numbers."""
    if w.layout == "out_in":
        return w
    reason = why_not_out_in(w)
    if reason:
        raise ValueError(reason)
    q = unpack_int4(w.values) if w.fmt == "int4" else w.values
    lead = q.ndim - w.n_in - w.n_out
    t = _swap_in_out(q, lead, w.n_in)
    return dataclasses.replace(w, values=pack_int4(t) if w.fmt == "int4" else t, layout="out_in")


def times_input_gain(w: QTensor, gain: jax.Array) -> QTensor:
    """w with each input row multiplied by gain (diag(gain) @ W, gain f32[..., *in] like `input_scale`), carried
    as the input scale 1 / gain that the matmul divides x by: the stored numbers and their rounding stay as
    they are. A zero gain gives an infinite scale, so its input contributes 0, as diag(gain) @ W's zero row."""
    if tuple(gain.shape) != tuple(w.shape[:len(w.shape) - w.n_out]):
        raise ValueError(f"gain of shape {list(gain.shape)} must match the weight's stacked and input axes "
                         f"{list(w.shape[:len(w.shape) - w.n_out])} (weight shape {list(w.shape)})")
    s = jnp.ones(gain.shape, jnp.float32) if w.input_scale is None else w.input_scale.astype(jnp.float32)
    return dataclasses.replace(w, input_scale=s / gain.astype(jnp.float32))


def concat_outputs(ws: list[QTensor], axis: int) -> QTensor | None:
    """QTensors that read the same input, joined along output axis `axis` (negative: counted from the end) into
    one, or None where they cannot be: another format, group size, axis count or layout, or per-input scales
    that differ. Each output keeps its stored numbers."""
    first = ws[0]
    if not -first.n_out <= axis < 0:
        raise ValueError(f"axis={axis} must be an output axis of the weight (-{first.n_out} to -1)")
    same = all((w.fmt, w.n_in, w.n_out, w.group_size, w.act, w.layout) ==
               (first.fmt, first.n_in, first.n_out, first.group_size, first.act, first.layout) for w in ws)
    if not same or first.layout != "in_out":
        return None
    scales = [w.input_scale for w in ws]
    if any(s is not None for s in scales) and not (
            all(s is not None for s in scales) and all(bool(jnp.array_equal(s, scales[0])) for s in scales)):
        return None

    def cat(field):
        parts = [getattr(w, field) for w in ws]
        return None if parts[0] is None else jnp.concatenate(parts, axis=axis)

    return dataclasses.replace(first, values=cat("values"), scale=cat("scale"), offset=cat("offset"))


@dataclasses.dataclass(frozen=True)
class LayerSlice:
    """Layer `layer` of a stacked QTensor, not sliced yet: `qeinsum` slices it (a copy of that layer's
    arrays), a kernel that takes the layer index reads it in place (`jinfer.runtime.matmul`)."""

    stacked: QTensor  # [L, *in, *out]
    layer: jax.Array  # i32[]

    def get(self) -> QTensor:
        return jax.tree_util.tree_map(lambda a: a[self.layer], self.stacked)


def qeinsum(spec: str, x: jax.Array, w) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for a float weight, a QTensor or a LayerSlice of one. x's contracted axes are
    its trailing `w.n_in` axes, and the weight is one layer's, as in every matmul of the model.
    Float activations: x / input_scale times the weight dequantized in the step (XLA fuses the dequantization
    into the matmul's operand where its backend can). act="int8": see `_int8_activation_einsum`."""
    if isinstance(w, LayerSlice):
        w = w.get()
    if not isinstance(w, QTensor):
        return jnp.einsum(spec, x, w)
    if w.input_scale is not None:
        x = (x.astype(jnp.float32) / w.input_scale.astype(jnp.float32)).astype(x.dtype)
    if w.act == "int8":
        return _int8_activation_einsum(spec, x, w)
    return jnp.einsum(spec, x, dequantize(w, x.dtype, keep_input_scale=True))


def is_plain_spec(spec: str, n_in: int) -> bool:
    """Whether `spec` contracts x's trailing n_in axes with the weight's leading ones and lays the output out
    as x's other axes, then the weight's outputs (every matmul of the model): a flat [M, K] x [K, N] product."""
    operands, out = spec.replace(" ", "").split("->")
    xs, ws = operands.split(",")
    return out == xs[:len(xs) - n_in] + ws[n_in:] and xs[len(xs) - n_in:] == ws[:n_in]


def _int8_activation_einsum(spec: str, x: jax.Array, w: QTensor) -> jax.Array:
    """W8A8: x rounded to int8 per token (scale = amax over the contracted axes / 127, computed at run time),
    an int8 x int8 dot accumulated in int32, then the token's scale times the output channel's."""
    if not is_plain_spec(spec, w.n_in):
        raise ValueError(f"qeinsum spec={spec!r}: act='int8' needs x's trailing {w.n_in} axes contracted with "
                         f"the weight's leading ones and the output laid out as x's other axes, then the "
                         f"weight's outputs")
    x32 = x.astype(jnp.float32)
    contracted = tuple(range(x.ndim - w.n_in, x.ndim))
    amax = jnp.max(jnp.abs(x32), axis=contracted, keepdims=True)
    x_scale = jnp.where(amax > 0, amax / 127.0, 1.0)  # [..., 1 (x n_in)]
    xq = jnp.clip(jnp.round(x32 / x_scale), -127, 127).astype(jnp.int8)
    acc = jnp.einsum(spec, xq, w.values, preferred_element_type=jnp.int32)
    x_scale = x_scale.reshape(x.shape[:x.ndim - w.n_in] + (1,) * w.n_out)
    w_scale = w.scale.reshape(w.scale.shape[1:]).astype(jnp.float32)  # [1 group, *out] -> [*out]
    return (acc.astype(jnp.float32) * x_scale * w_scale).astype(x.dtype)
