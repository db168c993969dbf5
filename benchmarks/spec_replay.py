"""Prompt lookup's adaptive policy replayed offline on SmolLM2's own outputs: what each policy would gain at batch 1
with a verify step costing V decode tokens, lookups free and no host sync (so an upper estimate of the engine).

    python benchmarks/spec_replay.py [--costs 1.75,2.6] [--k 8] [--new 96] [--outputs /tmp/spec_replay.json]

The outputs come from the engine without speculation (`LLM`, float32), the prompts of benchmarks/spec_speed.py:
grounded (greedy, the frozen rewrite workload) and chat (3 x 8 samples at temperature 0.7; a lookup's guess
matches a sampled token with the probability that a verify step would accept it). They are saved to --outputs and
reused. Each policy runs the real `AdaptivePolicy` and `NgramProposer` through the scheduler's steps for one
request (look up when due, verify or shadow, else decode until the next lookup). Also printed: verifying whenever a
lookup finds something, every token looked up, and the best any policy could do with this proposer (a dynamic
programme over verify-or-decode at every position).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.spec_speed import CHAT
from benchmarks.spec_workload import grounded_prompts
from jinfer.engine.spec import policy as P
from jinfer.engine.spec.proposers import NgramProposer


def outputs(path: str, new: int) -> dict[str, list[tuple[list[int], list[int]]]]:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    from jinfer.checkpoints.load import load
    from jinfer.entrypoints.llm import LLM
    from jinfer.inputs import SamplingParams

    llm = LLM(load("smollm2"))
    data = {}
    for name, texts, sps in (
            ("grounded", grounded_prompts(8), [SamplingParams(max_tokens=new, temperature=0.0)] * 8),
            ("chat", CHAT * 3, [SamplingParams(max_tokens=new, temperature=0.7, ignore_eos=True, seed=i)
                                for i in range(24)])):
        prompts = [llm.chat_prompt([{"role": "user", "content": t}]) for t in texts]
        outs = llm.generate(prompts, sps, use_tqdm=False)
        data[name] = [(list(p.ids), list(o.token_ids)) for p, o in zip(prompts, outs)]
    with open(path, "w") as f:
        json.dump(data, f)
    return data


def accepted(proposal: list[int], out: list[int], i: int) -> int:
    a = 0
    while a < len(proposal) and i + a < len(out) and proposal[a] == out[i + a]:
        a += 1
    return a


def replay(data, make_policy, cost: float, proposer, block: int = 8) -> float:
    """Decode tokens per unit of cost (a decode token 1, a verify step `cost`) over all sequences, as the
    scheduler steps one request (`Scheduler._proposals` and `_decode_steps`)."""
    tokens = total = 0.0
    for prompt, out in data:
        policy = make_policy(cost - 1)
        state, i, n = policy.new_state(), 1, len(out)  # the first output token comes from the prefill
        while i < n:
            k, drafts, missed = min(policy.k(state), n - i - 1), [], False
            if k:
                if state.shadow is None:
                    drafts = policy.take(state, i, proposer.propose(prompt + out[:i], k))
                missed = not drafts
            if drafts:
                a = accepted(drafts, out, i)
                policy.record(state, len(drafts), a)
                total, i = total + cost, i + 1 + a
            else:
                m = max(1, min(policy.lookup_gap(state, block) if missed else block, n - i))
                state.idle += m
                total, i = total + m, i + m
            policy.score_shadow(state, out[:i])
        tokens += n - 1
    return tokens / total


def best(data, cost: float, proposer, k: int, every: bool) -> float:
    """`every`: verify whenever a lookup (at every position) finds something; else the cheapest mix."""
    tokens = total = 0.0
    for prompt, out in data:
        n = len(out)
        gain = {}
        for i in range(1, n):
            p = proposer.propose(prompt + out[:i], k)
            if p:
                gain[i] = accepted(p, out, i)
        if every:
            i = 1
            while i < n:
                total += cost if i in gain else 1
                i += 1 + gain.get(i, 0)
        else:
            c = [0.0] * (n + 1)
            for i in range(n - 1, 0, -1):
                c[i] = 1 + c[i + 1]
                if i in gain:
                    c[i] = min(c[i], cost + c[min(n, i + 1 + gain[i])])
            total += c[1]
        tokens += n - 1
    return tokens / total


class NoGrace(P.AdaptivePolicy):
    """Session 32's lookup gaps: doubling after every run of misses, also while the gain pays."""

    def lookup_gap(self, state, block):
        return min(2 ** max(state.misses - 1, 0), block)


class ScoreFirst(NoGrace):
    """Session 32's policy: a new request's gain starts at 0, so its first proposals are only scored."""

    def new_state(self):
        return dataclasses.replace(super().new_state(), gain=0.0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--costs", default="1.75,2.6", help="verify step costs, in decode tokens")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--new", type=int, default=96)
    ap.add_argument("--outputs", default="/tmp/spec_replay.json")
    args = ap.parse_args()
    data = outputs(args.outputs, args.new)
    proposer = NgramProposer(3, 6)  # SpeculativeConfig's defaults

    def made(cls):
        return lambda step_cost: cls(args.k, 0.0, True, step_cost, host=True, keep_looking=True)

    rows = [("committed policy", made(P.AdaptivePolicy)), ("no COPY_GRACE", made(NoGrace)),
            ("no COPY_GRACE, first proposals scored (session 32)", made(ScoreFirst))]
    print(f"SmolLM2-135M outputs: grounded {len(data['grounded'])} x greedy, chat {len(data['chat'])} x T 0.7; "
          f"k = {args.k}, lookups of 3..6 tokens; speedup over plain decode at batch 1")
    for cost in (float(c) for c in args.costs.split(",")):
        print(f"verify step = {cost} decode tokens")
        for name, make in rows:
            print(f"  {name:<52} grounded {replay(data['grounded'], make, cost, proposer):.3f}x  "
                  f"chat {replay(data['chat'], make, cost, proposer):.3f}x")
        for name, every in (("verify whenever found, every token looked up", True), ("best possible", False)):
            print(f"  {name:<52} grounded {best(data['grounded'], cost, proposer, args.k, every):.3f}x  "
                  f"chat {best(data['chat'], cost, proposer, args.k, every):.3f}x")


if __name__ == "__main__":
    main()
