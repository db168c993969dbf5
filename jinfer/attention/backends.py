"""Attention backends of the engine: how one step's ragged queries attend to the paged KV cache.

A backend adds its own per-step host arrays (`step_inputs`, numpy) to the step's batch and computes
attention inside the jitted step (`attend`). The runner and model are the same for every backend:
a new kernel plugs in here. `default_backend()` picks the Pallas Triton kernel on GPU, the Pallas Mosaic
kernel on TPU and the blocked `jnp` attention elsewhere (both kernels also run on the CPU in interpret mode,
for tests). The plain `jnp` reference (`pallas_kernels.paged_attention.reference`) is the tests' oracle,
not a backend.
"""

from __future__ import annotations

import dataclasses

import jax

from jinfer.kernels.paged_attention.blocked import (ragged_paged_attention_blocked,
                                                    ragged_paged_attention_blocked_qblocks)
from jinfer.kernels.paged_attention.kernel import BlockSizes, query_blocks
from jinfer.kernels.paged_attention.kernel_tpu import TPUBlockSizes
from jinfer.kernels.paged_attention.ops import ragged_paged_attention
from jinfer.kernels.paged_attention.tuning import gpu_block_sizes, tpu_block_sizes


@dataclasses.dataclass(frozen=True)
class BlockedBackend:
    """Plain `jnp`, a block of pages at a time, only as far as the step's longest sequence: the default
    where no Pallas kernel runs natively (the CPU). Decode-only steps take one row per slot; steps with
    prefill chunks take one row per query block of up to `block_q` queries of one slot (the layout of the
    Pallas kernel), so the idle width of short rows is at most block_q - 1 per slot."""

    keys_per_block: int = 256
    block_q: int = 16
    name: str = "blocked"

    def num_blocks(self, num_tokens: int, max_slots: int) -> int:
        return -(-num_tokens // self.block_q) + max_slots

    def step_inputs(self, query_start, query_len, num_tokens: int, width: int, max_slots: int) -> dict:
        if width <= 1:
            return {}
        blocks, _ = query_blocks(query_start, query_len, self.block_q, self.num_blocks(num_tokens, max_slots),
                                 num_tokens)
        return {"blocks": blocks}

    def attend(self, q, k_pages, v_pages, layer, meta, extra: dict, width: int):
        ppb = max(1, self.keys_per_block // k_pages.shape[-2])
        if width <= 1:
            return ragged_paged_attention_blocked(
                q, k_pages, v_pages, meta.page_table, meta.kv_len, meta.query_start, meta.query_len, layer,
                max_query_len=1, pages_per_block=ppb)
        return ragged_paged_attention_blocked_qblocks(
            q, k_pages, v_pages, meta.page_table, meta.kv_len, meta.query_len, tuple(extra["blocks"]), layer,
            block_q=self.block_q, pages_per_block=ppb)


@dataclasses.dataclass(frozen=True)
class PallasBackend:
    """The Pallas ragged paged attention kernel. Decode-only steps (width 1) use `decode` block sizes
    (context split over many programs); steps with prefill chunks use `prefill`."""

    decode: BlockSizes = BlockSizes(block_q=4, pages_per_block=8, num_splits=8)
    prefill: BlockSizes = BlockSizes(block_q=16, pages_per_block=4, num_splits=1)
    interpret: bool = False
    name: str = "pallas"

    def sizes(self, width: int) -> BlockSizes:
        return self.decode if width <= 1 else self.prefill

    def num_blocks(self, num_tokens: int, width: int, max_slots: int) -> int:
        if width <= 1:  # one query per slot: one block per slot that has a token
            return min(num_tokens, max_slots)
        return -(-num_tokens // self.sizes(width).block_q) + max_slots

    def step_inputs(self, query_start, query_len, num_tokens: int, width: int, max_slots: int) -> dict:
        bs = self.sizes(width)
        blocks, (tok_block, tok_row) = query_blocks(query_start, query_len, bs.block_q,
                                                    self.num_blocks(num_tokens, width, max_slots), num_tokens)
        return {"blocks": blocks, "tok_block": tok_block, "tok_row": tok_row}

    def attend(self, q, k_pages, v_pages, layer, meta, extra: dict, width: int):
        num_tokens, max_slots = q.shape[0], meta.kv_len.shape[0]
        return ragged_paged_attention(  # the block sizes' type picks the kernel
            q, k_pages, v_pages, layer, meta.page_table, meta.kv_len, meta.query_len, tuple(extra["blocks"]),
            extra["tok_block"], extra["tok_row"], num_blocks=self.num_blocks(num_tokens, width, max_slots),
            block_sizes=self.sizes(width), interpret=self.interpret)


@dataclasses.dataclass(frozen=True)
class TPUPallasBackend(PallasBackend):
    """The Pallas Mosaic TPU ragged paged attention kernel: the same query blocks as `PallasBackend`, but one
    program walks a block's whole context (no splits: a TPU has one or two large cores, not a hundred SMs)."""

    decode: TPUBlockSizes = TPUBlockSizes()
    prefill: TPUBlockSizes = TPUBlockSizes()
    name: str = "pallas-tpu"


def default_backend(num_kv_heads: int, num_heads: int, max_slots: int, page_size: int):
    platform = jax.devices()[0].platform
    if platform == "tpu":
        return tpu_backend(page_size)
    if platform != "gpu":
        return BlockedBackend()
    return pallas_backend(num_kv_heads, num_heads, max_slots, page_size)


def tpu_backend(page_size: int, interpret: bool = False) -> TPUPallasBackend:
    decode, mixed = tpu_block_sizes(page_size)
    return TPUPallasBackend(decode=decode, prefill=mixed, interpret=interpret)


def pallas_backend(num_kv_heads: int, num_heads: int, max_slots: int, page_size: int,
                   interpret: bool = False) -> PallasBackend:
    decode, mixed = gpu_block_sizes(num_kv_heads, num_heads, max_slots, page_size)
    return PallasBackend(decode=decode, prefill=mixed, interpret=interpret)
