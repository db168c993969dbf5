"""The gated MLP activation of a folded norm as one kernel: `swiglu` (a Pallas kernel that also reduces each row's
RMSNorm factor) and `swiglu_reference` (jnp)."""

from jinfer.kernels.swiglu.ops import swiglu
from jinfer.kernels.swiglu.reference import swiglu_reference

__all__ = ["swiglu", "swiglu_reference"]
