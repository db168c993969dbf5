"""The blocked `jnp` attention backend: the engine's attention where no Pallas kernel runs natively (the CPU)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jinfer.attention.backend import PagedMeta
from jinfer.kernels.paged_attention.blocked import blocked_paged_attention, blocked_prefill_attention
from jinfer.kernels.paged_attention.query_layout import query_blocks


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockedMeta:
    """Per-step arrays of `BlockedBackend` (numpy on the host, traced in the step)."""

    blocks: tuple[jax.Array, ...] | None  # (blk_slot, blk_row0, blk_len, blk_qoff), each i32[NB] (NB: num_blocks);
    #   None in decode steps, which take one row of work per sequence


@dataclasses.dataclass(frozen=True)
class BlockedBackend:
    """Plain `jnp`, a block of pages at a time, only as far as the step's longest sequence. Decode and verify
    steps take one row of work per sequence; steps with prefill chunks attend to their own tokens in dense masked
    products (causal blocks above the diagonal skipped) and to what each sequence had cached before the step
    by query blocks of up to `block_q` queries of one sequence (the layout of the Pallas kernel;
    `blocked_prefill_attention`)."""

    partitionable = True  # plain jnp: on a mesh, XLA splits it over heads from the operands' shardings
    keys_per_block: int = 256
    block_q: int = 16
    # Steps whose rows have at most this many queries (decode: 1; a verify step: k + 1 for k <= 14) take one row
    # of work per sequence, its queries against its pages, instead of the prefill path's blocks of `block_q`
    # queries (which pad a verify row of 5 queries to 16, and at a context of 800 cost more than the model's
    # weights). Prefill steps are wider on the CPU (its smallest token bucket is 16).
    max_paged_width: int = 15

    def num_blocks(self, num_tokens: int, num_rows: int) -> int:
        return -(-num_tokens // self.block_q) + num_rows

    def step_metadata(self, query_start: np.ndarray, query_len: np.ndarray, num_tokens: int,
                      width: int) -> BlockedMeta:
        if width <= self.max_paged_width:
            return BlockedMeta(blocks=None)
        blocks, _ = query_blocks(query_start, query_len, self.block_q, self.num_blocks(num_tokens, len(query_len)),
                                 num_tokens)
        return BlockedMeta(blocks=blocks)

    def attend(self, q, k, v, k_pages, v_pages, layer, meta: PagedMeta[BlockedMeta], width: int):
        ppb = max(1, self.keys_per_block // k_pages.shape[-2])
        if width <= self.max_paged_width:
            return blocked_paged_attention(
                q, k_pages, v_pages, meta.page_table, meta.kv_len, meta.query_start, meta.query_len, layer,
                max_query_len=width, pages_per_block=ppb)
        return blocked_prefill_attention(
            q, k, v, k_pages, v_pages, meta.page_table, meta.kv_len, meta.query_start, meta.query_len,
            meta.token_row, meta.token_valid, meta.backend.blocks, layer, block_q=self.block_q, pages_per_block=ppb)
