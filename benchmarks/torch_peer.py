"""The PyTorch peer a user would pick instead of jinfer: a gpt-fast-style Llama decoder in plain PyTorch.

Static KV cache [B, KV, max_len, H] per layer written with `index_copy_`, the decode step compiled with
`torch.compile(mode="reduce-overhead", fullgraph=True)` (CUDA graphs), the prefill compiled apart (no CUDA
graphs), random bf16 weights of a real shape (benchmarks/model_shapes.py), greedy argmax. All rows of a
batch have the same length, so one position vector serves the whole batch.

Reports, each beside its roofline and the ratio:
  decode step time at each of --batches (median of --steps, CUDA events): weight-read floor = parameter
  bytes / the device copy rate measured in the same run; the full roofline adds the K/V read at the
  context and the FLOPs at the measured matmul rate;
  offline generate: --num-requests requests of --input-len in / --output-len out in static batches of
  --batch-size, output tok/s over the whole run, prefill included (and its share printed).

    python benchmarks/torch_peer.py                                   # GPU: llama-3.1-8b, bf16, B 1 and 64
    python benchmarks/torch_peer.py --batches 1,64 --num-requests 0   # the step times only
    python benchmarks/torch_peer.py --batches "" --num-requests 128 --batch-size 128
    python benchmarks/torch_peer.py --shape smollm2-135m --no-compile --device cpu --batches 1,2 --steps 4 \
        --input-len 8 --output-len 4 --num-requests 2 --batch-size 2  # CPU smoke (runs --check too)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.model_shapes import SHAPES
from jinfer.models.config import ModelConfig, RopeScaling

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def rope_inv_freq(c: ModelConfig) -> torch.Tensor:
    """f32[head_dim // 2], the same math as jinfer.models.layers.rope_inv_freq (linear and llama3 scaling)."""
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
    rs = c.rope_scaling
    if rs is None:
        return inv
    if rs.kind == "linear":
        return inv / rs.factor
    old = rs.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / rs.low_freq_factor, inv / rs.factor, inv)
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= old / rs.high_freq_factor) & (wavelen <= old / rs.low_freq_factor)
    return torch.where(medium, blended, scaled)


def rms_norm(x, w, eps):
    # In float32 and cast back before the scale, as jinfer and HF do.
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def apply_rope(x, cos, sin):
    """x: [B, T, n, H]; cos/sin: f32[T, H/2]. HF's rotate_half layout (the two halves of H)."""
    cos, sin = cos.to(x.dtype)[None, :, None], sin.to(x.dtype)[None, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Block(nn.Module):
    def __init__(self, c: ModelConfig, dtype, device):
        super().__init__()
        D, N, K, H, Fi = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
        self.c = c

        def empty(*shape):
            return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)

        # Fused Q/K/V and gate/up projections: one GEMM each instead of three and two (as gpt-fast does).
        self.wqkv, self.wo = empty((N + 2 * K) * H, D), empty(D, N * H)
        self.w13, self.w2 = empty(2 * Fi, D), empty(D, Fi)
        self.attn_norm, self.mlp_norm = empty(D), empty(D)
        self.k_cache = self.v_cache = None

    def forward(self, x, cos, sin, input_pos, prefill: bool):
        c = self.c
        B, T, _ = x.shape
        N, K, H = c.num_heads, c.num_kv_heads, c.head_dim
        G = N // K
        q, k, v = F.linear(rms_norm(x, self.attn_norm, c.rms_norm_eps), self.wqkv).split([N * H, K * H, K * H], -1)
        q = apply_rope(q.view(B, T, N, H), cos, sin).transpose(1, 2)  # [B, N, T, H]
        k = apply_rope(k.view(B, T, K, H), cos, sin).transpose(1, 2)  # [B, K, T, H]
        v = v.view(B, T, K, H).transpose(1, 2)
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        if prefill:
            # The prompt starts the sequence (input_pos = 0..T-1), so it attends to itself alone: a causal
            # flash kernel, no cache read. Repeating the prompt's K/V is cheap beside the prefill GEMMs.
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                               is_causal=True)
        else:
            # The G query heads of a KV head ride as G*T query rows against it, so the cache is read once
            # rather than repeated G times; head n = kv * G + g, jinfer's (and HF's) grouping.
            S = self.k_cache.shape[2]
            mask = torch.arange(S, device=x.device)[None, :] <= input_pos[:, None]  # [T, S]: positions <= current
            o = F.scaled_dot_product_attention(q.reshape(B, K, G * T, H), self.k_cache, self.v_cache,
                                               attn_mask=mask.repeat(G, 1))
        x = x + F.linear(o.reshape(B, N, T, H).transpose(1, 2).reshape(B, T, N * H), self.wo)
        gate, up = F.linear(rms_norm(x, self.mlp_norm, c.rms_norm_eps), self.w13).chunk(2, -1)
        return x + F.linear(F.silu(gate) * up, self.w2)


