"""Ring attention: exact attention over a sequence sharded across a mesh axis."""

from pallas_kernels.ring_attention.ring import ring_attention, zigzag_order

__all__ = ["ring_attention", "zigzag_order"]
