"""One of two processes of a jax.distributed job on localhost (2 CPU devices each), run by
tests/runtime/test_multihost.py: a forward with the params sharded over all 4 devices of both processes (logits
saved by process 0), then `jinfer batch` across both hosts (tensor parallel 2 inside each).

    python tests/scripts/multihost_check.py PROCESS_ID PORT WORKDIR
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.entrypoints import cli
from jinfer.models.attention import dense_kv_cache
from jinfer.runtime import distributed, reference, sharding
from jinfer.testing.tiny import TINY_MESH as CONFIG
from jinfer.testing.tiny import tiny_params

TOKENS = list(range(3, 40))


def main():
    pid, port, work = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    coordinator = f"127.0.0.1:{port}"
    distributed.initialize(coordinator, 2, pid)
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2

    mesh = sharding.make_mesh(model=4, devices=jax.devices())  # spans both processes
    params = sharding.shard_params(tiny_params(4, CONFIG), CONFIG, mesh)
    assert not params["layers"]["wq"].is_fully_addressable  # each process holds only its devices' shards

    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def logits(params, tokens):
        cache = dense_kv_cache(CONFIG.num_layers, 1, len(TOKENS), CONFIG.num_kv_heads, CONFIG.head_dim, jnp.float32)
        return reference._full_logits(params, tokens, cache, CONFIG)[0][0]

    out = logits(params, np.asarray([TOKENS], np.int32))
    if pid == 0:
        np.save(os.path.join(work, "logits.npy"), np.asarray(out.addressable_data(0)))

    rc = cli.main(["batch", os.path.join(work, "in.jsonl"), os.path.join(work, "out.jsonl"),
                   "--model", os.path.join(work, "model"), "--tensor-parallel", "2",
                   "--max-slots", "4", "--decode-buckets", "4", "--token-buckets", "64",  # few shapes to compile
                   "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(pid)])
    sys.exit(rc)


if __name__ == "__main__":
    main()
