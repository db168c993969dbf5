"""Speculative decoding on this machine: tok/s with and without each proposer, in one run.

    python benchmarks/spec_speed.py [--model smollm2] [--methods none,ngram,early_exit,draft] [--k 4]
                                    [--batches 1,8] [--iters 2] [--new 96] [--fixed] [--workloads grounded,chat]

Every engine is built as a user asks for it (`LLM(model, speculative_config=...)`); `draft` uses the target's
first quarter of layers as a separate draft model with its own cache (early exit's drafts, through the draft-model
path). Workloads, chat-templated, the same prompts for every method:
- grounded: a short Python file in the prompt, asked to be rewritten with one rename (`spec_workload.py`,
  frozen; greedy, up to --new tokens, stopping at EOS; the same tokens for every method: greedy speculation is exact);
- chat: open-ended requests (temperature 0.7, seeded, EOS ignored, --new tokens).
At batch B the workload's --prompts prompts run B at a time, group after group (so every batch size generates
the same tokens). tok/s = generated tokens / wall s (prefill included),
decode = tokens after each request's first / s from the first first token to the last finish (the decode phase
that speculation speeds up); medians of --iters timed rounds after a warm-up, the methods taking turns within
each round; `x none` is the ratio to the engine without speculation.
--fixed turns the adaptive policy off (always k proposals, no batch limit): the crossover measurement.
Acceptance rate = accepted / proposed tokens; mean length = tokens per verify step (accepted + 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.spec_workload import grounded_prompts  # noqa: E402

CHAT = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Explain how vaccines train the immune system, for a curious teenager.",
        "What are some good habits for learning a new language? Give details.",
        "Describe a walk through a busy market in a city you imagine.",
        "Why is the sky blue? Answer with a friendly explanation.",
        "Give me a plan for a weekend trip to the mountains.",
        "Write a letter to a friend about your new hobby, gardening.",
        "Tell me about the history of the bicycle."]


def make_llm(model, method: str, k: int, fixed: bool):
    from jinfer.checkpoints.load import load
    from jinfer.entrypoints.llm import LLM
    from jinfer.models import llama

    loaded = load(model)
    if method == "none":
        return LLM(loaded)
    spec = {"method": method, "num_speculative_tokens": k}
    if fixed:
        spec.update(adaptive=False, disable_by_batch_size=64)
    if method == "draft":  # the target's first quarter of layers, as a model of its own
        m = max(1, loaded.config.num_layers // 4)
        cfg = dataclasses.replace(loaded.config, num_layers=m)
        params = dict(loaded.params, layers={n: w[:m] for n, w in loaded.params["layers"].items()})
        spec["model"] = dataclasses.replace(loaded, config=cfg, params=params)
        assert llama.param_shapes(cfg)["layers"]["wq"][0] == m
    return LLM(loaded, speculative_config=spec)


def main():
    from jinfer.inputs import SamplingParams

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--methods", default="none,ngram,early_exit,draft")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--fixed", action="store_true")
    ap.add_argument("--workloads", default="grounded,chat")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per workload (a multiple of every batch size)")
    args = ap.parse_args()
    import jax

    methods = args.methods.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    llms = {}
    for m in methods:
        t = time.perf_counter()
        llms[m] = make_llm(args.model, m, args.k, args.fixed)
        print(f"built {m} in {time.perf_counter() - t:.0f} s", flush=True)
    any_llm = next(iter(llms.values()))
    prompts = {"grounded": [any_llm.chat_prompt([{"role": "user", "content": p}]) for p in grounded_prompts(8)],
               "chat": [any_llm.chat_prompt([{"role": "user", "content": p}]) for p in CHAT]}
    sampling = {"grounded": SamplingParams(max_tokens=args.new, temperature=0.0),
                "chat": SamplingParams(max_tokens=args.new, temperature=0.7, ignore_eos=True)}
    print(f"jax {jax.__version__}; {args.model}; {os.cpu_count()} cores; k={args.k}; "
          f"{'fixed k, no batch limit' if args.fixed else 'adaptive'}; grounded prompts of "
          f"{[len(p.ids) for p in prompts['grounded']]} tokens", flush=True)
    print(f"{'workload':<9} {'B':>2} {'method':<11} {'tok/s':>7} {'x none':>7} {'decode':>7} {'x none':>7} "
          f"{'accept':>7} {'len':>5}", flush=True)
    for w in args.workloads.split(","):
        for B in batches:
            groups = [prompts[w][i:i + B] for i in range(0, args.prompts, B)]
            rates, decode, stats = {}, {}, {}

            def run(llm):
                outs, n, wall, dwall = [], 0, 0.0, 0.0
                for g, ps in enumerate(groups):
                    sps = [dataclasses.replace(sampling[w], seed=g * B + i) for i in range(len(ps))]
                    t = time.perf_counter()
                    o = llm.generate(ps, sps, use_tqdm=False)
                    end = time.perf_counter()
                    first = min(x.metrics.first_token_time for x in o)
                    outs += o
                    n += sum(len(x.token_ids) for x in o)
                    wall += end - t
                    dwall += max(x.metrics.finished_time for x in o) - first
                return outs, n / wall, (n - len(outs)) / dwall

            for llm in llms.values():
                run(llm)  # warm-up
            # The methods take turns, round after round: this machine's speed drifts by 10% over minutes, which
            # would otherwise read as a difference between whichever methods ran first and last.
            runs = {m: [] for m in llms}
            for _ in range(args.iters):
                for m, llm in llms.items():
                    runs[m].append(run(llm))
            for m in llms:
                rates[m] = statistics.median(r for _, r, _ in runs[m])
                decode[m] = statistics.median(d for _, _, d in runs[m])
                outs = runs[m][-1][0]
                drafted = sum(o.metrics.spec_draft_tokens for o in outs)
                acc = sum(o.metrics.spec_accepted_tokens for o in outs)
                steps = sum(o.metrics.spec_verify_steps for o in outs)
                stats[m] = (acc / drafted if drafted else float("nan"), 1 + acc / steps if steps else float("nan"))
            for m in llms:
                ratio = rates[m] / rates["none"] if "none" in rates else float("nan")
                dratio = decode[m] / decode["none"] if "none" in decode else float("nan")
                print(f"{w:<9} {B:>2} {m:<11} {rates[m]:>7.1f} {ratio:>7.2f} {decode[m]:>7.1f} {dratio:>7.2f} "
                      f"{stats[m][0]:>7.2f} {stats[m][1]:>5.2f}", flush=True)


if __name__ == "__main__":
    main()
