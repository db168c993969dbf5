"""Quality of each weight format on SmolLM2: perplexity on a held-out text and greedy agreement with float32.

    python benchmarks/quant_quality.py [--model smollm2] [--text /usr/share/common-licenses/GPL-3]
                                       [--window 512] [--windows 16] [--prompts 16] [--new 32]

Every format runs through the engine as a user asks for it (`LLM(..., kv_cache_dtype=...)` on the format's
params). Perplexity: the text tokenized once, cut into non-overlapping windows of --window tokens (at most
--windows of them), each scored alone from the engine's prompt logprobs (`jinfer.entrypoints.perplexity`,
what `jinfer perplexity` runs); every token but a window's first is predicted. The default text,
the GNU GPL v3 as Debian ships it, is English prose that no calibration here uses. Greedy agreement: the
share of --prompts prompts (cut from a second text, the GFDL 1.3, at varied lengths) whose --new-token
greedy continuation equals float32's. Also the bytes of the layers' matmul weights and that over bf16's, and
the KV cache's bytes per token (K and V of every layer, scales included). `kv int8` / `kv fp8`: float32
weights with the KV pages quantized.

Calibrated methods (`jinfer.quant.calibrated`: RTN, GPTQ, AWQ at int4; W8A8 with and without SmoothQuant)
quantize with --calibration-tokens tokens of other license texts (--calibration, never the GPL-3 or GFDL-1.3
scored here), cut into windows of --calibration-window tokens:

    python benchmarks/quant_quality.py --windows 14 --formats "float32,int4 g128,gptq int4 g128,awq int4 g128"

`int4 g128 folded` (also int8, fp8): rounded with the norm gains in the weights (`llama.fold_norms` first).
"""

from __future__ import annotations

import argparse
import gc
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
    "int4 g64": ("int4", 64),
    "int4 g32": ("int4", 32),
    "gguf": ("gguf", None),
    "kv int8": (None, None),
    "kv fp8": (None, None),
}
KV_FORMATS = {"kv int8": "int8", "kv fp8": "fp8"}  # float32 weights, the KV cache quantized
# q/k/v and gate/up fused, each layer's norm gains multiplied into the float weights, then rounded: what one GPU's
# runner would do if it rounded the gains into quantized weights (it does not: int4 lost twice as much, RESULTS.md
# session 37; it carries them as the weights' input scales, `qtensor.times_input_gain`, which leaves the rounded
# numbers as they are). The engine here runs that form through XLA.
FOLDED = {"int8 folded": ("int8", None), "int4 g128 folded": ("int4", 128), "fp8 folded": ("fp8", None),
          "bfloat16 folded": ("bfloat16", None)}  # what one GPU runs by default: the gains folded, then cast
CALIBRATED = {  # name: (jinfer.quant.calibrated method, bits, group size, options)
    "rtn int4 g128": ("rtn", 4, 128, {}),
    "gptq int4 g128": ("gptq", 4, 128, {}),
    "gptq-act int4 g128": ("gptq", 4, 128, {"act_order": True}),
    "awq int4 g128": ("awq", 4, 128, {}),
    "gptq int4 g64": ("gptq", 4, 64, {}),
    "awq int4 g64": ("awq", 4, 64, {}),
    "rtn int4 g32": ("rtn", 4, 32, {}),
    "gptq int4 g32": ("gptq", 4, 32, {}),
    "awq int4 g32": ("awq", 4, 32, {}),
    "gptq int8": ("gptq", 8, 0, {}),
    "awq int8": ("awq", 8, 0, {}),
    "w8a8": ("w8a8", 8, 0, {}),
    "smoothquant w8a8": ("smoothquant", 8, 0, {}),
}
CALIBRATION_TEXTS = ",".join(f"/usr/share/common-licenses/{n}" for n in ("Apache-2.0", "MPL-2.0", "Artistic",
                                                                          "BSD", "LGPL-2.1"))


