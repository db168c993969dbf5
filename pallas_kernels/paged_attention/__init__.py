"""Ragged paged attention: the queries of many requests against K/V held in pages.
`ragged_paged_attention` (the Pallas kernel its block sizes name) with its host-side layout `query_blocks`,
and `ragged_paged_attention_reference` (jnp)."""

from jinfer.kernels.paged_attention.ops import ragged_paged_attention
from jinfer.kernels.paged_attention.query_layout import query_blocks
from jinfer.kernels.paged_attention.reference import ragged_paged_attention_reference

__all__ = ["query_blocks", "ragged_paged_attention", "ragged_paged_attention_reference"]
