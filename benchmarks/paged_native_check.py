"""Which small shapes the native (GPU) paged attention kernel gets wrong: relative error against the `jnp`
reference over head_dim, page size, dtype, group size and pages per step, on the test suite's cases.

    python benchmarks/paged_native_check.py
"""

from __future__ import annotations

import itertools
import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jinfer.kernels.paged_attention.kernel import BlockSizes
from tests.kernels.test_paged_attention_kernel import CASES, make_case, rel, run_kernel, run_reference


def main():
    for H, ps, dtype, G, ppb, case in itertools.product((32, 64), (4, 8, 16), (jnp.float32, jnp.bfloat16), (1, 4),
                                                         (1, 2), (0, 2)):
        kv_lens, q_lens = CASES[case]
        c = make_case(np.random.default_rng(0), kv_lens=kv_lens, q_lens=q_lens, K=2, G=G, H=H, page_size=ps,
                      dtype=dtype)
        splits = 3 if max(q_lens) == 1 else 1
        bs = BlockSizes(block_q=max(2, 16 // G), pages_per_block=ppb, num_splits=splits)
        try:
            got, want = run_kernel(c, 1, bs), run_reference(c, 1)
            err = rel(got[:c["T"]], want[:c["T"]])
            ratio = float(np.nanmedian(np.asarray(got[:c["T"]], np.float32) / np.asarray(want[:c["T"]], np.float32)))
            print(f"H={H:3d} page={ps:2d} {jnp.dtype(dtype).name:8s} G={G} ppb={ppb} case={case} splits={splits}: "
                  f"rel err {err:.1e}  median ratio {ratio:.2f}" + ("   <-- WRONG" if err > 2e-2 else ""))
        except Exception as e:
            print(f"H={H} page={ps} {dtype} G={G} ppb={ppb} case={case}: {type(e).__name__}: {str(e)[:120]}")


if __name__ == "__main__":
    main()
