"""Tuned block sizes of the flash attention kernels, keyed by device and shape.

Figures behind the entries: benchmarks/RESULTS.md (`python benchmarks/flash_hopper_tune.py` on the lent H100).
"""

from __future__ import annotations

import jax

from pallas_kernels.flash_attention.kernel_hopper import HopperBlockSizes


def is_hopper(device=None) -> bool:
    """wgmma and TMA exist on compute capability 9.x only (Blackwell has other tensor-core instructions)."""
    device = device or jax.devices()[0]
    if device.platform != "gpu":
        return False
    cc = str(getattr(device, "compute_capability", "") or "")
    return cc.split(".")[0] == "9" or any(n in device.device_kind for n in ("H100", "H200", "H800", "H20"))


def hopper_block_sizes(seq_k: int, return_lse: bool) -> HopperBlockSizes:
    # Persistent CTAs everywhere (H100, causal, 32/8 heads: 1.08x cuDNN at B16 S1024 against 0.92 without).
    # A third K/V stage pays from ~8k keys on (610 vs 569 TFLOP/s at 16k, equal at 4k, worse at 1k), and
    # needs the 512 bytes of shared memory the lse tile would take.
    # Shorter sequences take two stages and prefetch each warpgroup's next query tile instead (its second
    # buffer needs the third stage's shared memory, and the lse tile's at head dim 128): 1.07x at B16 S1024,
    # 1.01x at B4 S4096, level at 16k, against two stages without it.
    stages = 3 if seq_k >= 8192 and not return_lse else 2
    return HopperBlockSizes(num_stages=stages, persistent=True, prefetch_q=stages == 2 and not return_lse)
