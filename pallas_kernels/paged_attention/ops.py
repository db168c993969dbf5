"""The public ragged paged attention: the block sizes' type picks the kernel.

`BlockSizes` run the Triton kernel (`kernel.py`), `TPUBlockSizes` the Mosaic one (`kernel_tpu.py`): natively
where that kernel's platform is, interpreted elsewhere. Without block sizes, the kernel native to the platform
(`native_block_sizes`) runs with its defaults. The query blocks come from `query_layout.query_blocks` on the
host, once per step, so the call itself has static shapes.
"""

from __future__ import annotations

import jax

from jinfer.kernels.paged_attention.kernel import BlockSizes, ragged_paged_attention_triton
from jinfer.kernels.paged_attention.kernel_tpu import TPUBlockSizes, ragged_paged_attention_tpu


def native_block_sizes() -> type[BlockSizes] | type[TPUBlockSizes] | None:
    """The block-size type of the paged kernel that runs natively on this platform (BlockSizes on GPUs,
    TPUBlockSizes on TPUs), None where neither does: the one place the platform picks a paged kernel, read by
    `ragged_paged_attention`'s default and by the engine's `jinfer.attention.select.default_backend`."""
    return {"gpu": BlockSizes, "tpu": TPUBlockSizes}.get(jax.devices()[0].platform)


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
    block_sizes: BlockSizes | TPUBlockSizes | None = None,  # None: the platform's kernel (Triton off GPU/TPU)
    interpret: bool | None = None,  # None: natively on the kernel's platform, interpreted elsewhere
    sm_scale: float | None = None,
) -> jax.Array:  # [T, N, H]
    """Causal attention of each slot's queries (the last query_len[s] of its kv_len[s] tokens) to its K/V
    pages; the semantics of `ragged_paged_attention_reference`. Defaults suit mixed steps; decode-only steps
    run faster with `tuning.gpu_block_sizes(...)[0]` (context splits)."""
    native = native_block_sizes()
    if block_sizes is None:
        block_sizes = (native or BlockSizes)()
    if isinstance(block_sizes, TPUBlockSizes):
        kernel, kind = ragged_paged_attention_tpu, TPUBlockSizes
    elif isinstance(block_sizes, BlockSizes):
        kernel, kind = ragged_paged_attention_triton, BlockSizes
    else:
        raise ValueError(f"block_sizes must be BlockSizes (GPU kernel) or TPUBlockSizes (TPU kernel); "
                         f"got {block_sizes!r}")
    if interpret is None:
        interpret = kind is not native
    elif not interpret and kind is not native:
        raise ValueError(f"{type(block_sizes).__name__} names a kernel that cannot run natively on "
                         f"{jax.devices()[0].platform}; pass interpret=True")
    return kernel(q, k_pages, v_pages, layer, page_table, kv_len, query_len, blocks, tok_block, tok_row,
                  num_blocks=num_blocks, block_sizes=block_sizes, interpret=interpret, sm_scale=sm_scale)
