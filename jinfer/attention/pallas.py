"""The Pallas attention backends: the ragged paged attention kernel on GPUs (Triton) and TPUs (Mosaic).
Both also run on the CPU in interpret mode, for tests."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jinfer.attention.backend import PagedMeta
from jinfer.kernels.paged_attention.kernel import BlockSizes, rope_decode_attention_triton
from jinfer.kernels.paged_attention.kernel_tpu import TPUBlockSizes
from jinfer.kernels.paged_attention.ops import ragged_paged_attention
from jinfer.kernels.paged_attention.query_layout import query_blocks
from jinfer.kernels.paged_attention.tuning import gpu_block_sizes, tpu_block_sizes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PallasMeta:
    """Per-step arrays of the Pallas backends (numpy on the host, traced in the step)."""

    blocks: tuple[jax.Array, ...]  # (blk_slot, blk_row0, blk_len, blk_qoff), each i32[NB] (NB: num_blocks)
    tok_block: jax.Array  # i32[T]: the query block holding each token's output
    tok_row: jax.Array  # i32[T]: its row within that block


@dataclasses.dataclass(frozen=True)
class PallasBackend:
    """The Pallas ragged paged attention kernel. Decode-only steps (width 1) use `decode` block sizes
    (context split over many programs); steps with prefill chunks use `prefill`. The block sizes' type
    picks the kernel (`ragged_paged_attention`)."""

    partitionable = False  # one opaque call: on a mesh the runner runs it per KV-head shard (`sharded.py`)
    rope_kv_kernel = True  # the Triton RoPE-and-write kernel, interpreted where this one is
    rope_decode = True  # decode steps rotate and write in the attention kernel itself (`rope_attend`)
    decode: BlockSizes = BlockSizes(block_q=4, pages_per_block=8, num_splits=8)
    prefill: BlockSizes = BlockSizes(block_q=16, pages_per_block=4, num_splits=1)
    interpret: bool = False

    def sizes(self, width: int) -> BlockSizes:
        return self.decode if width <= 1 else self.prefill

    def num_blocks(self, num_tokens: int, width: int, num_rows: int) -> int:
        if width <= 1:  # one query per row: one block per row that has a token
            return min(num_tokens, num_rows)
        return -(-num_tokens // self.sizes(width).block_q) + num_rows

    def step_metadata(self, query_start: np.ndarray, query_len: np.ndarray, num_tokens: int,
                      width: int) -> PallasMeta:
        blocks, (tok_block, tok_row) = query_blocks(query_start, query_len, self.sizes(width).block_q,
                                                    self.num_blocks(num_tokens, width, len(query_len)), num_tokens)
        return PallasMeta(blocks=blocks, tok_block=tok_block, tok_row=tok_row)

    def attend(self, q, k, v, k_pages, v_pages, layer, meta: PagedMeta[PallasMeta], width: int):
        del k, v  # the kernel reads this step's K/V from the pages
        num_tokens, num_rows = q.shape[0], meta.kv_len.shape[0]
        m = meta.backend
        return ragged_paged_attention(
            q, k_pages, v_pages, layer, meta.page_table, meta.kv_len, meta.query_len, m.blocks, m.tok_block,
            m.tok_row, num_blocks=self.num_blocks(num_tokens, width, num_rows), block_sizes=self.sizes(width),
            interpret=self.interpret)


    def rope_attend(self, qkv, inv_freq, k_pages, v_pages, layer, meta: PagedMeta[PallasMeta], width: int,
                    rows=None):
        """A decode step (width 1) from its fused, unrotated product qkv [T, N + 2K, H]: RoPE, the K/V write and
        attention in one kernel (`rope_decode_attention_triton`) -> (out [T, N, H], k_pages, v_pages).
        rows: None, or (x [T, D], eps): qkv is still to be scaled by the RMSNorm factor of x's rows."""
        if width > 1:
            raise ValueError(f"rope_attend takes decode steps (width 1), not width={width}")
        K = k_pages.shape[1]
        num_tokens, num_rows = qkv.shape[0], meta.kv_len.shape[0]
        m = meta.backend
        return rope_decode_attention_triton(
            qkv, inv_freq, meta.kv_slot, k_pages, v_pages, layer, meta.page_table, meta.kv_len, meta.query_len,
            m.blocks, m.tok_block, m.tok_row, None if rows is None else rows[0], num_heads=qkv.shape[1] - 2 * K,
            eps=None if rows is None else rows[1],
            num_blocks=self.num_blocks(num_tokens, width, num_rows), block_sizes=self.sizes(width),
            interpret=self.interpret)


@dataclasses.dataclass(frozen=True)
class TPUPallasBackend(PallasBackend):
    """The Pallas Mosaic TPU ragged paged attention kernel: the same query blocks as `PallasBackend`, but one
    program walks a block's whole context (no splits: a TPU has one or two large cores, not a hundred SMs)."""

    rope_kv_kernel = rope_decode = False  # Triton kernels: not for Mosaic TPU
    decode: TPUBlockSizes = TPUBlockSizes()
    prefill: TPUBlockSizes = TPUBlockSizes()


def pallas_backend(num_kv_heads: int, num_heads: int, max_slots: int, page_size: int,
                   interpret: bool = False) -> PallasBackend:
    decode, mixed = gpu_block_sizes(num_kv_heads, num_heads, max_slots, page_size)
    return PallasBackend(decode=decode, prefill=mixed, interpret=interpret)


def tpu_backend(page_size: int, interpret: bool = False) -> TPUPallasBackend:
    decode, mixed = tpu_block_sizes(page_size)
    return TPUPallasBackend(decode=decode, prefill=mixed, interpret=interpret)
