"""RoPE and the K/V page write of one step in one kernel: `rope_and_store` (Pallas) and
`rope_and_store_reference` (jnp)."""

from jinfer.kernels.rope_kv.ops import rope_and_store
from jinfer.kernels.rope_kv.reference import rope_and_store_reference, rotate

__all__ = ["rope_and_store", "rope_and_store_reference", "rotate"]
