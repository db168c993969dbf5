"""Building blocks shared by the Llama-family models: RMSNorm, the gated MLP activation and rotary position
embeddings."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.models.config import ModelConfig


def rms_norm(x: jnp.ndarray, weight: jnp.ndarray, eps: float, layer: jnp.ndarray | None = None) -> jnp.ndarray:
    """x: [..., D]; normalized in float32 (as HF does), cast back, then scaled by weight [D], or by layer
    `layer` (i32[]) of a stacked weight [L, D]."""
    if layer is not None:
        weight = weight[layer]
    x32 = x.astype(jnp.float32)
    normed = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))
    return weight * normed.astype(x.dtype)


def rms_factor(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """f32[...]: the RMSNorm factor of each row of x [..., D], 1 / sqrt(mean(x^2) + eps)."""
    x32 = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1) + eps)


def scale_rows(y: jnp.ndarray, x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """y [B, T, ...] times the RMSNorm factor of x [B, T, D] token by token, rounded once to y's dtype: the
    product of a norm whose gain was folded into its weights (`llama.fold_norms`) made the norm's product."""
    r = rms_factor(x, eps).reshape(*x.shape[:-1], *(1,) * (y.ndim - x.ndim + 1))
    return (y.astype(jnp.float32) * r).astype(y.dtype)


def swiglu(gate_up: jnp.ndarray, x: jnp.ndarray | None = None, eps: float = 0.0) -> jnp.ndarray:
    """silu(gate) * up of the fused product gate_up [..., 2F] -> [..., F]. With x [..., D], the product read
    x unnormalized (`llama.fold_norms`): gate and up are first scaled by x's RMSNorm factor, all in float32,
    rounded once."""
    gate, up = jnp.split(gate_up, 2, axis=-1)
    if x is None:
        return jax.nn.silu(gate) * up
    r = rms_factor(x, eps)[..., None]
    g, u = gate.astype(jnp.float32) * r, up.astype(jnp.float32) * r
    return (jax.nn.silu(g) * u).astype(gate_up.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """f32[head_dim // 2]: the rotary frequencies, with the checkpoint's context-extension scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    inv_freq = inv_freq.astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    if rs.kind == "linear":
        return (inv_freq / rs.factor).astype(np.float32)
    # llama3: long wavelengths are divided by the factor, short ones kept, the band between blended.
    old_len = rs.original_max_position_embeddings
    low_wavelen = old_len / rs.low_freq_factor
    high_wavelen = old_len / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
    """x: [B, T, N, H], positions: i32[B, T]. Rotates the two halves of H (HF's rotate_half layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    cos = jnp.cos(freqs).astype(x.dtype)[:, :, None, :]
    sin = jnp.sin(freqs).astype(x.dtype)[:, :, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
