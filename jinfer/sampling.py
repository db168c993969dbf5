"""Token sampling on device, vectorized over rows with per-row parameters held in arrays.

One compiled function serves every combination of parameters (no recompile per request mix):
temperature 0 means greedy, top_k 0 means no top-k cut, top_p 1 means no nucleus cut. Each row draws
from its own key, so a seeded request samples the same tokens whatever else shares the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def sample(
    logits: jnp.ndarray,  # f32[B, V]
    temperature: jnp.ndarray,  # f32[B]
    top_k: jnp.ndarray,  # i32[B]
    top_p: jnp.ndarray,  # f32[B]
    keys: jnp.ndarray,  # key[B]: one typed PRNG key per row, already folded with the step
    min_p: jnp.ndarray | None = None,  # f32[B]; 0 = off
) -> jnp.ndarray:  # i32[B]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # An all-greedy batch skips the vocabulary sort entirely (a runtime branch, not a recompile).
    return jax.lax.cond(jnp.all(temperature <= 0), lambda: greedy,
                        lambda: _sample_random(logits, temperature, top_k, top_p, keys, min_p, greedy))


def _sample_random(logits, temperature, top_k, top_p, keys, min_p, greedy):
    V = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)  # descending
    rank = jnp.arange(V)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)[:, None]
    keep = rank < k
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    # Nucleus: keep a token if the mass strictly before it is below top_p (so the top token always stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = keep & (mass_before < top_p[:, None])
    if min_p is not None:
        # probs is sorted, so probs[:, :1] is each row's most likely token.
        keep = keep & (probs >= min_p[:, None] * probs[:, :1])
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.vmap(jax.random.categorical)(keys, masked)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def step_keys(seeds: jnp.ndarray, step: jnp.ndarray) -> jnp.ndarray:
    """seeds: u32[B], step: i32[B] (tokens generated so far by each row) -> key[B]."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, step)
