"""Ring attention over 4 CPU devices equals unsharded attention: causal (zig-zag) and not with the GPU (Triton)
per-block kernel and causal with the TPU (Mosaic) one, both interpreted; and the longer ring of 8 devices,
causal, with the Triton one."""

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
    res = subprocess.run([sys.executable, str(root / "tests" / "scripts" / "ring_check.py"), "4", "8"], env=env,
                         text=True, capture_output=True, timeout=600)
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(" ok") == 4


def test_zigzag_order_balances_chunks():
    order = zigzag_order(16, 4)
    assert sorted(order) == list(range(16))
    per_device = order.reshape(4, 4)
    # each device holds one early and one late chunk: equal sums of positions
    assert len(set(per_device.sum(axis=1))) == 1
    with pytest.raises(ValueError, match="multiple of 2 x n_devices=4"):
        zigzag_order(12, 4)
