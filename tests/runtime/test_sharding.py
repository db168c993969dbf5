"""Tensor and data parallelism: the sharding rules, and the engine on (model=2), (model=4) and
(data=2, model=2) meshes of CPU devices giving the single-device greedy outputs token for token; orbax
restore onto another mesh; a long prompt prefilled with ring attention over seq=4 (tests/scripts/mesh_check.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jinfer.runtime import sharding


class FakeMesh:
    """partition_spec reads only the axis sizes, so rules can be checked without 8 devices."""

    def __init__(self, **shape):
        self.shape = shape


def test_rules_split_heads_mlp_and_vocab_and_replicate_what_does_not_divide():
    mesh = FakeMesh(data=1, model=4, seq=1)
    assert sharding.partition_spec(("layers", "embed", "q_heads", "head_dim"), (2, 64, 8, 16), mesh) == \
        P(None, None, "model", None)
    assert sharding.partition_spec(("layers", "mlp", "embed"), (2, 128, 64), mesh) == P(None, "model", None)
    # 2 KV heads cannot split 4 ways: replicated, so each device keeps the whole cache of those heads.
    assert sharding.partition_spec(sharding.KV_CACHE_AXES, (2, 2, 10, 4, 16), mesh) == P(*[None] * 5)
    # A quantized cache's scales ([L, K, P, page_size]) split over KV heads like its pages.
    assert sharding.partition_spec(sharding.KV_SCALE_AXES, (2, 8, 10, 4), mesh) == P(None, "model", None, None)
    assert sharding.partition_spec(("vocab", "embed"), (128, 64), FakeMesh(data=1, model=1, seq=1)) == P(None, None)
    with pytest.raises(KeyError, match="'nonsense' has no sharding rule"):
        sharding.partition_spec(("nonsense",), (4,), mesh)


def test_make_mesh_names_the_bad_axis():
    assert isinstance(sharding.make_mesh(), Mesh)
    with pytest.raises(ValueError, match="model=0 must be a positive integer"):
        sharding.make_mesh(model=0)
    with pytest.raises(ValueError, match=f"needs {len(jax.devices()) + 1} devices"):
        sharding.make_mesh(model=len(jax.devices()) + 1)


def test_parallel_engines_equal_one_device():
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, str(root / "tests" / "scripts" / "mesh_check.py")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)
    print(res.stdout)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(": ok") == 7


def test_kernels_run_per_kv_head_shard_where_the_heads_split():
    """The runner wraps a backend XLA cannot partition (a Pallas kernel) in shard_map over KV heads, and only
    where the pool is split: plain jnp attention, one device and KV heads that do not divide stay as they are
    (the engine on such a mesh: tests/scripts/mesh_check.py)."""
    from jinfer.attention.blocked import BlockedBackend
    from jinfer.attention.pallas import PallasBackend
    from jinfer.attention.sharded import HeadShardedBackend, shard_over_heads

    kernel, plain, two = PallasBackend(interpret=True), BlockedBackend(), FakeMesh(data=1, model=2, seq=1)
    wrapped = shard_over_heads(kernel, two, num_kv_heads=4)
    assert isinstance(wrapped, HeadShardedBackend) and wrapped.inner is kernel
    assert shard_over_heads(wrapped, two, num_kv_heads=4) is wrapped  # not twice
    assert shard_over_heads(kernel, two, num_kv_heads=3) is kernel  # 3 KV heads: the pool is replicated
    assert shard_over_heads(kernel, FakeMesh(data=2, model=1, seq=1), num_kv_heads=4) is kernel
    assert shard_over_heads(kernel, None, num_kv_heads=4) is kernel
    assert shard_over_heads(plain, two, num_kv_heads=4) is plain
