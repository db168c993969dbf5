"""The public flash attention: validates inputs, picks the kernel and its block sizes.

Dispatch: on a TPU, the Mosaic TPU kernel (`kernel_tpu.py`; its tests run it in TPU interpret mode). On a
Hopper GPU, the Mosaic GPU kernel (`kernel_hopper.py`, wgmma + TMA) wherever its fast path applies;
otherwise the Triton-lowered kernel (`kernel.py`), which covers every option, natively on GPUs and in
interpret mode on the CPU (where Pallas has no native GPU lowering).
"""

from __future__ import annotations

import jax

from jinfer.kernels.flash_attention import kernel_hopper, kernel_tpu
from jinfer.kernels.flash_attention.kernel import BlockSizes, flash_attention_pallas
from jinfer.kernels.flash_attention.tuning import hopper_block_sizes, is_hopper
from jinfer.kernels.flash_attention.validate import check_inputs


def default_block_sizes(head_dim: int, group: int) -> BlockSizes:
    gp = 1 << (group - 1).bit_length()
    # ~128 rows of queries per program; fewer keys per step for wide heads (shared memory).
    return BlockSizes(block_q=max(1, 128 // gp), block_k=64 if head_dim <= 128 else 32)


def flash_attention(q, k, v, *, causal: bool = True, q_offset=None, q_segment_ids=None, kv_segment_ids=None,
                    window: int | None = None, softcap: float | None = None, sm_scale: float | None = None,
                    block_sizes: BlockSizes | kernel_tpu.TPUBlockSizes | None = None, interpret: bool | None = None,
                    return_lse: bool = False):
    """q: [B, Sq, N, H]; k, v: [B, Sk, K, H]; q_offset: i32[B] (query i sits at q_offset + i);
    segment ids: i32[B, Sq] and i32[B, Sk] (a query sees keys of its own segment only).
    With return_lse, also the log-sum-exp of each query's scores, f32[B, Sq, N] (-inf if it saw no key)."""
    check_inputs(q, k, v, q_offset, q_segment_ids, kv_segment_ids, window, softcap)
    B, Sq, N, H = q.shape
    K = k.shape[2]
    if H not in (64, 128, 256) and not (interpret or jax.devices()[0].platform == "cpu"):
        raise ValueError(f"head_dim={H} is not one of 64, 128, 256")
    scale = H ** -0.5 if sm_scale is None else sm_scale
    platform = jax.devices()[0].platform
    # The TPU kernel on a TPU, or anywhere when asked for by its block sizes (interpreted off the TPU).
    if platform == "tpu" or isinstance(block_sizes, kernel_tpu.TPUBlockSizes):
        if block_sizes is not None and not isinstance(block_sizes, kernel_tpu.TPUBlockSizes):
            raise ValueError(f"on a TPU, block_sizes must be TPUBlockSizes; got {block_sizes!r}")
        out, lse = kernel_tpu.flash_attention_tpu(
            q, k, v, q_offset, q_segment_ids, kv_segment_ids, causal=causal, window=window, softcap=softcap,
            sm_scale=scale, block_sizes=block_sizes or kernel_tpu.TPUBlockSizes(),
            interpret=platform != "tpu" if interpret is None else interpret)
        return (out, lse) if return_lse else out
    if block_sizes is None and not interpret and is_hopper():
        hb = hopper_block_sizes(k.shape[1], return_lse)
        if kernel_hopper.supported(q, k, causal=causal, q_offset=q_offset, q_segment_ids=q_segment_ids,
                                   window=window, softcap=softcap, block_sizes=hb) is None:
            return kernel_hopper.flash_attention_hopper(q, k, v, causal=causal, sm_scale=scale, block_sizes=hb,
                                                        return_lse=return_lse)
    bs = block_sizes or default_block_sizes(H, N // K)
    gp = 1 << (N // K - 1).bit_length()
    if bs.block_q * gp < 16:
        raise ValueError(f"block_q={bs.block_q} x padded group {gp} must give at least 16 rows")
    if interpret is None:
        interpret = jax.devices()[0].platform != "gpu"
    out, lse = flash_attention_pallas(q, k, v, q_offset, q_segment_ids, kv_segment_ids, causal=causal,
                                      window=window, softcap=softcap, sm_scale=sm_scale, block_sizes=bs,
                                      interpret=interpret)
    return (out, lse) if return_lse else out
