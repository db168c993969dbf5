"""Run by tests/kernels/test_ring_attention.py in a fresh process (it needs 8 CPU devices before jax starts):
ring attention over n devices (the arguments; default 4 and 8) against unsharded attention; prints one
line per case, exits 1 on a miss."""

import functools
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as Ps

from jinfer.kernels.flash_attention import flash_attention_reference
from jinfer.kernels.flash_attention.kernel import BlockSizes
from jinfer.kernels.flash_attention.kernel_tpu import TPUBlockSizes
from jinfer.kernels.ring_attention import ring_attention, zigzag_order


def main():
    devices = [int(a) for a in sys.argv[1:]] or [4, 8]
    rng = np.random.default_rng(sum(devices))
    bad = 0
    for n in devices:
        mesh = Mesh(np.array(jax.devices()[:n]), ("seq",))
        B, S, N, K, H = 2, 8 * n, 8, 2, 32
        q, k, v = (jnp.asarray(rng.normal(size=(B, S, h, H)), jnp.float32) for h in (N, K, K))
        # The per-block kernel: the GPU (Triton) one interpreted, causal (zig-zag) and not; on 4 devices also
        # the TPU (Mosaic) one, causal; on 8 devices the longer ring, causal.
        triton = ("triton", BlockSizes(block_q=4, block_k=8))
        cases = [(*triton, True)]
        if n == 4:
            cases += [(*triton, False), ("tpu", TPUBlockSizes(block_q=8, block_k=128), True)]
        for kernel, bs, causal in cases:
            order = zigzag_order(S, n) if causal else rng.permutation(S)
            shard = NamedSharding(mesh, Ps(None, "seq", None, None))
            args = [jax.device_put(x[:, order], shard) for x in (q, k, v)]
            # Under jit, as the engine's long prefill calls it: run eagerly, the interpreted kernels dispatch
            # op by op and take 30 times as long.
            ring = jax.jit(functools.partial(ring_attention, mesh=mesh, axis="seq", causal=causal, block_sizes=bs))
            out = ring(*args)
            assert out.sharding.spec == shard.spec, out.sharding
            out = np.asarray(out)[:, np.argsort(order)]
            ref = np.asarray(flash_attention_reference(q, k, v, causal=causal))
            err = float(np.abs(out - ref).max() / np.abs(ref).max())
            ok = err < 1e-5
            bad += not ok
            print(f"devices={n} kernel={kernel} causal={causal} max relative error {err:.1e} {'ok' if ok else 'MISMATCH'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
