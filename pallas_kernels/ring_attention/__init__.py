"""Ring attention: exact attention over a sequence sharded across a mesh axis."""

from jinfer.kernels.ring_attention.ring import ring_attention, zigzag_order

__all__ = ["ring_attention", "zigzag_order"]