def main():
    import jax

    from jinfer.checkpoints.load import LoadedModel, load
    from jinfer.entrypoints.llm import LLM
    from jinfer.entrypoints.perplexity import perplexity
    from jinfer.inputs import SamplingParams
    from jinfer.models import llama
    from jinfer.models.calibration import llama_calibration
    from jinfer.quant.calibrated import quantize_calibrated
    from jinfer.quant.kv import kv_token_bytes
    from jinfer.quant.params import param_bytes, quantize_params

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--prompt-text", default="/usr/share/common-licenses/GFDL-1.3")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--only", "--formats", dest="only", default=",".join(FORMATS),
                    help=f"comma-separated, of {list(FORMATS) + list(FOLDED) + list(CALIBRATED)}")
    ap.add_argument("--calibration", default=CALIBRATION_TEXTS, help="comma-separated texts to calibrate on")
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--calibration-window", type=int, default=512)
    args = ap.parse_args()
    for f in (args.text, args.prompt_text):
        if f in args.calibration.split(","):
            raise SystemExit(f"--calibration must not include the scored text {f}")

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
    calib = base.tokenizer.encode("\n\n".join(open(f).read() for f in args.calibration.split(",")))
    cw = args.calibration_window
    calib = [np.asarray(calib[i:i + cw], np.int32) for i in range(0, len(calib) - cw + 1, cw)][
        :max(1, args.calibration_tokens // cw)]
    print(f"calibration: {len(calib)} windows of {cw} tokens from {args.calibration}", flush=True)
    print(f"{'format':<18} {'ppl':>9} {'vs f32':>8} {'greedy==f32':>12} {'matmul MB':>10} {'x bf16':>7} "
          f"{'KV B/tok':>9} {'s':>6}")
    scored = ids[:len(windows) * args.window]
    ref_ppl, ref_out = None, None
    for name in args.only.split(","):
        method, group = FORMATS.get(name, (None, None))
        t = time.perf_counter()
        kv_cache_dtype, dtype = KV_FORMATS.get(name), "float32"
        if name in CALIBRATED:
            cmethod, bits, cgroup, options = CALIBRATED[name]
            params = quantize_calibrated(base.params, llama_calibration(base.config), cmethod, bits, cgroup, calib,
                                         **options)
        elif method == "gguf":
            params = load(args.model, quantization="gguf").params
        elif name in FOLDED:
            method, group = FOLDED[name]
            params = llama.fold_norms(llama.fuse_projections(base.params))
            if method == "bfloat16":
                dtype = method
            else:
                params = quantize_params(params, llama.MATMUL_INPUT_AXES | llama.FUSED_INPUT_AXES, method, group)
        elif method in (None, "bfloat16"):
            params, dtype = base.params, method or "float32"
        else:
            params = quantize_params(base.params, llama.MATMUL_INPUT_AXES, method, group)
        # Through the engine as a user runs it: perplexity from prompt logprobs, greedy from generate.
        llm = LLM(LoadedModel(base.config, params, base.tokenizer), dtype=dtype, kv_cache_dtype=kv_cache_dtype)
        result = perplexity(llm, scored, args.window)
        ppl = result.perplexity
        outs = [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        if ref_ppl is None:
            ref_ppl, ref_out = ppl, outs
        same = sum(a == b for a, b in zip(outs, ref_out))
        layers = llm.engine.runner.params["layers"]
        layers = layers if isinstance(layers, dict) else {n_: [w[n_] for w in layers] for n_ in layers[0]}
        mm = param_bytes({n_: layers[n_] for n_ in llama.MATMUL_INPUT_AXES | llama.FUSED_INPUT_AXES if n_ in layers})
        kv_bytes = kv_token_bytes(base.config.num_layers, base.config.num_kv_heads, base.config.head_dim, dtype,
                                  kv_cache_dtype)
        print(f"{name:<18} {ppl:>9.4f} {100 * (ppl / ref_ppl - 1):>+7.2f}% {same:>6}/{len(prompts):<5} "
              f"{mm / 1e6:>10.1f} {mm / bf16_bytes:>7.3f} {kv_bytes:>9} {time.perf_counter() - t:>6.0f}", flush=True)
        del llm, params, layers
        gc.collect()

if __name__ == "__main__":
    main()
