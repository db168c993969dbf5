"""Attention under tensor parallelism for backends XLA cannot partition itself (the Pallas kernels).

On a (model=tp) mesh the KV pool is split over KV heads and q, k, v come out of their products split over
heads (`jinfer.runtime.sharding`). Plain `jnp` attention is partitioned by XLA from those shardings; a Pallas
kernel is one opaque call, which XLA would run on whole, gathered operands: the entire KV pool copied to
every device at every layer. `HeadShardedBackend` runs the wrapped backend's device half under `shard_map`
instead, each device on its own KV heads and the query heads of their groups (query heads are split into
contiguous runs of N / tp, which are whole groups of G = N / K when K divides by tp), with the step's
metadata replicated. Nothing crosses devices inside attention; the all-reduce after the output product
is the layer's as before.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jinfer.attention.backend import AttentionBackend, PagedMeta


@dataclasses.dataclass(frozen=True)
class HeadShardedBackend:
    """`inner` with its `attend` run per KV-head shard of `mesh`'s `axis`; the host half is inner's."""

    inner: AttentionBackend
    mesh: Mesh
    axis: str = "model"
    partitionable = True  # already split: nothing left for XLA to partition

    def step_metadata(self, query_start: np.ndarray, query_len: np.ndarray, num_tokens: int, width: int):
        return self.inner.step_metadata(query_start, query_len, num_tokens, width)

    def attend(self, q, k, v, k_pages, v_pages, layer, meta: PagedMeta, width: int):
        heads = P(None, self.axis)  # axis 1 is heads in all: q [T, N, H], k / v [T, K, H], pages [L, K, ...]

        def local(q, k, v, k_pages, v_pages, layer, meta):
            return self.inner.attend(q, k, v, k_pages, v_pages, layer, meta, width)

        return jax.shard_map(local, mesh=self.mesh, in_specs=(heads,) * 5 + (P(), P()),
                             out_specs=heads, check_vma=False)(q, k, v, k_pages, v_pages, layer, meta)


def shard_over_heads(backend: AttentionBackend, mesh: Mesh | None, num_kv_heads: int,
                     axis: str = "model") -> AttentionBackend:
    """`backend` as the runner should use it on `mesh`: wrapped in `HeadShardedBackend` where XLA cannot
    partition it and the KV heads split evenly over `axis` (else the pool is replicated, and so is attention)."""
    if mesh is None or getattr(backend, "partitionable", False):
        return backend
    tp = mesh.shape[axis]
    if tp == 1 or num_kv_heads % tp:
        return backend
    return HeadShardedBackend(backend, mesh, axis)
