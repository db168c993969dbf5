"""Run by tests/runtime/test_sharding.py in a fresh process (it needs 8 CPU devices before jax starts): the engine
on meshes (model=2), (model=4) and (data=2, model=2) gives the single-device greedy outputs token for token,
with the shardings the rules say, and compiles nothing after warm-up; so do int8 weights with an int8 KV
cache on (model=2), values and scales split alike; the stacked form on (model=2) runs the Pallas GPU kernel,
interpreted, per KV-head shard (`jinfer.attention.sharded`), also in a one-row decode step. Prints one line per
mesh; exits 1 on a miss. Also: params saved with orbax from a (model=2) mesh restore straight onto (model=4) and
onto one device, each device reading only its shard, with the same values and logits."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np
from jax.sharding import PartitionSpec as P

from jinfer.engine.config import EngineConfig
from jinfer.inputs import SamplingParams
from jinfer.runtime.build import make_engine
from jinfer.testing.tiny import TINY_MESH as CONFIG
from jinfer.testing.tiny import tiny_params


def run(dp: int, tp: int, params, prompts, per_layer_weights=None, quantization=None, kv_cache_dtype=None,
        attention_backend=None, decode_buckets=(4,)):
    cfg = EngineConfig(max_slots=4, page_size=4, num_pages=64, token_buckets=(32,), decode_buckets=decode_buckets,
                       max_prefill_chunk=16, tensor_parallel=tp, data_parallel=dp,
                       per_layer_weights=per_layer_weights, quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    eng = make_engine(CONFIG, params, None, cfg, attention_backend=attention_backend, seed=0)
    eng.warmup()
    runners = [e.runner for e in getattr(eng, "replicas", [eng])]
    compiled = [r.num_compilations for r in runners]
    for r in runners:  # each runner records the row counts of the decode steps it ran (runner.decode_rows)
        def launch(plan, shape, r=r, inner=r._launch):
            if shape.decode:
                r.decode_rows.add(shape.rows)
            return inner(plan, shape)

        r.decode_rows, r._launch = set(), launch
    # The last request outlasts the others, so the step ends alone (a one-row decode bucket, where there is one).
    ids = [eng.add_request(p, SamplingParams(max_tokens=20 if j == len(prompts) - 1 else 12, temperature=0,
                                             ignore_eos=True)) for j, p in enumerate(prompts)]
    outs = {}
    while eng.has_work:
        for ev in eng.step():
            if ev.output.finished:
                outs[ev.request_id] = ev.output.token_ids
    assert [r.num_compilations for r in runners] == compiled, "compiled after warm-up"
    assert all(e.scheduler.num_computed_tokens > 0 for e in getattr(eng, "replicas", [eng])), "an idle replica"
    return [outs[i] for i in ids], runners


def kernel_over_heads() -> tuple:
    """The Pallas GPU kernel, interpreted (block sizes for TINY_MESH's groups of 2), and a check of a runner
    using it: it runs per KV-head shard under shard_map, and no compiled step all-gathers the KV pool (XLA, left
    to partition the opaque kernel itself, gathers the whole pool onto every device at every layer)."""
    from jinfer.attention.pallas import PallasBackend
    from jinfer.attention.sharded import HeadShardedBackend
    from jinfer.engine.scheduler import MAX_STOP_TOKEN_IDS
    from jinfer.kernels.paged_attention.kernel import BlockSizes

    backend = PallasBackend(decode=BlockSizes(block_q=8, pages_per_block=2, num_splits=3),
                            prefill=BlockSizes(block_q=8, pages_per_block=2, num_splits=1), interpret=True)

    def pool_gathers(runner) -> int:
        pool = "f32[" + ",".join(map(str, runner.kv[0].shape)) + "]"
        n = 0
        for shape in runner.all_shapes():
            text = runner.compiled_text(shape, MAX_STOP_TOKEN_IDS + len(CONFIG.eos_token_ids))
            n += sum("all-gather" in line and pool in line.split("=")[1][:60] for line in text.splitlines())
        return n if isinstance(runner.attention, HeadShardedBackend) else -1

    return backend, pool_gathers


def check_orbax_reshard(params, tmp: str) -> bool:
    import jax

    from jinfer.checkpoints.orbax_io import restore_orbax, save_orbax
    from jinfer.runtime import reference, sharding

    two, four = sharding.make_mesh(model=2), sharding.make_mesh(model=4, devices=jax.devices()[4:])
    save_orbax(tmp, CONFIG, sharding.shard_params(params, CONFIG, two))
    want_shardings = sharding.param_shardings(CONFIG, four)
    _, got = restore_orbax(tmp, shardings=want_shardings)
    ok = True
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want_shardings)):
        # Each device holds exactly its shard: never a whole copy of a split leaf.
        shard_shape = s.shard_shape(x.shape)
        ok &= x.sharding == s and all(sh.data.shape == shard_shape for sh in x.addressable_shards)
        ok &= np.array_equal(np.asarray(x), np.asarray(_at(params, path)))
    tokens = list(range(1, 20))
    want = reference.full_logits(params, CONFIG, tokens)
    sharded = reference.full_logits(got, CONFIG, tokens)
    _, one = restore_orbax(tmp)
    single = reference.full_logits(one, CONFIG, tokens)
    err = float(np.abs(sharded - want).max())
    ok &= np.array_equal(single, want) and err < 1e-5
    print(f"orbax model=2 -> model=4 and -> one device: {'ok' if ok else 'MISMATCH'} "
          f"(logits max abs diff on model=4: {err:.1e}; one device: bit-identical={np.array_equal(single, want)})")
    return bool(ok)


def check_ring_prefill(params) -> bool:
    import jax

    from jinfer.kernels.flash_attention.kernel import BlockSizes
    from jinfer.models.attention import dense_kv_cache
    from jinfer.runtime import reference, sharding
    from jinfer.runtime.long_prefill import ring_prefill

    mesh = sharding.make_mesh(seq=4)
    tokens = list(np.random.default_rng(1).integers(0, CONFIG.vocab_size, 37))  # pads to 40 = 5 x (2 x 4)
    logits, (k, v) = ring_prefill(params, CONFIG, tokens, mesh, block_sizes=BlockSizes(block_q=8, block_k=8))
    want = reference.full_logits(params, CONFIG, tokens)
    cache = dense_kv_cache(CONFIG.num_layers, 1, len(tokens), CONFIG.num_kv_heads, CONFIG.head_dim, np.float32)
    _, (k_ref, v_ref) = reference._full_logits(params, np.asarray([tokens], np.int32), cache, CONFIG)
    err = float(np.abs(np.asarray(logits) - want).max())
    kv_err = max(float(np.abs(np.asarray(k) - np.asarray(k_ref[:, 0])).max()),
                 float(np.abs(np.asarray(v) - np.asarray(v_ref[:, 0])).max()))
    ok = err < 1e-4 and kv_err < 1e-5 and logits.shape == want.shape and len(jax.devices()) >= 4
    print(f"ring prefill over seq=4: {'ok' if ok else 'MISMATCH'} (logits max abs diff {err:.1e}, K/V {kv_err:.1e})")
    return ok


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def _trim(spec: P) -> tuple:
    """A partition spec without its trailing Nones (a slice of a sharded array may drop them)."""
    t = tuple(spec)
    while t and t[-1] is None:
        t = t[:-1]
    return t


def main():
    import tempfile

    params = tiny_params(4, CONFIG)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, CONFIG.vocab_size, int(rng.integers(1, 30)))) for _ in range(6)]
    want, _ = run(1, 1, params, prompts)
    # The CPU keeps each layer's weights as their own arrays (EngineConfig.per_layer_weights); the stacked
    # form, the accelerators' default, is checked on one mesh too.
    stacked = {"wq": P(None, None, "model", None), "wo": P(None, "model", None, None), "w_down": P(None, "model", None)}
    per_layer = {"wq": P(None, "model", None), "wo": P("model", None, None), "w_down": P("model", None)}
    shared = {"embed": P("model", None), "kv": P(None, "model", None, None, None)}
    bad = 0
    kernel, pool_gathers = kernel_over_heads()
    for dp, tp, layered in ((1, 2, False), (1, 2, None), (1, 4, None), (2, 2, None)):
        # The stacked form runs the Pallas kernel (interpreted): it must match the single device's jnp attention.
        # Its decode bucket of one row (the last request alone) writes K/V as a block update, not a scatter.
        backend = kernel if layered is False else None
        got, runners = run(dp, tp, params, prompts, per_layer_weights=layered, attention_backend=backend,
                           decode_buckets=(1, 4) if backend else (4,))
        ok = got == want
        gathers = pool_gathers(runners[0]) if backend else 0
        ok &= gathers == 0 and (not backend or runners[0].decode_rows == {1, 4})
        devices = set()
        for runner in runners:
            p = runner.params
            layers = p["layers"][1] if isinstance(p["layers"], tuple) else p["layers"]
            expect = {k: _trim(v) for k, v in {**(stacked if layered is False else per_layer), **shared}.items()}
            specs = {k: _trim(x.sharding.spec) for k, x in (("wq", layers["wq"]), ("wo", layers["wo"]),
                     ("w_down", layers["w_down"]), ("embed", p["embed"]), ("kv", runner.kv[0]))}
            mine = set(runner.kv[0].sharding.device_set)
            ok &= specs == expect and len(mine) == tp and not devices & mine  # replicas on their own devices
            devices |= mine
        bad += not ok
        form = "stacked, Pallas kernel per KV-head shard" if backend else "per-layer"
        print(f"data={dp} model={tp} {form}: {'ok' if ok else 'MISMATCH'} tokens_equal={got == want} specs={specs}"
              + (f" pool all-gathers={gathers} decode rows={sorted(runners[0].decode_rows)}" if backend else ""))
    # int8 weights split like the float ones (values by the rules, scales over their output axes); an int8 KV
    # cache's values and per-token-per-head scales both over KV heads.
    want_q, _ = run(1, 1, params, prompts, quantization="int8", kv_cache_dtype="int8")
    got_q, (runner,) = run(1, 2, params, prompts, quantization="int8", kv_cache_dtype="int8")
    wq, kv = runner.params["layers"][1]["wq"], runner.kv[0]
    specs = {"values": _trim(wq.values.sharding.spec), "scale": _trim(wq.scale.sharding.spec),
             "kv": _trim(kv.values.sharding.spec), "kv_scale": _trim(kv.scale.sharding.spec)}
    ok = got_q == want_q and specs == {"values": (None, "model"), "scale": (None, "model"),
                                       "kv": (None, "model"), "kv_scale": (None, "model")}
    bad += not ok
    print(f"int8 weights, int8 KV, data=1 model=2: {'ok' if ok else 'MISMATCH'} tokens_equal={got_q == want_q} "
          f"differs_from_float={want_q != want} specs={specs}")
    with tempfile.TemporaryDirectory() as tmp:
        bad += not check_orbax_reshard(params, tmp + "/ckpt")
    bad += not check_ring_prefill(params)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
