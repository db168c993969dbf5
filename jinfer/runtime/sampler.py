"""Token sampling on device, vectorized over rows with per-row parameters held in arrays.

One compiled function serves every combination of parameters (no recompile per request mix):
temperature 0 means greedy, top_k 0 means no top-k cut, top_p 1 means no nucleus cut. Each row draws
from its own key, so a seeded request samples the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.runtime.branch import cond


def apply_penalties(
    logits: jnp.ndarray,  # f32[B, V]
    output_counts: jnp.ndarray,  # i32[B, V]: occurrences of each token among the generated ones
    prompt_mask: jnp.ndarray,  # bool[B, V]: the token occurs in the prompt
    repetition: jnp.ndarray,  # f32[B]; 1 = off
    presence: jnp.ndarray,  # f32[B]; 0 = off
    frequency: jnp.ndarray,  # f32[B]; 0 = off
) -> jnp.ndarray:
    """vLLM's order and semantics: repetition (over prompt and output), then presence and frequency."""
    seen = prompt_mask | (output_counts > 0)
    r = repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
    counts = output_counts.astype(logits.dtype)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def apply_token_mask(logits: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """logits f32[B, V], mask i32[B, ceil(V / 32)] (token t allowed iff bit t % 32 of word t // 32 is set):
    the disallowed tokens' logits become -inf."""
    B, V = logits.shape
    bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # i32[B, W, 32]
    return jnp.where(bits.reshape(B, -1)[:, :V] != 0, logits, -jnp.inf)


def ban_tokens(logits: jnp.ndarray, ids: jnp.ndarray, ban: jnp.ndarray) -> jnp.ndarray:
    """logits f32[B, V]; ids i32[B, M] (padded with -1); ban bool[B]: a banned row's ids get -inf (min_tokens
    keeps a row's stop tokens from being sampled)."""
    B, V = logits.shape
    cols = jnp.where((ids >= 0) & ban[:, None], ids, V)  # out of range: the scatter drops it
    return logits.at[jnp.arange(B)[:, None], cols].set(-jnp.inf, mode="drop")


def sample(
    logits: jnp.ndarray,  # f32[B, V]
    temperature: jnp.ndarray,  # f32[B]
    top_k: jnp.ndarray,  # i32[B]
    top_p: jnp.ndarray,  # f32[B]
    keys: jnp.ndarray,  # key[B]: one typed PRNG key per row, already folded with the step
    min_p: jnp.ndarray | None = None,  # f32[B]; 0 = off
    all_greedy: bool | None = None,  # known when compiling (True: every row greedy); None: decided at run time
) -> jnp.ndarray:  # i32[B]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # An all-greedy batch skips the vocabulary sort entirely (a runtime branch, not a recompile).
    return cond(jnp.all(temperature <= 0), lambda: greedy,
                lambda: _sample_random(logits, temperature, top_k, top_p, keys, min_p, greedy), known=all_greedy)


def _sample_random(logits, temperature, top_k, top_p, keys, min_p, greedy):
    choice = jax.vmap(jax.random.categorical)(keys, sampling_logits(logits, temperature, top_k, top_p, min_p))
    return jnp.where(temperature > 0, choice.astype(jnp.int32), greedy)


def sampling_logits(logits, temperature, top_k, top_p, min_p=None):
    """f32[B, V]: the distribution a row with temperature > 0 samples from, as logits (scaled by its
    temperature, -inf outside its top-k, nucleus and min-p cuts); softmax gives its probabilities."""
    # No vocabulary sort: the top-k and nucleus cuts are thresholds found by bisection (32 masked
    # reductions over the vocabulary each), which is far cheaper than a sort on every backend (an
    # XLA CPU sort of 8 x 49k logits took 0.2 s). Ties at a threshold are all kept.
    V = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    keep = _ordered_key(scaled) >= _kth_largest_key(scaled, k)[:, None]
    probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
    # Nucleus: keep a token if the mass of the tokens more likely than it is below top_p (the most likely
    # token always stays).
    keep = keep & (_ordered_key(probs) >= _nucleus_key(probs, top_p)[:, None])
    if min_p is not None:
        keep = keep & (probs >= min_p[:, None] * probs.max(axis=-1, keepdims=True))
    return jnp.where(keep, scaled, -jnp.inf)


def _ordered_key(x: jnp.ndarray) -> jnp.ndarray:
    """f32 -> u32 whose unsigned order is the float order (negative floats reversed under the sign bit)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _kth_largest_key(x: jnp.ndarray, k: jnp.ndarray) -> jnp.ndarray:
    """u32[B]: the ordered key of each row's k-th largest value (k: i32[B] in [1, V])."""
    keys = _ordered_key(x)

    def body(_, lohi):  # invariant: count(keys >= lo) >= k; the answer is in [lo, hi]
        lo, hi = lohi
        mid = lo + (hi - lo) // 2 + (hi > lo).astype(jnp.uint32)
        ok = (keys >= mid[:, None]).sum(-1) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    B = x.shape[0]
    lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.zeros(B, jnp.uint32), jnp.full(B, 0xFFFFFFFF, jnp.uint32)))
    return lo


def _nucleus_key(probs: jnp.ndarray, top_p: jnp.ndarray) -> jnp.ndarray:
    """u32[B]: the smallest ordered key T with mass(probs whose key > T) < top_p; tokens at or above it
    are the nucleus (those whose strictly-more-likely mass is below top_p)."""
    keys = _ordered_key(probs)

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = jnp.where(keys > mid[:, None], probs, 0).sum(-1) < top_p
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    B = probs.shape[0]
    one = _ordered_key(jnp.ones(B, jnp.float32))  # no probability exceeds 1, so T = key(1) qualifies
    lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.full(B, 0x80000000, jnp.uint32), one))
    return lo


def step_keys(seeds: jnp.ndarray, step: jnp.ndarray) -> jnp.ndarray:
    """seeds: u32[B], step: i32[B] (tokens generated so far by each row) -> key[B]."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, step)
