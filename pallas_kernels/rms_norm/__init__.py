"""RMSNorm as one kernel: `rms_norm` (a Pallas kernel that reads a stacked gain in place) and
`rms_norm_reference` (jnp)."""

from jinfer.kernels.rms_norm.ops import rms_norm
from jinfer.kernels.rms_norm.reference import rms_norm_reference

__all__ = ["rms_norm", "rms_norm_reference"]
