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
from jinfer.quant.qtensor import is_qtensor, qeinsum
from jinfer.runtime.matmul import KERNEL_MAX_ROWS, kernel_layout, kernel_matmul
from jinfer.testing.tiny import TINY, tiny_params

KERNEL = functools.partial(kernel_matmul, interpret=True)


def forward(params, T: int, matmul, seed: int = 0):
    c = TINY
    tokens = jax.random.randint(jax.random.key(seed), (1, T), 0, c.vocab_size)
    positions = jnp.arange(T, dtype=jnp.int32)[None]
    cache = dense_kv_cache(c.num_layers, 1, T, c.num_kv_heads, c.head_dim, jnp.float32)
    fn = functools.partial(llama.forward, config=c, attention=dense_cache_attention,
                           ops=llama.ModelOps(matmul=matmul))
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


@pytest.mark.parametrize("T", [1, KERNEL_MAX_ROWS + 1])
@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int8", None)])
def test_out_in_forward_equals_xla(T, fmt, group):
    """Weights converted to the kernel's "out_in" layout (`kernel_layout`): a decode-sized forward through the
    kernel and a prefill-sized one (XLA reading the new layout) equal the forward on the importers' layout."""
    params = quantize_params(tiny_params(4), llama.MATMUL_INPUT_AXES, fmt, group)
    out_in = kernel_layout(params, "any device", formats=(fmt,))
    converted = [w for w in jax.tree_util.tree_leaves(out_in, is_leaf=is_qtensor) if is_qtensor(w)]
    assert converted and all(w.layout == "out_in" for w in converted)
    ours, jaxpr = forward(out_in, T, KERNEL, seed=T)
    ref, _ = forward(params, T, qeinsum, seed=T)
    assert ("pallas_call" in str(jaxpr)) == (T <= KERNEL_MAX_ROWS)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=2e-5, atol=2e-5)


def test_kernel_layout_converts_only_int4_where_the_table_says(monkeypatch):
    from jinfer.kernels.quant_matmul import tuning

    params = quantize_params(tiny_params(5), {"w_down": 1}, "int8")
    params = quantize_params(params, llama.MATMUL_INPUT_AXES, "int4", 32)
    monkeypatch.setattr(tuning, "OUT_IN_FORMATS", {"H200": ("int4",)})
    assert kernel_layout(params, "NVIDIA H100 80GB HBM3") is params
    out_in = kernel_layout(params, "NVIDIA H200")
    assert out_in["layers"]["w_down"].layout == "in_out" and out_in["layers"]["w_down"].fmt == "int8"
    assert out_in["layers"]["wo"].layout == "out_in"
    assert out_in["embed"] is params["embed"]
