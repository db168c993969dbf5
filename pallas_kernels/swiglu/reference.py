"""The gated activation of a folded norm in plain jnp: the kernel's oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def swiglu_reference(gate_up: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """gate_up [..., 2F] (the gate's F outputs, then the up product's) of unnormalized rows x [..., D] ->
    silu(r * gate) * (r * up) [..., F], r = 1 / sqrt(mean(x^2) + eps) a row, all in float32, rounded once to
    gate_up's dtype."""
    F = gate_up.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    gate, up = gate_up[..., :F].astype(jnp.float32) * r, gate_up[..., F:].astype(jnp.float32) * r
    return (gate * jax.nn.sigmoid(gate) * up).astype(gate_up.dtype)
