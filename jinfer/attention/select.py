"""The engine's attention backend for the platform: the one place in the engine that chooses by platform.

The Pallas Triton kernel on GPUs, the Pallas Mosaic kernel on TPUs, the blocked `jnp` attention elsewhere.
Which paged kernel is native where is `native_block_sizes` (the kernel package's own default reads it too).
The plain `jnp` reference (`jinfer.kernels.paged_attention.reference`) is the tests' oracle, not a backend.
"""

from __future__ import annotations

from jinfer.attention.backend import AttentionBackend
from jinfer.attention.blocked import BlockedBackend
from jinfer.attention.pallas import pallas_backend, tpu_backend
from jinfer.kernels.paged_attention.kernel import BlockSizes
from jinfer.kernels.paged_attention.kernel_tpu import TPUBlockSizes
from jinfer.kernels.paged_attention.ops import native_block_sizes


def default_backend(num_kv_heads: int, num_heads: int, max_slots: int, page_size: int) -> AttentionBackend:
    native = native_block_sizes()
    if native is TPUBlockSizes:
        return tpu_backend(page_size)
    if native is BlockSizes:
        return pallas_backend(num_kv_heads, num_heads, max_slots, page_size)
    return BlockedBackend()
