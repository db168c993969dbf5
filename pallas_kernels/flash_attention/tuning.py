"""Tuned block sizes of the flash attention kernels, keyed by device and shape.

Figures behind the entries: benchmarks/RESULTS.md (`python benchmarks/flash_hopper_tune.py` on the lent H100).
"""

from __future__ import annotations

import jax

from pallas_kernels.flash_attention.kernel_hopper import HopperBlockSizes


def is_hopper(device=None) -> bool:
    """wgmma and TMA exist on compute capability 9.0 only (Blackwell has other tensor-core instructions)."""
    device = device or jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")) == "9.0"


def hopper_block_sizes(seq_k: int, return_lse: bool) -> HopperBlockSizes:
    # A third K/V stage pays from ~4k keys on (H100: 609 vs 588 TFLOP/s at 16k, equal at 1k), but it needs
    # the 512 bytes of shared memory that the lse tile would take.
    if seq_k >= 2048 and not return_lse:
        return HopperBlockSizes(num_stages=3)
    return HopperBlockSizes(num_stages=2)
