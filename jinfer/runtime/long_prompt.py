"""Long prompts in the engine: prefilled by ring attention over a mesh axis, then decoded like any request.

`RingPrefill(params, config, mesh)` is a `prefill` for `Engine.add_request`. The engine calls it with every
prompt token but the last; it returns their K/V from `long_prefill.ring_prefill_kv` (the sequence split over
the mesh's `seq` axis, so no device holds a whole prompt's activations). The engine keeps the K/V until the
scheduler admits the request, writes them into the request's pages (`Runner.import_kv`), and the request's
first step computes only the last prompt token, whose logits give the first output token through the
engine's own sampler. Sampling, stop conditions, streaming and preemption are the engine's usual paths:

    ring = RingPrefill(params, model_config, sharding.make_mesh(seq=4), dtype=engine_config.dtype)
    request_id = engine.add_request(long_prompt, sampling, prefill=ring)

A preempted long request recomputes its prompt by ordinary chunked prefill (exact, only slower), and pages
holding ring-computed K/V are never offered to the prefix cache (see Scheduler.update).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jinfer.models.config import ModelConfig
from jinfer.runtime.long_prefill import ring_prefill_kv


class RingPrefill:
    """Computes a prompt prefix's K/V by ring attention over `axis` of `mesh` (the engine's PrefixPrefill).

    `params` are placed once, replicated over the mesh, in `dtype` (the engine's EngineConfig.dtype, so the
    K/V are what the engine itself would compute, up to rounding). The mesh may be other devices than the
    engine's: the K/V are copied onto the engine's devices when written into its pages.
    """

    def __init__(self, params, config: ModelConfig, mesh: Mesh, axis: str = "seq", *, dtype: str = "float32",
                 block_sizes=None, interpret: bool | None = None):
        if axis not in mesh.axis_names:
            raise ValueError(f"the mesh has no axis {axis!r} to ring over (its axes: {mesh.axis_names})")
        self.config, self.mesh, self.axis = config, mesh, axis
        self.block_sizes, self.interpret = block_sizes, interpret
        dtype = jnp.dtype(dtype)
        self.params = jax.device_put(jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype), params),
                                     NamedSharding(mesh, PartitionSpec()))

    def __call__(self, token_ids: list[int]) -> tuple[jax.Array, jax.Array]:
        """n token ids (positions 0..n-1) -> (k, v), each [L, m, K, H]: m = long_prefill.padded_length(n, ring
        size) >= n, rows past n padding (one compile per length bucket)."""
        return ring_prefill_kv(self.params, self.config, token_ids, self.mesh, self.axis, self.block_sizes,
                               self.interpret)
