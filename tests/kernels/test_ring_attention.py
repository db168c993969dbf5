"""Ring attention over 4 and 8 CPU devices equals unsharded attention: on 4, causal (zig-zag) and not with
the GPU (Triton) per-block kernel and causal with the TPU (Mosaic) one; on 8, causal with the GPU kernel;
both kernels interpreted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jinfer.kernels.ring_attention import zigzag_order


def test_ring_attention_equals_unsharded_attention():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    # One process per device count, side by side: each is mostly single-threaded compilation of the
    # interpret-mode kernels.
    procs = [subprocess.Popen([sys.executable, str(root / "tests" / "scripts" / "ring_check.py"), str(n)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for n in (4, 8)]
    for n, p in zip((4, 8), procs):
        out, err = p.communicate(timeout=600)
        print(out)
        assert p.returncode == 0, out + err
        assert out.count(" ok") == (3 if n == 4 else 1)


def test_zigzag_order_balances_chunks():
    order = zigzag_order(16, 4)
    assert sorted(order) == list(range(16))
    per_device = order.reshape(4, 4)
    # each device holds one early and one late chunk: equal sums of positions
    assert len(set(per_device.sum(axis=1))) == 1
    with pytest.raises(ValueError, match="multiple of 2 x n_devices=4"):
        zigzag_order(12, 4)