class Llama(nn.Module):
    """Weights in torch's Linear layout [out, in]; `embed` [V, D], `lm_head` [V, D] (the embedding when tied)."""

    def __init__(self, c: ModelConfig, max_len: int, dtype=torch.bfloat16, device="cpu"):
        super().__init__()
        if c.attention_bias:
            raise ValueError("the peer has no Q/K/V biases (a Llama)")
        self.c, self.max_len = c, max_len
        p = dict(dtype=dtype, device=device)
        self.embed = nn.Parameter(torch.empty(c.vocab_size, c.hidden_size, **p), requires_grad=False)
        self.layers = nn.ModuleList(Block(c, dtype, device) for _ in range(c.num_layers))
        self.final_norm = nn.Parameter(torch.empty(c.hidden_size, **p), requires_grad=False)
        self.lm_head = self.embed if c.tie_word_embeddings else nn.Parameter(
            torch.empty(c.vocab_size, c.hidden_size, **p), requires_grad=False)
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * rope_inv_freq(c)[None]
        self.register_buffer("cos", freqs.cos().to(device), persistent=False)
        self.register_buffer("sin", freqs.sin().to(device), persistent=False)

    @torch.no_grad()
    def init_random_(self, seed: int = 0):
        """N(0, 1/fan_in) matmul weights (0.016 at D=4096), unit embeddings, unit norms."""
        g = torch.Generator(self.embed.device).manual_seed(seed)
        for name, w in self.named_parameters():
            if name.endswith("norm"):
                w.fill_(1.0)
            else:
                w.normal_(0.0, 1.0 if name == "embed" else w.shape[1] ** -0.5, generator=g)
        return self

    def setup_caches(self, batch: int):
        c, dev, dt = self.c, self.embed.device, self.embed.dtype
        g = torch.Generator(dev).manual_seed(1)
        for blk in self.layers:
            # Random, not zeros: slots past the current position must be hidden by the mask, and are.
            blk.k_cache, blk.v_cache = (torch.randn(batch, c.num_kv_heads, self.max_len, c.head_dim, device=dev,
                                                    dtype=dt, generator=g) for _ in range(2))
            if dev.type == "cuda":  # fixed addresses, so CUDA graphs take the in-place writes as static inputs
                torch._dynamo.mark_static_address(blk.k_cache)
                torch._dynamo.mark_static_address(blk.v_cache)

    def forward(self, tokens, input_pos, prefill: bool = False, last_only: bool = True):
        """tokens: i64[B, T], input_pos: i64[T] (shared by the rows) -> logits [B, 1 or T, V]."""
        x = F.embedding(tokens, self.embed)
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        for blk in self.layers:
            x = blk(x, cos, sin, input_pos, prefill)
        if last_only:  # the prefill's [B, T, V] logits would not fit at 8B shapes
            x = x[:, -1:]
        return F.linear(rms_norm(x, self.final_norm, self.c.rms_norm_eps), self.lm_head)


def make_steps(model: Llama, compile_: bool):
    """(prefill, decode): each (tokens, input_pos) -> next greedy tokens i64[B, 1]."""
    def prefill(tokens, input_pos):
        return model(tokens, input_pos, prefill=True).argmax(-1)

    def decode(tokens, input_pos):
        return model(tokens, input_pos).argmax(-1)

    if not compile_:
        return prefill, decode
    import torch._inductor.config

    torch._inductor.config.coordinate_descent_tuning = True  # gpt-fast's setting: tunes the pointwise/reduction kernels
    decode_c = torch.compile(decode, mode="reduce-overhead", fullgraph=True, dynamic=False)

    def decode_graphed(tokens, input_pos):
        torch.compiler.cudagraph_mark_step_begin()
        return decode_c(tokens, input_pos).clone()  # the graph's output buffer is overwritten by the next replay

    return torch.compile(prefill, fullgraph=True, dynamic=False), decode_graphed


# ---- clocks and rooflines ------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device, fn, n):
    """fn() n times back to back; -> list of seconds per call (CUDA events on the GPU, no host syncs between)."""
    if device.type != "cuda":
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return out
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    ev[0].record()
    for i in range(n):
        fn()
        ev[i + 1].record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in zip(ev, ev[1:])]


def copy_bandwidth(device) -> float:
    """Bytes/s of a device copy, (read + write) / time, best of 10; ~2 GB on the GPU."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(timed(device, lambda: dst.copy_(src), 10))
    return 2 * n * src.element_size() / best


def matmul_rate(device, dtype) -> float:
    """FLOP/s of a square matmul, best of 10: 8192 in the model's dtype on the GPU; on the CPU, whose bf16
    square matmuls can run slower than its skinny decode ones, 1024 in float32."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = dtype if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    return 2 * n**3 / min(timed(device, lambda: a @ b, 10))


