"""jinfer's engine as a user runs it (`LLM`, default settings) beside its peers on the CPU, in one run.

    python benchmarks/engine_vs_peers.py [--model smollm2] [--iters 3] [--rounds 1] [--threads 2] [--only jinfer,dense]

Four workloads, the same token ids for every implementation (fresh random prompts on every iteration, so no
prefix cache can help; greedy, EOS ignored):

    decode_b1    one request, 16 prompt tokens, 128 new tokens        -> new tokens / wall s
    decode_b8    eight such requests at once                          -> new tokens / wall s
    prefill_512  one 512-token prompt, 1 new token                    -> prompt tokens / wall s
    mixed_16     16 requests of 128 prompt tokens x 64 new, at once   -> new tokens / wall s

Implementations, each in its own process (no two thread pools compete): `jinfer` (`LLM(model)` with its
defaults, `generate`), `dense` (jinfer's dense-cache reference loop, `jinfer.runtime.reference.generate`: the
model's own cost, no engine), `transformers` (the same GGUF dequantized to float32, `generate`), and
`llama.cpp` (`llama-cpp-python` on the same Q4_1 GGUF, where installed; it has no batch API, so only the
batch-1 workloads). Every figure is the median over --iters timed runs after one warm-up run; the ratios
printed are jinfer / each peer. With --rounds R the implementations take turns R times (a shared machine's
speed drifts over minutes, which a ratio of two runs minutes apart would take for a difference): the figures
are the medians over the rounds, and each ratio is also printed per round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

WORKLOADS = {  # name: (requests, prompt tokens, new tokens)
    "decode_b1": (1, 16, 128),
    "decode_b8": (8, 16, 128),
    "prefill_512": (1, 512, 1),
    "mixed_16": (16, 128, 64),
}
IMPLS = ("jinfer", "dense", "transformers", "llama.cpp")


def prompts_for(name: str, iteration: int, vocab: int) -> list[list[int]]:
    import numpy as np

    n, p, _ = WORKLOADS[name]
    rng = np.random.default_rng([sorted(WORKLOADS).index(name), iteration])
    return [list(map(int, rng.integers(100, vocab, p))) for _ in range(n)]


def rate(name: str, seconds: float) -> float:
    n, p, new = WORKLOADS[name]
    return n * (p if name.startswith("prefill") else new) / seconds


def timed(name: str, run, iters: int, vocab: int) -> float:
    """Median tokens/s of `run(prompts, max_tokens)` over `iters` runs after a warm-up run."""
    new = WORKLOADS[name][2]
    run(prompts_for(name, 0, vocab), new)
    times = []
    for i in range(1, iters + 1):
        prompts = prompts_for(name, i, vocab)
        t = time.perf_counter()
        run(prompts, new)
        times.append(time.perf_counter() - t)
    return rate(name, statistics.median(times))


# ---- one implementation per process ---------------------------------------------------------------

def bench_jinfer(model: str, iters: int, names) -> dict:
    from jinfer import LLM, SamplingParams

    llm = LLM(model=model)

    def run(prompts, new):
        outs = llm.generate(prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True), use_tqdm=False)
        assert all(len(o.token_ids) == new for o in outs)

    return {n: timed(n, run, iters, llm.config.vocab_size) for n in names}


def bench_dense(model: str, iters: int, names) -> dict:
    from jinfer.checkpoints.load import load
    from jinfer.inputs import SamplingParams
    from jinfer.runtime import reference

    loaded = load(model)

    def run(prompts, new):
        sp = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
        outs = reference.generate(loaded.params, loaded.config, prompts, [sp] * len(prompts))
        assert all(len(o.token_ids) == new for o in outs)

    return {n: timed(n, run, iters, loaded.config.vocab_size) for n in names}


def bench_transformers(model: str, iters: int, names) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from jinfer.checkpoints.pull import gguf_path

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    path = gguf_path(model)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()

    def run(prompts, new):
        ids = torch.tensor(prompts)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + new

    return {n: timed(n, run, iters, hf.config.vocab_size) for n in names}


def bench_llama_cpp(model: str, iters: int, names, threads: int) -> dict:
    import llama_cpp

    from jinfer.checkpoints.pull import gguf_path

    llm = llama_cpp.Llama(model_path=str(gguf_path(model)), n_ctx=1024, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    import numpy as np

    def run(prompts, new):
        (prompt,) = prompts
        llm.reset()
        llm.eval(prompt)
        for _ in range(new - 1):  # the first new token comes from the prompt's logits
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))  # the last position's
            llm.eval([int(logits.argmax())])

    return {n: timed(n, run, iters, llm.n_vocab()) for n in names if WORKLOADS[n][0] == 1}


def child(impl: str, args) -> dict:
    names = [n for n in WORKLOADS if n in args.workloads]
    if impl == "jinfer":
        return bench_jinfer(args.model, args.iters, names)
    if impl == "dense":
        return bench_dense(args.model, args.iters, names)
    if impl == "transformers":
        return bench_transformers(args.model, args.iters, names)
    return bench_llama_cpp(args.model, args.iters, names, args.threads)


def available(impl: str) -> bool:
    import importlib.util

    need = {"transformers": "transformers", "llama.cpp": "llama_cpp"}.get(impl)
    return need is None or importlib.util.find_spec(need) is not None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="take turns this many times (see the docstring)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", default=",".join(IMPLS), help=f"comma-separated subset of {IMPLS}")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return

    import jax

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} threads; jax {jax.__version__}; "
          f"model {args.model}, float32; median of {args.iters} runs")
    runs: dict[str, dict[int, dict]] = {}  # impl -> round -> workload -> tok/s
    for r in range(args.rounds):
        for impl in args.only.split(","):
            if not available(impl):
                if r == 0:
                    print(f"{impl}: not installed, skipped")
                continue
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", impl, "--model", args.model, "--iters",
                                   str(args.iters), "--threads", str(args.threads), "--workloads", args.workloads],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{impl}: failed\n{proc.stderr[-3000:]}")
                continue
            runs.setdefault(impl, {})[r] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{impl}: round {r + 1} done in {time.perf_counter() - t:.0f}s", flush=True)
    impls = list(runs)
    head = f"{'workload (tok/s)':<16}" + "".join(f"{i:>14}" for i in impls)
    head += "".join(f"{'jinfer/' + i:>20}" for i in impls if i != "jinfer")
    print(head)
    for name in WORKLOADS:
        if name not in args.workloads:
            continue
        per_round = {i: {r: run[name] for r, run in runs[i].items() if run.get(name)} for i in impls}
        vals = {i: statistics.median(v.values()) if v else None for i, v in per_round.items()}
        line = f"{name:<16}" + "".join(f"{v:>14.1f}" if v else f"{'—':>14}" for v in vals.values())
        ours = vals.get("jinfer")
        for i in impls:
            if i != "jinfer":
                line += f"{ours / vals[i]:>20.2f}" if ours and vals[i] else f"{'—':>20}"
        print(line)
        if args.rounds > 1 and ours:
            for i in impls:
                if i != "jinfer" and vals[i]:
                    ours_by_round = per_round["jinfer"]
                    ratios = [ours_by_round[r] / v for r, v in per_round[i].items() if r in ours_by_round]
                    print(f"{'':<16}jinfer/{i} by round: " + ", ".join(f"{x:.2f}" for x in ratios))


if __name__ == "__main__":
    main()
