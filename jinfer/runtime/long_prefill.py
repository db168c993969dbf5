"""Long prompts: a prefill whose sequence is split over the mesh's `seq` axis, attention by ring attention.

A prompt too long for one device's activations is laid out in zig-zag order (so every device holds one
early and one late chunk and the causal work is balanced), sharded over `seq`, and run through the same
model function as always; only the attention callable differs: each layer's attention is
`pallas_kernels.ring_attention` (K/V blocks passed around the ring while the flash kernel works on the
current block). `ring_prefill` returns the logits of every position and every layer's K/V, both in natural
order; `ring_prefill_kv` returns the K/V alone (no [T, V] logits), which is what the engine takes:
`jinfer.runtime.long_prompt.RingPrefill` hands them to `Engine.add_request`, which writes them into the request's
KV pages so that decoding continues there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jinfer.kernels.ring_attention import ring_attention, zigzag_order
from jinfer.models import llama
from jinfer.models.config import ModelConfig
from jinfer.models.layers import apply_rope


def ring_prefill(params, config: ModelConfig, token_ids, mesh: Mesh, axis: str = "seq", block_sizes=None,
                 interpret: bool | None = None):
    """token_ids: T ints -> (logits f32[T, V], (k, v) each [L, T, K, H]); T is padded up to
    `padded_length(T, n)` internally (padding sits after the prompt, so causality hides it)."""
    natural, (logits, k, v) = _run(params, config, token_ids, mesh, axis, block_sizes, interpret, True)
    return logits[natural], (k[:, natural], v[:, natural])


def ring_prefill_kv(params, config: ModelConfig, token_ids, mesh: Mesh, axis: str = "seq", block_sizes=None,
                    interpret: bool | None = None):
    """token_ids: T ints -> (k, v) each [L, Tb, K, H] in natural order, Tb = `padded_length(T, n)` >= T (rows
    past T are padding); no logits are computed. Shapes depend on the bucket only, so a stream of prompts
    of any lengths compiles O(log max length) programs, none per length."""
    T = len(token_ids)
    _, out = _run(params, config, token_ids, mesh, axis, block_sizes, interpret, False)
    Tb = out[0].shape[1]
    return _to_natural(*out, np.argsort(zigzag_order(Tb, mesh.shape[axis])).astype(np.int32)) if T else out


@jax.jit
def _to_natural(k, v, natural):
    return k[:, natural], v[:, natural]


def padded_length(T: int, n: int) -> int:
    """The bucket a T-token prompt is padded to on an n-device ring: 2n x a power of two chunks (zig-zag
    needs a multiple of 2n; powers of two keep the set of compiled lengths small, at most 2x the work)."""
    units = -(-T // (2 * n))
    return 2 * n * (1 << (units - 1).bit_length())


def _run(params, config, token_ids, mesh, axis, block_sizes, interpret, with_logits):
    """-> (natural: i32[T], the zig-zag index of each natural position; the forward's outputs, zig-zag)."""
    T = len(token_ids)
    if T == 0:
        raise ValueError("token_ids is empty")
    if axis not in mesh.axis_names:
        raise ValueError(f"the mesh has no axis {axis!r} to ring over (its axes: {mesh.axis_names})")
    n = mesh.shape[axis]
    Tp = padded_length(T, n)
    order = zigzag_order(Tp, n)
    tokens = np.zeros(Tp, np.int32)
    tokens[:T] = token_ids
    seq = NamedSharding(mesh, PartitionSpec(None, axis))
    tokens = jax.device_put(tokens[order][None], seq)
    positions = jax.device_put(order[None].astype(np.int32), seq)
    out = _ring_forward(params, tokens, positions, config=config, mesh=mesh, axis=axis, block_sizes=block_sizes,
                        interpret=interpret, with_logits=with_logits)
    return np.argsort(order)[:T], out


@functools.partial(jax.jit, static_argnames=("config", "mesh", "axis", "block_sizes", "interpret", "with_logits"))
def _ring_forward(params, tokens, positions, *, config, mesh, axis, block_sizes, interpret, with_logits):
    c = config
    L, Tp = c.num_layers, tokens.shape[1]
    dtype = params["embed"].dtype

    def attention(q, k, v, k_all, v_all, layer, positions, meta, inv_freq):
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        out = ring_attention(q, k, v, mesh, axis, causal=True, block_sizes=block_sizes, interpret=interpret)
        return out, k_all.at[layer].set(k[0].astype(dtype)), v_all.at[layer].set(v[0].astype(dtype))

    kv_sharding = NamedSharding(mesh, PartitionSpec(None, axis))
    zeros = jax.lax.with_sharding_constraint(jnp.zeros((L, Tp, c.num_kv_heads, c.head_dim), dtype), kv_sharding)
    h, (k_all, v_all) = llama.forward(params, tokens, positions, (zeros, zeros), None, config=c,
                                      attention=attention)
    if not with_logits:
        return k_all, v_all
    return llama.logits_from_hidden(params, h, c)[0], k_all, v_all
