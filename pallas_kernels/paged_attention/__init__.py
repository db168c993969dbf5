"""Ragged paged attention: the queries of many requests against K/V held in pages."""

from pallas_kernels.paged_attention.reference import ragged_paged_attention_reference

__all__ = ["ragged_paged_attention_reference"]
