"""Block sizes of the ragged paged attention kernels, keyed by device and engine shape: (decode, mixed)
pairs, where decode sizes serve steps of one query per slot and mixed sizes steps with prefill chunks.

Figures behind the GPU entries: benchmarks/RESULTS.md (`python benchmarks/decode_tune.py` on the lent H100 and
H200).
"""

from __future__ import annotations

import jax
import numpy as np

from jinfer.kernels.paged_attention.kernel import BlockSizes
from jinfer.kernels.paged_attention.kernel_tpu import TPUBlockSizes

# Decode software-pipelining stages where a device kind (a substring of jax's `device_kind`) departs from the
# H100's rule below. H200, pages of 16 (`python benchmarks/decode_tune.py --page-size 16 --batch 64 128`): one
# stage read 3.68 TB/s at B64 ctx 4096 (two: 3.30) and 3.66 at B128 ctx 2048 (two: 3.29).
DECODE_STAGES = {"H200": 1}
# Device kinds whose decode steps run the fully visible steps unmasked (`BlockSizes.unmasked_steps`): none until
# `decode_tune.py` (which tries both) has timed it on a GPU.
DECODE_UNMASKED: dict[str, bool] = {}


def gpu_block_sizes(num_kv_heads: int, num_heads: int, max_slots: int, page_size: int,
                    device_kind: str | None = None) -> tuple[BlockSizes, BlockSizes]:
    """(decode, mixed) block sizes for an engine's shape on `device_kind` (default: the first device's)."""
    Gp = 1 << (num_heads // num_kv_heads - 1).bit_length()
    block_q = max(1, 16 // Gp)  # block_q x Gp rows >= 16, the matrix units' minimum
    # ~512 programs (about four per multiprocessor of an H100), even with few slots, and 64 keys per inner
    # step: the best of `python benchmarks/decode_tune.py` at batch 1, 8 and 64 (benchmarks/RESULTS.md).
    splits = int(np.clip(-(-512 // (max_slots * num_kv_heads)), 1, 64))
    splits = 1 << (splits.bit_length() - 1)  # a power of two: the combine kernel's tiles (Triton) need it
    # Cut that finely, a program sees a step or two of a 4k context: nothing to pipeline, and a second K/V
    # buffer per program leaves a wave of programs unresident (batch 1: 6.6 us a call with one stage, 8.5
    # with two). Longer shares (batch 8 and up) pipeline: two stages, 3% faster there.
    stages = 1 if splits >= 32 else 2
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    stages = next((n for kind, n in DECODE_STAGES.items() if kind in device_kind), stages)
    ppb = max(1, 64 // page_size)
    unmasked = next((u for kind, u in DECODE_UNMASKED.items() if kind in device_kind), False)
    decode = BlockSizes(block_q=block_q, pages_per_block=ppb, num_splits=splits, num_stages=stages,
                        unmasked_steps=unmasked)
    mixed = BlockSizes(block_q=max(block_q, 64 // Gp), pages_per_block=ppb, num_splits=1)
    return decode, mixed


def tpu_block_sizes(page_size: int) -> tuple[TPUBlockSizes, TPUBlockSizes]:
    # 256 keys per inner step (the kernel's default at pages of 16); decode blocks of 8 rows hold one query
    # each, mixed blocks 8 queries of a slot. Untuned: no TPU has run it yet.
    sizes = TPUBlockSizes(block_q=8, pages_per_block=max(1, 256 // page_size))
    return sizes, sizes
