"""Quantized leaves: round-to-nearest within its bound, the stored fields read back by an independent numpy
decoder, and `qeinsum` equal to the float einsum over that decoding, for every format and a group size that
does (32) and does not (128 over 576 inputs) divide the inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.quant.qtensor import QTensor, dequantize, pack_int4, qeinsum, to_out_in, unpack_int4
from jinfer.quant.rtn import quantize

# (weight shape with a stacked layer axis first, contracted axes, einsum of the model)
WEIGHTS = [((2, 576, 3, 16), 1, "TD,DNH->TNH"), ((2, 3, 16, 576), 2, "TNH,NHD->TD"), ((2, 576, 96), 1, "TD,DF->TF")]


def numpy_decode(w: QTensor) -> np.ndarray:
    """Float weights from the stored fields: nibbles by division, groups by an explicit loop."""
    vals = np.asarray(w.values)
    if w.fmt == "int4":
        vals = np.stack([vals % 16, vals // 16], axis=-1).reshape(*vals.shape[:-1], 2 * vals.shape[-1])
    q = vals.astype(np.float32)
    L = q.shape[0]
    in_shape, out_shape = q.shape[1:1 + w.n_in], q.shape[1 + w.n_in:]
    n = int(np.prod(in_shape))
    q = q.reshape(L, n, *out_shape)
    g = w.group_size or n
    scale, offset = np.asarray(w.scale), None if w.offset is None else np.asarray(w.offset)
    out = np.empty_like(q)
    for i in range(n):
        out[:, i] = q[:, i] * scale[:, i // g] + (0 if offset is None else offset[:, i // g])
    return out.reshape(L, *in_shape, *out_shape)


@pytest.mark.parametrize("shape, n_in, spec", WEIGHTS)
@pytest.mark.parametrize("fmt, group", [("int8", 0), ("fp8", 0), ("int4", 128), ("int4", 32), ("int8", 128)])
def test_round_to_nearest_and_qeinsum(shape, n_in, spec, fmt, group):
    rng = np.random.default_rng(abs(hash((shape, fmt, group))) % 2**32)
    w = rng.normal(size=shape).astype(np.float32) * rng.uniform(0.1, 3.0, size=shape[-1]).astype(np.float32)
    qt = quantize(jnp.asarray(w), fmt=fmt, n_in=n_in, group_size=group, lead=1)
    assert qt.shape == w.shape
    assert qt.values.dtype == {"int8": jnp.int8, "int4": jnp.uint8, "fp8": jnp.float8_e4m3fn}[fmt]
    deq = numpy_decode(qt)
    np.testing.assert_allclose(np.asarray(dequantize(qt)), deq, rtol=1e-6, atol=1e-6)

    # Round to nearest: each weight within half a step of its group's grid (fp8: within its 3-bit mantissa).
    n = int(np.prod(shape[1:1 + n_in]))
    g = group or n
    step = np.repeat(np.asarray(qt.scale), g, axis=1)[:, :n].reshape(deq.shape)
    err = np.abs(deq - w)
    if fmt == "fp8":
        assert (err <= np.abs(w) / 16 + step * 2.0 ** -9 + 1e-6).all()
    else:
        assert (err <= step / 2 + 1e-5).all()
        assert err.max() > step.min() / 8  # it did round

    x = rng.normal(size=(5, *shape[1:1 + n_in])).astype(np.float32)
    for layer in range(shape[0]):
        one = jax.tree_util.tree_map(lambda a: a[layer], qt)
        got = qeinsum(spec, jnp.asarray(x), one)
        want = np.einsum(spec, x, deq[layer])
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_int4_packing_is_two_nibbles_low_first():
    q = np.random.default_rng(0).integers(0, 16, (3, 10)).astype(np.uint8)
    packed = pack_int4(q)
    assert packed.shape == (3, 5) and packed.dtype == np.uint8
    assert (packed == q[:, 0::2] + 16 * q[:, 1::2]).all()
    np.testing.assert_array_equal(np.asarray(unpack_int4(jnp.asarray(packed))), q)


def test_fp8_values_are_e4m3():
    w = np.random.default_rng(1).normal(size=(1, 64, 8)).astype(np.float32)
    qt = quantize(jnp.asarray(w), fmt="fp8", n_in=1, lead=1)
    v = np.asarray(qt.values).astype(np.float32)
    assert np.abs(v).max() == pytest.approx(448.0)  # each column's largest magnitude maps to e4m3's largest
    np.testing.assert_array_equal(v, v.astype(jnp.float8_e4m3fn).astype(np.float32))


@pytest.mark.parametrize("shape, n_in, spec", WEIGHTS)
def test_out_in_layout_is_the_same_weight(shape, n_in, spec):
    """int4 stored outputs-first (the GPU kernel's layout): the stored bytes hold, for each output, its
    consecutive inputs two a byte, low nibble first (read back by numpy here), and the leaf stands for the same
    weight: shape, dequantize and qeinsum as the importers' layout."""
    rng = np.random.default_rng(len(shape) + n_in)
    qt = quantize(jnp.asarray(rng.normal(size=shape), jnp.float32), fmt="int4", n_in=n_in, group_size=32, lead=1)
    t = to_out_in(qt)
    assert t.layout == "out_in" and t.shape == qt.shape and to_out_in(t) is t
    q = np.asarray(unpack_int4(qt.values))  # [L, *in, *out]
    order = (0, *range(1 + n_in, q.ndim), *range(1, 1 + n_in))
    want = q.transpose(order)  # [L, *out, *in]
    vals = np.asarray(t.values)
    np.testing.assert_array_equal(vals % 16, want[..., 0::2])
    np.testing.assert_array_equal(vals // 16, want[..., 1::2])
    np.testing.assert_array_equal(np.asarray(dequantize(t)), np.asarray(dequantize(qt)))
    x = jnp.asarray(rng.normal(size=(5, *shape[1:1 + n_in])), jnp.float32)
    one = jax.tree_util.tree_map(lambda a: a[1], t)
    np.testing.assert_array_equal(np.asarray(qeinsum(spec, x, one)),
                                  np.asarray(qeinsum(spec, x, jax.tree_util.tree_map(lambda a: a[1], qt))))


def test_out_in_layout_errors_name_the_field():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 8)), jnp.float32)
    with pytest.raises(ValueError, match="'out_in' is for int4 and int8 weights"):
        to_out_in(quantize(w, fmt="fp8", n_in=1))
    with pytest.raises(ValueError, match="last input axis .* is odd"):
        to_out_in(quantize(w[:63], fmt="int4", n_in=1, group_size=0))
    q = quantize(w, fmt="int8", n_in=1)
    with pytest.raises(ValueError, match="QTensor.layout='out_in' .* got fmt='fp8'"):
        f8 = quantize(w, fmt="fp8", n_in=1)
        QTensor(f8.values, f8.scale, None, "fp8", 1, 1, 0, layout="out_in")
    with pytest.raises(ValueError, match="QTensor.layout='sideways'"):
        QTensor(q.values, q.scale, None, "int8", 1, 1, 0, layout="sideways")
