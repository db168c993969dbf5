"""The Pallas RMSNorm (interpret mode on the CPU, native on a GPU) against the jnp reference on fresh random
rows: float32, bfloat16 and float16, widths on and off a power of two, one row and several, a [D] gain and one
layer of a stacked [L, D] gain read at a traced index (the other layers NaN, so a read of any of them shows),
a float32 gain on bfloat16 rows (the output promotes, as the model's norm does), and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.kernels.rms_norm import rms_norm, rms_norm_reference
from jinfer.models.layers import rms_norm as model_rms_norm

NATIVE = jax.devices()[0].platform == "gpu"
INTERPRET = not NATIVE
# Elementwise, relative to the row's scale: the kernel sums the squares in another order, which may move the
# float32 norm by an ulp and so a rounded output by one ulp of its dtype.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
EPS = 1e-5


def check(out, ref, dtype):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    a, b = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("D", [64, 576, 4096])
@pytest.mark.parametrize("rows", [(1,), (5,), (2, 3)])
def test_stacked_gain_at_a_traced_layer(dtype, D, rows):
    rng = np.random.default_rng(D + len(rows))
    x = jnp.asarray(rng.normal(size=(*rows, D)) * 3, dtype)
    gain = np.full((4, D), np.nan, np.float32)
    gain[2] = rng.normal(size=D)
    gain = jnp.asarray(gain, dtype)
    out = jax.jit(lambda x, g, i: rms_norm(x, g, eps=EPS, layer=i, interpret=INTERPRET))(x, gain, jnp.int32(2))
    check(out, rms_norm_reference(x, gain[2], EPS), dtype)


@pytest.mark.parametrize("x_dtype,gain_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32),
                                                 (jnp.bfloat16, jnp.bfloat16)])
@pytest.mark.parametrize("scale", [1.0, 1e-3])  # rows this small are normed by eps as much as by their values
def test_plain_gain_and_the_models_norm(x_dtype, gain_dtype, scale):
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(1, 3, 576)) * scale, x_dtype)
    gain = jnp.asarray(rng.normal(size=576), gain_dtype)
    out = rms_norm(x, gain, eps=EPS, interpret=INTERPRET)
    ref = model_rms_norm(x, gain, EPS)  # the model's own norm, reciprocal of sqrt: the same numbers
    check(out, ref, jnp.dtype(out.dtype).type)


def test_rows_of_zeros_are_not_nan():
    out = rms_norm(jnp.zeros((2, 64)), jnp.ones(64), eps=EPS, interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_errors_name_the_shapes():
    x = jnp.zeros((2, 64))
    with pytest.raises(ValueError, match=r"gain's last axis 32 .* must equal x's 64"):
        rms_norm(x, jnp.ones(32), eps=EPS, interpret=True)
    with pytest.raises(ValueError, match=r"needs layer with a stacked"):
        rms_norm(x, jnp.ones((3, 64)), eps=EPS, interpret=True)
    with pytest.raises(ValueError, match=r"needs layer with a stacked"):
        rms_norm(x, jnp.ones(64), eps=EPS, layer=0, interpret=True)


@pytest.mark.skipif(NATIVE, reason="the CPU-only check of what interpret mode skips")
def test_triton_lowering_reads_the_stacked_gain_in_place():
    """On the CPU, the Triton lowering itself (interpret mode skips it), off a power of two, with the stacked
    gain reaching the kernel whole: no slice of a layer before it."""
    traced = jax.jit(lambda x, g, i: rms_norm(x, g, eps=EPS, layer=i, interpret=False)).trace(
        jax.ShapeDtypeStruct((1, 576), jnp.bfloat16), jax.ShapeDtypeStruct((30, 576), jnp.bfloat16),
        jax.ShapeDtypeStruct((), jnp.int32))
    try:
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
    except RuntimeError as e:  # jax >= 0.11 asks for a GPU (its compute capability) to lower for one
        pytest.skip(f"this jax cannot lower for a GPU without one: {e}")
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "dynamic_slice" not in text and "gather" not in text