class Roofline:
    def __init__(self, model: Llama, bw: float, flops: float):
        c = self.c = model.c
        self.bw, self.peak = bw, flops
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # the embedding too
        self.elem = model.embed.element_size()
        N, K, H, D = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
        self.layer_mm = c.num_layers * (D * (N + 2 * K) * H + N * H * D + 3 * D * c.intermediate_size)
        self.head_mm = D * c.vocab_size

    def kv_bytes(self, B, ctx):
        c = self.c
        return 2 * c.num_layers * B * c.num_kv_heads * ctx * c.head_dim * self.elem

    def attn_flops(self, B, T, ctx):
        return 4 * self.c.num_layers * B * T * ctx * self.c.num_heads * self.c.head_dim

    def decode(self, B, ctx):
        """Fewest seconds for one token per row at context ctx: weights + live K/V read, or the FLOPs."""
        flops = 2 * B * (self.layer_mm + self.head_mm) + self.attn_flops(B, 1, ctx)
        return max((self.weight_bytes + self.kv_bytes(B, ctx)) / self.bw, flops / self.peak)

    def prefill(self, B, T):
        flops = 2 * B * T * self.layer_mm + 2 * B * self.head_mm + self.attn_flops(B, T, T) / 2  # causal
        return max((self.weight_bytes + self.kv_bytes(B, T)) / self.bw, flops / self.peak)


# ---- the measurements ----------------------------------------------------------------------------------

def bench_decode(model, steps_fns, roof, B, args, device, gen):
    _, decode = steps_fns
    model.setup_caches(B)
    tok = torch.randint(0, model.c.vocab_size, (B, 1), device=device, generator=gen)
    pos = torch.tensor([args.input_len], device=device)
    state = {"tok": tok, "i": 0}
    span = args.max_len - args.input_len

    def step():
        state["tok"] = decode(state["tok"], pos)
        state["i"] += 1
        if state["i"] % span:  # walk the context from input_len to max_len, then start over
            pos.add_(1)
        else:
            pos.fill_(args.input_len)

    t = time.perf_counter()
    for _ in range(3):  # compile, CUDA-graph warm-up, record
        step()
    sync(device)
    first = time.perf_counter() - t
    timed(device, step, args.warmup)
    ms = statistics.median(timed(device, step, args.steps)) * 1e3
    floor_w = roof.weight_bytes / roof.bw * 1e3
    floor = roof.decode(B, args.input_len) * 1e3
    print(f"decode B={B}: {ms:.3f} ms/step (median of {args.steps}; first 3 steps {first:.1f}s), "
          f"{B / ms * 1e3:,.1f} tok/s | weight-read floor {floor_w:.3f} ms ({roof.weight_bytes / 1e9:.2f} GB at "
          f"{roof.bw / 1e12:.3g} TB/s, {B / floor_w * 1e3:,.0f} tok/s): floor/step {floor_w / ms:.2f} | with K/V at "
          f"ctx {args.input_len} and FLOPs {floor:.3f} ms: {floor / ms:.2f}")


def mark(device):
    """A point on the device's clock, taken without a host sync (seconds between two: `between`)."""
    if device.type != "cuda":
        return time.perf_counter()
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


def between(a, b) -> float:
    if isinstance(a, float):
        return b - a
    b.synchronize()
    return a.elapsed_time(b) / 1e3


def generate_group(steps_fns, prompts, output_len):
    """Greedy: prefill the [B, T] prompts, then output_len - 1 decode steps, with no host syncs.
    -> (tokens i64[B, output_len], clock marks at start and after the prefill)."""
    prefill, decode = steps_fns
    B, T = prompts.shape
    dev = prompts.device
    out = torch.empty(B, output_len, dtype=torch.long, device=dev)
    start = mark(dev)
    tok = prefill(prompts, torch.arange(T, device=dev))
    prefilled = mark(dev)
    out[:, 0] = tok[:, 0]
    pos = torch.tensor([T], device=dev)
    for i in range(1, output_len):
        tok = decode(tok, pos)
        out[:, i] = tok[:, 0]
        pos.add_(1)
    return out, (start, prefilled)


