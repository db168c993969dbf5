"""`llama.fuse_projections`: the decoder with wq/wk/wv and w_gate/w_up each concatenated into one product gives
the unfused forward (stacked and per-layer, with and without attention bias, quantized after fusing, and
quantized leaves fused alike), and leaves unlike quantized leaves apart."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.models import llama
from jinfer.models.attention import dense_cache_attention, dense_kv_cache
from jinfer.quant.params import quantize_params
from jinfer.quant.qtensor import dequantize, is_qtensor
from jinfer.runtime.matmul import kernel_matmul
from jinfer.testing.tiny import TINY


def _run(config, params, T=7, matmul=None):
    rng = np.random.default_rng(T)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, T)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T))
    cache = dense_kv_cache(config.num_layers, 2, 16, config.num_kv_heads, config.head_dim, jnp.float32)
    kw = {} if matmul is None else {"ops": llama.ModelOps(matmul=matmul)}
    return jax.jit(functools.partial(llama.forward, config=config, attention=dense_cache_attention, **kw))(
        params, tokens, positions, cache, None)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("stacked", [True, False])
def test_fused_forward_equals_the_unfused(bias, stacked):
    config = dataclasses.replace(TINY, num_layers=3, num_heads=6, num_kv_heads=2, attention_bias=bias)
    params = llama.init_params(config, jax.random.key(11))
    fused = llama.fuse_projections(params)
    layers = fused["layers"]
    assert {"wqkv", "w_gate_up"} <= set(layers) and not {"wq", "wk", "wv", "w_gate", "w_up"} & set(layers)
    N, K, H, F = config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size
    assert layers["wqkv"].shape == (3, config.hidden_size, N + 2 * K, H)
    assert layers["w_gate_up"].shape == (3, config.hidden_size, 2 * F)
    if not stacked:
        params, fused = llama.unstack_layers(params), llama.unstack_layers(fused)
    (h_want, kv_want), (h_got, kv_got) = _run(config, params), _run(config, fused)
    np.testing.assert_allclose(h_got, h_want, rtol=1e-5, atol=1e-5)
    for got, want in zip(kv_got, kv_want):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if stacked:  # a split that took K's heads from the wrong place would move the output far beyond rounding
        moved = {**fused, "layers": {**fused["layers"], "wqkv": jnp.roll(fused["layers"]["wqkv"], 1, axis=2)}}
        assert not np.allclose(_run(config, moved)[0], h_want, atol=1e-3)


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32)])
def test_quantized_after_fusing_equals_quantized_unfused(fmt, group):
    params = llama.init_params(TINY, jax.random.key(5))
    q = quantize_params(params, llama.MATMUL_INPUT_AXES, fmt, group)
    qf = quantize_params(llama.fuse_projections(params), llama.MATMUL_INPUT_AXES | llama.FUSED_INPUT_AXES, fmt, group)
    assert is_qtensor(qf["layers"]["wqkv"]) and is_qtensor(qf["layers"]["w_gate_up"])
    want = _run(TINY, q, T=1)[0]
    np.testing.assert_allclose(_run(TINY, qf, T=1)[0], want, rtol=1e-5, atol=1e-5)
    # The fused quantized products through the decode kernel (interpret mode), as the GPU runs them.
    got = _run(TINY, qf, T=1, matmul=functools.partial(kernel_matmul, interpret=True))[0]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int8", None), ("fp8", None)])
def test_quantized_leaves_fuse_keeping_their_numbers(fmt, group):
    """Leaves quantized apart (as a checkpoint stores them) fuse into one QTensor each whose outputs hold the
    same stored numbers, and the forward equals the unfused one, through XLA and the decode kernel."""
    q = quantize_params(llama.init_params(TINY, jax.random.key(2)), llama.MATMUL_INPUT_AXES, fmt, group)
    layers = llama.fuse_projections(q)["layers"]
    assert is_qtensor(layers["wqkv"]) and is_qtensor(layers["w_gate_up"]) and "wq" not in layers
    N, K = TINY.num_heads, TINY.num_kv_heads
    np.testing.assert_array_equal(np.asarray(dequantize(layers["wqkv"]))[:, :, N:N + K],
                                  np.asarray(dequantize(q["layers"]["wk"])))
    np.testing.assert_array_equal(np.asarray(dequantize(layers["w_gate_up"]))[..., TINY.intermediate_size:],
                                  np.asarray(dequantize(q["layers"]["w_up"])))
    fused = llama.fuse_projections(q)
    want = _run(TINY, q, T=3)[0]
    np.testing.assert_allclose(_run(TINY, fused, T=3)[0], want, rtol=1e-5, atol=1e-5)
    got = _run(TINY, fused, T=1, matmul=functools.partial(kernel_matmul, interpret=True))[0]
    np.testing.assert_allclose(got, _run(TINY, q, T=1)[0], rtol=2e-5, atol=2e-5)


def test_unlike_quantized_leaves_stay_apart():
    """A mix of formats (a GGUF file may store wv finer than wq), per-input scales that differ (AWQ), or float
    beside quantized: those products stay separate."""
    params = llama.init_params(TINY, jax.random.key(3))
    mixed = quantize_params(quantize_params(params, {"wv": 1, "w_up": 1}, "int8"), llama.MATMUL_INPUT_AXES, "int4", 32)
    layers = llama.fuse_projections(mixed)["layers"]
    assert "wqkv" not in layers and "w_gate_up" not in layers and layers["wv"].fmt == "int8"
    q = quantize_params(params, llama.MATMUL_INPUT_AXES, "int8")
    scaled = dataclasses.replace(q["layers"]["wk"], input_scale=jnp.full(q["layers"]["wk"].shape[:2], 2.0))
    layers = llama.fuse_projections({**q, "layers": {**q["layers"], "wk": scaled}})["layers"]
    assert "wqkv" not in layers and "w_gate_up" in layers
    half = quantize_params(params, {"w_gate": 1}, "int8")
    assert "w_gate_up" not in llama.fuse_projections(half)["layers"]
