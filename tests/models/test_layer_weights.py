"""`llama.unstack_layers`: the same decoder whether each layer's weights are slices of stacked arrays (scanned)
or arrays of their own (reached through a switch on the layer index), for every leaf the model has."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.models import llama
from jinfer.models.attention import dense_cache_attention, dense_kv_cache
from jinfer.testing.tiny import TINY


@pytest.mark.parametrize("bias", [False, True])
def test_per_layer_weights_give_the_stacked_forward(bias):
    config = dataclasses.replace(TINY, num_layers=3, attention_bias=bias)
    params = llama.init_params(config, jax.random.key(7))
    per_layer = llama.unstack_layers(params)
    assert len(per_layer["layers"]) == 3 and set(per_layer["layers"][0]) == set(params["layers"])
    np.testing.assert_array_equal(per_layer["layers"][2]["w_up"], params["layers"]["w_up"][2])

    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 9)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    cache = dense_kv_cache(config.num_layers, 2, 16, config.num_kv_heads, config.head_dim, jnp.float32)

    @jax.jit
    def run(p):
        return llama.forward(p, tokens, positions, cache, None, config=config, attention=dense_cache_attention)

    (h_want, kv_want), (h_got, kv_got) = run(params), run(per_layer)
    np.testing.assert_allclose(h_got, h_want, rtol=1e-6, atol=1e-6)
    for got, want in zip(kv_got, kv_want):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # A wrong layer's weights anywhere would move the output far more than rounding does.
    swapped = {**per_layer, "layers": per_layer["layers"][::-1]}
    assert not np.allclose(run(swapped)[0], h_want, atol=1e-3)
