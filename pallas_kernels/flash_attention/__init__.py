"""Flash attention for prefill: `flash_attention` (Pallas kernel) and `flash_attention_reference` (jnp)."""

from jinfer.kernels.flash_attention.ops import flash_attention
from jinfer.kernels.flash_attention.reference import flash_attention_reference

__all__ = ["flash_attention", "flash_attention_reference"]
