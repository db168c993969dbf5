"""The Pallas gated activation of a folded norm (interpret mode on the CPU, native on a GPU) against its jnp
reference on fresh random rows: float32, bfloat16 and float16; widths D and F on and off a power of two and of
the block; one row and several; rows of very different scales (the factor differs row to row); the model's own
activation (`jinfer.models.layers.swiglu`) agreeing with both; and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.kernels.swiglu import swiglu, swiglu_reference
from jinfer.kernels.swiglu.kernel import SwigluBlockSizes
from jinfer.models.layers import swiglu as model_swiglu
from tests.kernels.test_rms_norm import INTERPRET, check  # the same per-dtype tolerances, relative to the row

EPS = 1e-5


def case(rng, rows, D, F, dtype):
    scale = rng.uniform(0.05, 20.0, size=(*rows, 1))
    x = jnp.asarray(rng.normal(size=(*rows, D)) * scale, dtype)
    gate_up = jnp.asarray(rng.normal(size=(*rows, 2 * F)) * scale * 2, dtype)
    return gate_up, x


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("D,F,block_f", [(64, 256, 64), (576, 1536, 1024), (96, 200, 64)])
@pytest.mark.parametrize("rows", [(1,), (2, 3)])
def test_matches_reference(dtype, D, F, block_f, rows):
    rng = np.random.default_rng(D + F + len(rows))
    gate_up, x = case(rng, rows, D, F, dtype)
    out = jax.jit(lambda g, x: swiglu(g, x, eps=EPS, block_sizes=SwigluBlockSizes(block_f=block_f),
                                      interpret=INTERPRET))(gate_up, x)
    ref = swiglu_reference(gate_up, x, EPS)
    check(out, ref, dtype)
    # The factor matters: without it the numbers are others.
    assert not np.allclose(np.asarray(ref, np.float32), np.asarray(model_swiglu(gate_up), np.float32), atol=0.1)


@pytest.mark.parametrize("rows", [4, 80])  # the default block sizes of decode rows, and of a prefill chunk
def test_the_models_activation_agrees(rows):
    rng = np.random.default_rng(rows)
    gate_up, x = case(rng, (1, rows), 576, 1536, jnp.float32)
    ref = swiglu_reference(gate_up, x, EPS)
    check(model_swiglu(gate_up, x, EPS), ref, jnp.float32)
    check(swiglu(gate_up, x, eps=EPS, interpret=INTERPRET), ref, jnp.float32)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_partial_products_are_summed(splits, dtype):
    """A split-K matmul's float32 partials [S, ..., 2F]: their sum's activation, in x's dtype."""
    rng = np.random.default_rng(splits)
    gate_up, x = case(rng, (2, 3), 96, 200, dtype)
    parts = jnp.asarray(rng.normal(size=(splits, *gate_up.shape)) * 3, jnp.float32)
    out = swiglu(parts, x, eps=EPS, block_sizes=SwigluBlockSizes(block_f=64), interpret=INTERPRET)
    assert out.dtype == dtype and out.shape == (2, 3, 200)
    check(out, swiglu_reference(parts.sum(axis=0), x, EPS).astype(dtype), dtype)


def test_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"gate_up \(3, 8\)"):
        swiglu(jnp.zeros((3, 8)), jnp.zeros((2, 4)), eps=EPS, interpret=True)
    with pytest.raises(ValueError, match=r"gate_up \(2, 3, 8\)"):
        swiglu(jnp.zeros((2, 3, 8)), jnp.zeros((2, 4)), eps=EPS, interpret=True)
    with pytest.raises(ValueError, match="block_f=48"):
        swiglu(jnp.zeros((2, 8)), jnp.zeros((2, 4)), eps=EPS, block_sizes=SwigluBlockSizes(block_f=48),
               interpret=True)
