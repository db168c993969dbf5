"""`llama.unstack_layers`: the same decoder whether each layer's weights are slices of stacked arrays (scanned)
or arrays of their own (reached through a switch on the layer index, or run unrolled with
`ModelOps(unroll=True)`), for every leaf the model has, every layer or an early exit's first few."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.models import llama
from jinfer.models.attention import dense_cache_attention, dense_kv_cache
from jinfer.testing.tiny import TINY


@pytest.mark.parametrize("unroll", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_per_layer_weights_give_the_stacked_forward(bias, unroll):
    config = dataclasses.replace(TINY, num_layers=3, attention_bias=bias)
    params = llama.init_params(config, jax.random.key(7))
    per_layer = llama.unstack_layers(params)
    assert len(per_layer["layers"]) == 3 and set(per_layer["layers"][0]) == set(params["layers"])
    np.testing.assert_array_equal(per_layer["layers"][2]["w_up"], params["layers"]["w_up"][2])

    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 9)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    cache = dense_kv_cache(config.num_layers, 2, 16, config.num_kv_heads, config.head_dim, jnp.float32)

    @functools.partial(jax.jit, static_argnames=("unroll", "n"))
    def run(p, unroll=False, n=None):
        return llama.forward(p, tokens, positions, cache, None, config=config, attention=dense_cache_attention,
                             num_layers=n, ops=llama.ModelOps(unroll=unroll))

    (h_want, kv_want), (h_got, kv_got) = run(params), run(per_layer, unroll)
    scan = jax.make_jaxpr(functools.partial(run, unroll=unroll))(per_layer).jaxpr
    assert ("scan" in str(scan)) != unroll  # unrolled: no loop at all
    np.testing.assert_allclose(h_got, h_want, rtol=1e-6, atol=1e-6)
    for got, want in zip(kv_got, kv_want):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # A wrong layer's weights anywhere would move the output far more than rounding does.
    swapped = {**per_layer, "layers": per_layer["layers"][::-1]}
    assert not np.allclose(run(swapped, unroll)[0], h_want, atol=1e-3)
    # An early exit (the draft of speculative decoding) runs the first layers only and writes only their K/V.
    (h2_want, kv2_want), (h2_got, kv2_got) = run(params, n=2), run(per_layer, unroll, n=2)
    np.testing.assert_allclose(h2_got, h2_want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(kv2_got[0][2], cache[0][2])
    np.testing.assert_allclose(kv2_got[0], kv2_want[0], rtol=1e-6, atol=1e-6)