def bench_generate(model, steps_fns, roof, args, device, gen):
    prompts = torch.randint(0, model.c.vocab_size, (args.num_requests, args.input_len), device=device, generator=gen)
    groups = list(prompts.split(args.batch_size))
    for size in sorted({len(g) for g in groups}):  # compile and record each batch size before the clock
        model.setup_caches(size)
        t = time.perf_counter()
        generate_group(steps_fns, groups[0][:size], min(args.output_len, 8))  # 3 decodes: compile, record, replay
        sync(device)
        print(f"generate warm-up, batch {size}: {time.perf_counter() - t:.1f}s")
    outs, marks = [], []
    sync(device)
    t0 = time.perf_counter()
    for g in groups:
        if model.layers[0].k_cache.shape[0] != len(g):
            model.setup_caches(len(g))
        out, m = generate_group(steps_fns, g, args.output_len)
        outs.append(out)
        marks.append(m)
    sync(device)
    wall = time.perf_counter() - t0
    prefill_s = sum(between(a, b) for a, b in marks)
    n_out = sum(o.numel() for o in outs)
    floor = sum(roof.prefill(len(g), args.input_len)
                + sum(roof.decode(len(g), args.input_len + i) for i in range(1, args.output_len)) for g in groups)
    print(f"generate: {args.num_requests} requests, {args.input_len} in / {args.output_len} out, static batches of "
          f"{args.batch_size}: {n_out} output tokens in {wall:.2f}s (prefill {prefill_s:.2f}s of it) -> "
          f"{n_out / wall:,.1f} output tok/s | roofline {floor:.2f}s ({n_out / floor:,.0f} tok/s): {floor / wall:.2f}")


# ---- correctness ---------------------------------------------------------------------------------------

TINY = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   intermediate_size=128, rope_theta=10000.0, max_position_embeddings=256,
                   # original length 32: the head-dim-16 wavelengths (6 .. 20,000) fall in all three bands
                   rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 32))


@torch.no_grad()
def cached_vs_full(model: Llama, tokens, prefix: int):
    """Logits of the static-cache path (prefill `prefix` tokens, then one decode step per token) and of one
    full-sequence causal forward; both [B, T - prefix + 1, V], from position prefix - 1 on."""
    B, T = tokens.shape
    dev = tokens.device
    model.setup_caches(B)
    full = model(tokens, torch.arange(T, device=dev), prefill=True, last_only=False)[:, prefix - 1:]
    model.setup_caches(B)
    got = [model(tokens[:, :prefix], torch.arange(prefix, device=dev), prefill=True)]
    for t in range(prefix, T):
        got.append(model(tokens[:, t:t + 1], torch.tensor([t], device=dev)))
    return torch.cat(got, 1), full


def check(device):
    model = Llama(TINY, max_len=40, dtype=torch.float32, device=device).init_random_(0)
    tokens = torch.randint(0, TINY.vocab_size, (2, 24), device=device, generator=torch.Generator(device).manual_seed(0))
    got, want = cached_vs_full(model, tokens, prefix=5)
    diff = (got - want).abs().max().item()
    print(f"check (tiny f32 config, llama3 rope): max |cached decode - full forward| = {diff:.2e} "
          f"(logits up to {want.abs().max().item():.1f})")
    assert diff < 1e-4, diff


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--batches", default="1,64", help="decode batch sizes to time, comma-separated ('' for none)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--num-requests", type=int, default=128, help="0: skip the generate workload")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=None, help="cache length; default input + output")
    ap.add_argument("--no-compile", action="store_true", help="eager (the CPU, or to see what compiling buys)")
    ap.add_argument("--check", action="store_true", help="cached decode against a full forward (always on CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    args.max_len = args.max_len or args.input_len + args.output_len
    if args.max_len < args.input_len + args.output_len:
        ap.error("--max-len must hold --input-len + --output-len")
    device = torch.device(args.device)
    compile_ = not args.no_compile
    if compile_ and device.type != "cuda":
        ap.error("reduce-overhead compiles to CUDA graphs; pass --no-compile off the GPU")

    torch.set_grad_enabled(False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}; {'compiled (reduce-overhead)' if compile_ else 'eager'}")
    if args.check or device.type == "cpu":
        check(device)

    c, dtype = SHAPES[args.shape], DTYPES[args.dtype]
    t = time.perf_counter()
    model = Llama(c, args.max_len, dtype, device).init_random_(0)
    sync(device)
    built = time.perf_counter() - t
    roof = Roofline(model, copy_bandwidth(device), matmul_rate(device, dtype))
    print(f"model {args.shape} ({sum(p.numel() for p in model.parameters()) / 1e6:,.0f}M params, {args.dtype}, "
          f"built in {built:.1f}s); cache {args.max_len} tokens; device copy {roof.bw / 1e12:.3g} TB/s, "
          f"matmul {roof.peak / 1e12:.3g} TFLOP/s (measured now)")
    steps_fns = make_steps(model, compile_)
    gen = torch.Generator(device).manual_seed(0)
    for B in [int(b) for b in args.batches.split(",") if b.strip()]:
        bench_decode(model, steps_fns, roof, B, args, device, gen)
    if args.num_requests:
        bench_generate(model, steps_fns, roof, args, device, gen)


if __name__ == "__main__":
    main()
