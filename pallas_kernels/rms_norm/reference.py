"""RMSNorm in plain jnp, as the model computes it (`jinfer.models.layers.rms_norm`): the kernel's oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm_reference(x: jax.Array, gain: jax.Array, eps: float) -> jax.Array:
    """x [..., D] normalized in float32, cast back to x's dtype, then times gain [D] (in their common dtype)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return gain * normed.astype(x.dtype)
