"""The public ragged paged attention: picks the kernel for the platform (or for the block sizes given).

The Triton kernel (`kernel.py`) on GPUs, the Mosaic kernel (`kernel_tpu.py`) on TPUs; off both, whichever
the block sizes name, in its interpret mode (the Triton one by default). The query blocks come from
`kernel.query_blocks` on the host, once per step, so the call itself has static shapes.
"""

from __future__ import annotations

import jax

from jinfer.kernels.paged_attention.kernel import BlockSizes, ragged_paged_attention_blocks
from jinfer.kernels.paged_attention.kernel_tpu import TPUBlockSizes, ragged_paged_attention_tpu


def ragged_paged_attention(
    q: jax.Array,  # [T, N, H]
    k_pages: jax.Array,  # [L, K, P, page_size, H]
    v_pages: jax.Array,
    layer: jax.Array,  # i32[]
    page_table: jax.Array,  # i32[S, max_pages]
    kv_len: jax.Array,  # i32[S]
    query_len: jax.Array,  # i32[S]
    blocks: tuple[jax.Array, ...],  # (blk_slot, blk_row0, blk_len, blk_qoff), each i32[num_blocks]
    tok_block: jax.Array,  # i32[T]
    tok_row: jax.Array,  # i32[T]
    *,
    num_blocks: int,
    block_sizes: BlockSizes | TPUBlockSizes | None = None,  # None: the platform's kernel, its defaults
    interpret: bool | None = None,  # None: natively on GPU/TPU, interpreted elsewhere
    sm_scale: float | None = None,
) -> jax.Array:  # [T, N, H]
    """Causal attention of each slot's queries (the last query_len[s] of its kv_len[s] tokens) to its K/V
    pages; the semantics of `ragged_paged_attention_reference`. Defaults suit mixed steps; decode-only steps
    run faster with `tuning.gpu_block_sizes(...)[0]` (context splits)."""
    platform = jax.devices()[0].platform
    if block_sizes is None:
        block_sizes = TPUBlockSizes() if platform == "tpu" else BlockSizes()
    if isinstance(block_sizes, TPUBlockSizes):
        kernel, native = ragged_paged_attention_tpu, platform == "tpu"
    elif isinstance(block_sizes, BlockSizes):
        kernel, native = ragged_paged_attention_blocks, platform == "gpu"
    else:
        raise ValueError(f"block_sizes must be BlockSizes (GPU kernel) or TPUBlockSizes (TPU kernel); "
                         f"got {block_sizes!r}")
    if interpret is None:
        interpret = not native
    elif not interpret and not native:
        raise ValueError(f"{type(block_sizes).__name__} names a kernel that cannot run natively on {platform}; "
                         f"pass interpret=True")
    return kernel(q, k_pages, v_pages, layer, page_table, kv_len, query_len, blocks, tok_block, tok_row,
                  num_blocks=num_blocks, block_sizes=block_sizes, interpret=interpret, sm_scale=sm_scale)
