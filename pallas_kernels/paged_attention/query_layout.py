"""Host-side layout of one step's queries into *query blocks* (numpy): up to `block_q` consecutive queries
of one slot each, the unit of work of the Pallas kernels (`kernel.py`, `kernel_tpu.py`) and of the engine's
blocked `jnp` attention (`blocked.blocked_prefill_attention`). Laid out once per step on the host, so
every kernel grid is static: `num_blocks` = tokens / block_q + slots covers any step of that many tokens.
"""

from __future__ import annotations

import numpy as np


def query_blocks(query_start: np.ndarray, query_len: np.ndarray, block_q: int, num_blocks: int, num_tokens: int):
    """Host-side layout of the query blocks of one step (numpy).

    Returns (blk_slot, blk_row0, blk_len, blk_qoff) i32[num_blocks] — the slot, first token row, number of
    queries and offset of the first query within the slot's chunk — and (tok_block, tok_row) i32[T]
    locating each token's output (T = num_tokens, padding included). Unused blocks have length 0.

    Padding tokens (rows no query block covers) each take an unused block of their own while any is left, as
    its first row: the kernels write an empty block's first row as zeros, so that is the padding token's output.
    In a decode step (one query a row, as many blocks as tokens) every token row is then one block's own, and a
    kernel may write its output token-major (`rope_decode_attention_triton` with one split). Padding tokens past
    the unused blocks point at block 0's first row.
    """
    slots = np.flatnonzero(query_len > 0)
    counts = -(-query_len[slots] // block_q)
    total = int(counts.sum())
    if total > num_blocks:
        raise ValueError(f"{total} query blocks exceed the kernel grid of {num_blocks=}")
    blk_slot = np.zeros(num_blocks, np.int32)
    blk_row0 = np.zeros(num_blocks, np.int32)
    blk_len = np.zeros(num_blocks, np.int32)
    blk_qoff = np.zeros(num_blocks, np.int32)
    tok_block = np.zeros(num_tokens, np.int32)
    tok_row = np.zeros(num_tokens, np.int32)
    covered = np.zeros(num_tokens, bool)
    b = 0
    for s, n in zip(slots, counts):
        for c in range(n):
            qoff = c * block_q
            length = min(block_q, int(query_len[s]) - qoff)
            row0 = int(query_start[s]) + qoff
            blk_slot[b], blk_row0[b], blk_len[b], blk_qoff[b] = s, row0, length, qoff
            tok_block[row0:row0 + length] = b
            tok_row[row0:row0 + length] = np.arange(length)
            covered[row0:row0 + length] = True
            b += 1
    pads = np.flatnonzero(~covered)[:num_blocks - b]
    blk_row0[b:b + len(pads)] = pads
    tok_block[pads] = np.arange(b, b + len(pads))
    return (blk_slot, blk_row0, blk_len, blk_qoff), (tok_block, tok_row)
