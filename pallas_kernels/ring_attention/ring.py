"""Ring attention (sequence parallel) with `shard_map`: each device keeps its query chunks and passes its
K/V chunks around the ring with `ppermute`, merging each visiting block into a running (output, lse)
with the flash kernel's log-sum-exp. The next block's transfer is issued before the current block is
computed, so XLA can overlap the two.

Causal load balance (zig-zag): the sequence is cut into 2n chunks and device i holds chunks i and
2n-1-i, so every device has the same amount of unmasked work. `zigzag_order(S, n)` gives the
permutation of positions to apply before sharding (and its inverse after).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as Ps

from jinfer.kernels.flash_attention import flash_attention


def zigzag_order(seq_len: int, n_devices: int) -> np.ndarray:
    """Positions in the order they are laid out across devices: [chunk 0, chunk 2n-1, chunk 1, chunk 2n-2, ...]."""
    if seq_len % (2 * n_devices):
        raise ValueError(f"{seq_len=} must be a multiple of 2 x {n_devices=} for the zig-zag layout")
    c = seq_len // (2 * n_devices)
    chunks = []
    for i in range(n_devices):
        chunks += [np.arange(i * c, (i + 1) * c), np.arange((2 * n_devices - 1 - i) * c, (2 * n_devices - i) * c)]
    return np.concatenate(chunks)


def _merge(o, lse, o_b, lse_b):
    """Two partial attentions over disjoint key sets -> one. o: [B, T, N, H], lse: [B, T, N]."""
    new = jnp.logaddexp(lse, lse_b)
    safe = jnp.where(new == -jnp.inf, 0.0, new)
    w_a = jnp.where(lse == -jnp.inf, 0.0, jnp.exp(lse - safe))[..., None]
    w_b = jnp.where(lse_b == -jnp.inf, 0.0, jnp.exp(lse_b - safe))[..., None]
    return w_a * o + w_b * o_b.astype(jnp.float32), new


def ring_attention(q, k, v, mesh: Mesh, axis: str, *, causal: bool = True, interpret: bool | None = None,
                   block_sizes=None):
    """q: [B, S, N, H], k, v: [B, S, K, H], sharded (or to be sharded) along S over `axis`.

    Causal inputs must already be in zig-zag order (`zigzag_order`); the output comes back in the same
    order. Non-causal inputs may be in any order.
    """
    n = mesh.shape[axis]
    S = q.shape[1]
    if S % (2 * n if causal else n):
        raise ValueError(f"sequence length {S} must divide into {2 * n if causal else n} chunks over {axis}={n}")
    spec = Ps(None, axis, None, None)
    fn = functools.partial(_ring_body, n=n, axis=axis, causal=causal, interpret=interpret, block_sizes=block_sizes)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def _ring_body(q, k, v, *, n, axis, causal, interpret, block_sizes):
    me = jax.lax.axis_index(axis)
    B, T, N, H = q.shape
    perm = [(i, (i + 1) % n) for i in range(n)]
    attend = functools.partial(flash_attention, interpret=interpret, block_sizes=block_sizes, return_lse=True)
    o = jnp.zeros((B, T, N, H), jnp.float32)
    lse = jnp.full((B, T, N), -jnp.inf, jnp.float32)
    c = T // 2  # zig-zag chunk length (causal only)

    def chunk_starts(dev):  # global start positions of the two chunks a device holds
        return dev * c, (2 * n - 1 - dev) * c

    for step in range(n):
        src = (me - step) % n  # whose K/V we hold at this step
        if step < n - 1:
            k_next, v_next = jax.lax.ppermute(k, axis, perm), jax.lax.ppermute(v, axis, perm)
        if not causal:
            o_b, lse_b = attend(q, k, v, causal=False)
            o, lse = _merge(o, lse, o_b, lse_b)
        else:
            q_starts, k_starts = chunk_starts(me), chunk_starts(src)
            parts_o, parts_lse = [], []
            for qi, qs in enumerate(q_starts):
                o_q, lse_q = o[:, qi * c:(qi + 1) * c], lse[:, qi * c:(qi + 1) * c]
                for ki, ks in enumerate(k_starts):
                    # Query chunk at global qs against key chunk at global ks: a causal mask with the
                    # query offset qs - ks (negative: the whole chunk is in the past of no query).
                    off = jnp.full((B,), qs - ks, jnp.int32)
                    o_b, lse_b = attend(q[:, qi * c:(qi + 1) * c], k[:, ki * c:(ki + 1) * c],
                                        v[:, ki * c:(ki + 1) * c], causal=True, q_offset=off)
                    o_q, lse_q = _merge(o_q, lse_q, o_b, lse_b)
                parts_o.append(o_q)
                parts_lse.append(lse_q)
            o, lse = jnp.concatenate(parts_o, axis=1), jnp.concatenate(parts_lse, axis=1)
        if step < n - 1:
            k, v = k_next, v_next
    return o.astype(q.dtype)
