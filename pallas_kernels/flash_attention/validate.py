"""Input checks shared by the flash attention entry points (the dispatcher and each kernel's public
function): every error names the offending shapes or values."""

from __future__ import annotations


def check_inputs(q, k, v, q_offset, q_segment_ids, kv_segment_ids, window, softcap) -> None:
    """q [B, Sq, N, H], k and v [B, Sk, K, H], q_offset i32[B] or None, segment ids i32[B, Sq] and
    i32[B, Sk] or None; window and softcap positive or None."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, Sq, N, H] and k, v [B, Sk, K, H]; got {q.shape=}, {k.shape=}, {v.shape=}")
    B, Sq, N, H = q.shape
    if k.shape[0] != B or k.shape[3] != H:
        raise ValueError(f"{k.shape=} does not match {q.shape=} in batch or head_dim")
    if N % k.shape[2]:
        raise ValueError(f"query heads N={N} must be a multiple of KV heads K={k.shape[2]}")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None and (q_segment_ids.shape != (B, Sq) or kv_segment_ids.shape != (B, k.shape[1])):
        raise ValueError(f"{q_segment_ids.shape=} must be {(B, Sq)} and {kv_segment_ids.shape=} {(B, k.shape[1])}")
    if q_offset is not None and q_offset.shape != (B,):
        raise ValueError(f"{q_offset.shape=} must be ({B},)")
    if window is not None and window <= 0:
        raise ValueError(f"{window=} must be positive")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"{softcap=} must be positive")
