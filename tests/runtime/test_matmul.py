"""The runtime's matmul choice: the model's forward with quantized weights read by the Pallas kernel (interpret
mode here; stacked layers through LayerSlice, per-layer weights as they are) equals the forward through XLA's
dequantize-then-dot, and the kernel takes only the decode-sized products."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.models import llama
from jinfer.models.attention import dense_cache_attention, dense_kv_cache
from jinfer.quant.params import quantize_params
from jinfer.quant.qtensor import qeinsum
from jinfer.runtime.matmul import KERNEL_MAX_ROWS, kernel_matmul, model_matmul
from jinfer.testing.tiny import TINY, tiny_params

KERNEL = functools.partial(kernel_matmul, interpret=True)


def forward(params, T: int, matmul, seed: int = 0):
    c = TINY
    tokens = jax.random.randint(jax.random.key(seed), (1, T), 0, c.vocab_size)
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    cache = dense_kv_cache(c.num_layers, 1, T, c.num_kv_heads, c.head_dim, jnp.float32)
    fn = functools.partial(llama.forward, config=c, attention=dense_cache_attention, matmul=matmul)
    return fn(params, tokens, positions, cache, None)[0], jax.make_jaxpr(fn)(params, tokens, positions, cache, None)


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32), ("fp8", None)])
@pytest.mark.parametrize("stacked", [True, False])
def test_kernel_forward_equals_xla(fmt, group, stacked):
    params = quantize_params(tiny_params(1), llama.MATMUL_INPUT_AXES, fmt, group)
    if not stacked:
        params = llama.unstack_layers(params)
    T = 1 if stacked else 5
    ours, jaxpr = forward(params, T, KERNEL, seed=T)
    ref, _ = forward(params, T, qeinsum, seed=T)
    assert "pallas_call" in str(jaxpr)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_prefill_sized_products_stay_on_xla():
    params = quantize_params(tiny_params(2), llama.MATMUL_INPUT_AXES, "int8")
    T = KERNEL_MAX_ROWS + 1
    ours, jaxpr = forward(params, T, KERNEL)
    ref, _ = forward(params, T, qeinsum)
    assert "pallas_call" not in str(jaxpr)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_float_weights_never_reach_the_kernel():
    _, jaxpr = forward(tiny_params(3), 3, KERNEL)
    assert "pallas_call" not in str(jaxpr)


def test_model_matmul_by_platform():
    assert model_matmul("cpu", 1) is qeinsum
    assert model_matmul("gpu", 1) is kernel_matmul
    assert model_matmul("gpu", 2) is qeinsum  # a sharded weight stays on XLA, which partitions it
