"""On-device sampling against numpy-computed distributions, seeds, and SamplingParams validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.engine.stop_strings import StopStringMatcher
from jinfer.inputs import SamplingParams
from jinfer.runtime.sampler import sample, step_keys


def _draw(logits, temperature, top_k, top_p, n, seed=0):
    """n independent draws from one row of logits: the row repeated with distinct seeds."""
    B = n
    f = jax.jit(sample)
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (B, len(logits)))
    keys = step_keys(jnp.arange(B, dtype=jnp.uint32) + seed * B, jnp.zeros(B, jnp.int32))
    return np.asarray(f(rows, jnp.full(B, temperature), jnp.full(B, top_k, jnp.int32), jnp.full(B, top_p), keys))


def _expected(logits, temperature, top_k, top_p):
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[: top_k or len(z)]] = True
    p = np.where(keep, np.exp(z - z.max()), 0)
    p /= p.sum()
    ps = p[order]
    before = np.cumsum(ps) - ps
    nucleus = np.zeros(len(z), bool)
    nucleus[order[before < top_p]] = True
    p = np.where(keep & nucleus, p, 0)
    return p / p.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0),
                                                        (1.0, 0, 0.6), (1.3, 4, 0.8)])
def test_sampled_frequencies_follow_the_distribution(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=8) * 1.5
    want = _expected(logits, temperature, top_k, top_p)
    n = 20000
    got = np.bincount(_draw(logits, temperature, top_k, top_p, n), minlength=8) / n
    assert np.all(got[want == 0] == 0), (got, want)
    assert np.abs(got - want).max() < 0.015, (got, want)


def test_greedy_is_argmax_and_ignores_keys():
    logits = np.random.default_rng(1).normal(size=(5, 50)).astype(np.float32)
    keys = step_keys(jnp.arange(5, dtype=jnp.uint32), jnp.zeros(5, jnp.int32))
    got = sample(jnp.asarray(logits), jnp.zeros(5), jnp.zeros(5, jnp.int32), jnp.ones(5), keys)
    np.testing.assert_array_equal(got, logits.argmax(-1))


def test_a_row_samples_the_same_whatever_shares_the_batch():
    rng = np.random.default_rng(2)
    row = rng.normal(size=100).astype(np.float32)
    key = step_keys(jnp.array([7], jnp.uint32), jnp.array([3]))
    alone = sample(jnp.asarray(row[None]), jnp.ones(1), jnp.zeros(1, jnp.int32), jnp.ones(1), key)
    others = rng.normal(size=(3, 100)).astype(np.float32)
    batch = np.concatenate([others[:2], row[None], others[2:]])
    keys = step_keys(jnp.array([1, 2, 7, 9], jnp.uint32), jnp.array([0, 5, 3, 1]))
    mixed = sample(jnp.asarray(batch), jnp.ones(4), jnp.array([0, 2, 0, 5]), jnp.array([1, .5, 1, 1]), keys)
    assert int(mixed[2]) == int(alone[0])


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"), ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"seed": -1}, "seed"),
    ({"stop": [3]}, "stop"), ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"temperature": float("nan")}, "temperature"),
])
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_stop_string_split_across_deltas_is_not_emitted():
    m = StopStringMatcher(["</end>", "STOP"])
    out = "".join(m.feed(d) for d in ["Hello wor", "ld </e", "nd> more"])
    assert m.stopped and out == "Hello world "


def test_text_without_stop_is_emitted_whole():
    m = StopStringMatcher(["zzz"])
    out = "".join(m.feed(d) for d in ["ab", "cz", "z", "d"]) + m.flush()
    assert not m.stopped and out == "abczzd"
