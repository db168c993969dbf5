"""Run by tests/test_sharding.py in a fresh process (it needs 8 CPU devices before jax starts): the engine
with tensor parallelism 2 and 4 gives the single-device greedy outputs token for token, with the shardings
the rules say, and compiles nothing after warm-up. Prints one line per mesh; exits 1 on a miss."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jinfer.config import ModelConfig  # noqa: E402
from jinfer.engine import Engine  # noqa: E402
from jinfer.engine_config import EngineConfig  # noqa: E402
from jinfer.sampling_params import SamplingParams  # noqa: E402
from tests.tiny import tiny_params  # noqa: E402

# 8 query heads over 4 KV heads: KV heads split over model=2 and 4; vocab and MLP width divide by 4.
CONFIG = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=8,
                     intermediate_size=128, max_position_embeddings=256, eos_token_ids=(), bos_token_id=None)


def run(tp: int, params, prompts):
    cfg = EngineConfig(max_slots=4, page_size=4, num_pages=64, token_buckets=(8, 32), max_prefill_chunk=16,
                       tensor_parallel=tp)
    eng = Engine(CONFIG, params, None, cfg, seed=0)
    eng.warmup()
    compiled = eng.runner.num_compilations
    ids = [eng.add_request(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)) for p in prompts]
    outs = {}
    while eng.has_work:
        for ev in eng.step():
            if ev.output.finished:
                outs[ev.request_id] = ev.output.token_ids
    assert eng.runner.num_compilations == compiled, "compiled after warm-up"
    return [outs[i] for i in ids], eng.runner


def main():
    params = tiny_params(4, CONFIG)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, CONFIG.vocab_size, int(rng.integers(1, 30)))) for _ in range(6)]
    want, _ = run(1, params, prompts)
    bad = 0
    for tp in (2, 4):
        got, runner = run(tp, params, prompts)
        specs = {
            "wq": runner.params["layers"]["wq"].sharding.spec, "wo": runner.params["layers"]["wo"].sharding.spec,
            "w_down": runner.params["layers"]["w_down"].sharding.spec, "embed": runner.params["embed"].sharding.spec,
            "kv": runner.kv[0].sharding.spec,
        }
        expect = {"wq": P(None, None, "model", None), "wo": P(None, "model", None, None),
                  "w_down": P(None, "model", None), "embed": P("model", None),
                  "kv": P(None, "model", None, None, None)}
        ok = got == want and specs == expect and runner.kv[0].sharding.mesh.shape["model"] == tp
        bad += not ok
        print(f"model={tp}: {'ok' if ok else 'MISMATCH'} tokens_equal={got == want} specs={specs}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
