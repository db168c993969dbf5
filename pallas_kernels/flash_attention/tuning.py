"""Tuned block sizes of the flash attention kernels, keyed by device and shape.

Figures behind the entries: benchmarks/RESULTS.md (`python benchmarks/flash_hopper_tune.py` on the lent H100).
"""

from __future__ import annotations

import jax

from jinfer.kernels.flash_attention.kernel_hopper import HopperBlockSizes


def is_hopper(device=None) -> bool:
    """wgmma and TMA exist on compute capability 9.x only (Blackwell has other tensor-core instructions)."""
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return False
    cc = str(getattr(device, "compute_capability", "") or "")
    return cc.split(".")[0] == "9" or any(n in device.device_kind for n in ("H100", "H200", "H800", "H20"))


def hopper_block_sizes(seq_k: int, return_lse: bool) -> HopperBlockSizes:
    # H100, causal, 32/8 heads, device time against cuDNN (`python benchmarks/flash_hopper_tune.py
    # --device-time`, benchmarks/RESULTS.md). Below 8k keys: persistent CTAs (one per SM, round-robin over
    # tiles; B16 S1024 1.13x against 0.98x without) that prefetch each warpgroup's next query tile
    # (1.21x at B16 S1024, 1.07x at B4 S4096); the second query buffer takes the shared memory of the lse
    # tile at head dim 128, so not with lse. From 8k keys on, causal tiles differ up to a hundredfold in
    # work, and the hardware's dynamic CTA scheduler balances them better than a fixed round-robin:
    # one CTA per tile, 1.02x at B1 S16384 against 1.00x persistent (two or three stages alike).
    if seq_k >= 8192:
        return HopperBlockSizes(num_stages=2, persistent=False)
    return HopperBlockSizes(num_stages=2, persistent=True, prefetch_q=not return_lse)
