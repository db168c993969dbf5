"""Quality of each weight format on SmolLM2: perplexity on a held-out text and greedy agreement with float32.

    python benchmarks/quant_quality.py [--model smollm2] [--text /usr/share/common-licenses/GPL-3]
                                       [--window 512] [--windows 16] [--prompts 16] [--new 32]

Perplexity: the text tokenized once, cut into non-overlapping windows of --window tokens (at most
--windows of them), each scored alone by jinfer's dense reference forward (`reference.full_logits`, the
engine's oracle) with the format's params; every token but a window's first is predicted. The default text,
the GNU GPL v3 as Debian ships it, is English prose that no calibration here uses. Greedy agreement: the
share of --prompts prompts (cut from a second text, the GFDL 1.3, at varied lengths) whose --new-token
greedy continuation equals float32's. Also the bytes of the layers' matmul weights and that over bf16's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FORMATS = {  # name: (quantization, group size)
    "float32": (None, None),
    "bfloat16": ("bfloat16", None),
    "int8": ("int8", None),
    "fp8": ("fp8", None),
    "int4 g128": ("int4", 128),
    "int4 g32": ("int4", 32),
    "gguf": ("gguf", None),
}


def main():
    import jax
    import jax.numpy as jnp

    from jinfer.checkpoints.load import load
    from jinfer.inputs import SamplingParams
    from jinfer.models import llama
    from jinfer.quant.params import cast_params, param_bytes, quantize_params
    from jinfer.runtime import reference

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--prompt-text", default="/usr/share/common-licenses/GFDL-1.3")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--only", default=",".join(FORMATS))
    args = ap.parse_args()

    base = load(args.model)
    ids = base.tokenizer.encode(open(args.text).read())
    windows = [ids[i:i + args.window] for i in range(0, len(ids) - args.window + 1, args.window)][:args.windows]
    words = open(args.prompt_text).read().split()
    rng = np.random.default_rng(0)
    starts = rng.choice(len(words) - 80, args.prompts, replace=False)
    prompts = [base.tokenizer.encode(" ".join(words[s:s + int(rng.integers(8, 60))])) for s in starts]
    greedy = SamplingParams(max_tokens=args.new, temperature=0, ignore_eos=True)
    bf16_bytes = sum(int(np.prod(base.params["layers"][n].shape)) * 2 for n in llama.MATMUL_INPUT_AXES)
    print(f"jax {jax.__version__}; {args.model}; text {args.text}: {len(ids)} tokens, {len(windows)} windows of "
          f"{args.window}; {len(prompts)} prompts from {args.prompt_text}, {args.new} new tokens each", flush=True)
    print(f"{'format':<10} {'ppl':>9} {'vs f32':>8} {'greedy==f32':>12} {'matmul MB':>10} {'x bf16':>7} {'s':>6}")
    ref_ppl, ref_out = None, None
    for name in args.only.split(","):
        method, group = FORMATS[name]
        t = time.perf_counter()
        if method == "gguf":
            params = load(args.model, quantization="gguf").params
        elif method == "bfloat16":
            params = cast_params(base.params, jnp.bfloat16)
        elif method is None:
            params = cast_params(base.params, jnp.float32)
        else:
            params = quantize_params(base.params, llama.MATMUL_INPUT_AXES, method, group)
        params = jax.tree_util.tree_map(jnp.asarray, params)
        nll, n = 0.0, 0
        for w in windows:
            logits = reference.full_logits(params, base.config, w).astype(np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            nll -= logp[np.arange(len(w) - 1), w[1:]].sum()
            n += len(w) - 1
        ppl = float(np.exp(nll / n))
        outs = [o.token_ids for o in reference.generate(params, base.config, prompts, [greedy] * len(prompts))]
        if ref_ppl is None:
            ref_ppl, ref_out = ppl, outs
        same = sum(a == b for a, b in zip(outs, ref_out))
        mm = param_bytes({n_: params["layers"][n_] for n_ in llama.MATMUL_INPUT_AXES})
        print(f"{name:<10} {ppl:>9.4f} {100 * (ppl / ref_ppl - 1):>+7.2f}% {same:>6}/{len(prompts):<5} "
              f"{mm / 1e6:>10.1f} {mm / bf16_bytes:>7.3f} {time.perf_counter() - t:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
