"""Writes tests/checkpoints/data/{awq_gemm, gptq_4bit, gptq_8bit, gptq_act_order}/ with the packers of AutoAWQ
(0.2.9, `WQLinear_GEMM.from_linear`) and AutoGPTQ (0.7.1, `qlinear_cuda.QuantLinear.pack`, the v1 format):
each directory holds config.json (with the packer's quantization_config), model.safetensors as the packer
stores it (fp16), and dequantized.safetensors: every packed weight as the packer's own dequantization gives it
(`awq.utils.packing_utils.dequantize_gemm`; AutoGPTQ's torch forward on an identity matrix), in float32 and
HF's [out, in] layout. The test reads these files; it never runs our code to write them.

Neither package installs beside torch 2.13 (AutoAWQ pulls triton and datasets, AutoGPTQ wants a CUDA build,
and GPTQModel needs torch >= 2.14), so this script downloads their releases with `pip download --no-deps`
and imports the two pure-torch modules by path, without the packages' __init__ (which imports the rest).
Run it by hand, from the repository root, only to regenerate the files:

    python tests/checkpoints/make_awq_gptq_fixtures.py

The weights are made exactly representable, w = (q - zero) * scale with random q, zeros and fp16 scales, so
that both packers' rounding recovers q exactly (the quantization search is not the format); GPTQ's zeros
avoid 0, which the v1 format's "zero minus one" would store as -1 and spill into the neighbouring zeros.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tarfile
import tempfile
import types
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from jinfer.models.config import ModelConfig

OUT = Path(__file__).parent / "data"
# Small enough that the files stay small; two layers so that stacking is exercised; every input count is a
# multiple of the group size 16 and every output count of 32 (AutoAWQ's packer needs both).
CONFIG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32,
                     intermediate_size=64, max_position_embeddings=64, eos_token_ids=(), bos_token_id=None)
GROUP = 16
MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def _stub_packages(root: Path, *names: str) -> None:
    """Registers `names` as packages rooted in `root` without running their __init__.py."""
    for name in names:
        mod = types.ModuleType(name)
        mod.__path__ = [str(root / name.replace(".", "/"))]
        sys.modules[name] = mod


def _packers(tmp: Path):
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp),
                    "autoawq==0.2.9", "auto-gptq==0.7.1"], check=True)
    with tarfile.open(next(tmp.glob("autoawq-0.2.9.tar.gz"))) as t:
        t.extractall(tmp, filter="data")
    with zipfile.ZipFile(next(tmp.glob("auto_gptq-0.7.1-*.whl"))) as z:
        z.extractall(tmp / "auto_gptq_whl")
    _stub_packages(tmp / "autoawq-0.2.9", "awq", "awq.modules", "awq.modules.linear", "awq.utils")
    _stub_packages(tmp / "auto_gptq_whl", "auto_gptq", "auto_gptq.nn_modules", "auto_gptq.nn_modules.qlinear")
    gemm = importlib.import_module("awq.modules.linear.gemm")
    packing = importlib.import_module("awq.utils.packing_utils")
    gptq = importlib.import_module("auto_gptq.nn_modules.qlinear.qlinear_cuda")
    return gemm.WQLinear_GEMM, packing.dequantize_gemm, gptq.QuantLinear


def _shapes(c: ModelConfig) -> dict[str, tuple[int, int]]:
    D, N, K, H, F = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
    return dict(zip(MODULES, [(N * H, D), (K * H, D), (K * H, D), (D, N * H), (F, D), (F, D), (D, F)]))


def _random_weight(rng, out: int, n_in: int, bits: int, zeros: str, g_idx: np.ndarray):
    """(fp16 linear, q, fp16 scales [out, groups], zeros [out, groups]) with w = (q - zero) * scale exactly."""
    G = n_in // GROUP
    q = rng.integers(0, 1 << bits, size=(out, n_in))
    zero = {"asym": rng.integers(1, 1 << bits, size=(out, G)), "sym": np.full((out, G), 1 << (bits - 1))}[zeros]
    scale = rng.uniform(0.002, 0.05, size=(out, G)).astype(np.float16)
    w = (q - zero[:, g_idx]) * scale[:, g_idx].astype(np.float64)
    linear = torch.nn.Linear(n_in, out, bias=False, dtype=torch.float16)
    linear.weight.data = torch.tensor(w, dtype=torch.float16)
    return linear, torch.tensor(scale), torch.tensor(zero, dtype=torch.float16)


def _float_tensors(rng, c: ModelConfig) -> dict[str, torch.Tensor]:
    def f16(*shape, scale=0.5):
        return torch.tensor(rng.normal(size=shape) * scale, dtype=torch.float16)

    t = {"model.embed_tokens.weight": f16(c.vocab_size, c.hidden_size), "lm_head.weight": f16(c.vocab_size, c.hidden_size),
         "model.norm.weight": 1 + f16(c.hidden_size, scale=0.1)}
    for i in range(c.num_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[f"model.layers.{i}.{norm}.weight"] = 1 + f16(c.hidden_size, scale=0.1)
    return t


def _write(name: str, qcfg: dict, tensors: dict, dequantized: dict) -> None:
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    config = {**CONFIG.to_hf_config(), "torch_dtype": "float16", "quantization_config": qcfg}
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
    save_file(dequantized, str(d / "dequantized.safetensors"), metadata={"format": "pt"})


def awq(rng, WQLinear_GEMM, dequantize_gemm) -> None:
    tensors, dequantized = _float_tensors(rng, CONFIG), {}
    for i in range(CONFIG.num_layers):
        for module, (out, n_in) in _shapes(CONFIG).items():
            linear, scale, zero = _random_weight(rng, out, n_in, 4, "asym", np.arange(n_in) // GROUP)
            # AutoAWQ's scales and zeros are [groups, out].
            packed = WQLinear_GEMM.from_linear(linear, 4, GROUP, scales=scale.T.contiguous(), zeros=zero.T.contiguous())
            prefix = f"model.layers.{i}.{module}"
            tensors.update({f"{prefix}.qweight": packed.qweight, f"{prefix}.qzeros": packed.qzeros,
                            f"{prefix}.scales": packed.scales})
            w = dequantize_gemm(packed.qweight, packed.qzeros, packed.scales.float(), 4, GROUP)  # [in, out]
            dequantized[f"{prefix}.weight"] = w.T.contiguous()
    # As AutoAWQ's save_quantized writes it through transformers' AwqConfig.
    qcfg = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None}
    _write("awq_gemm", qcfg, tensors, dequantized)


def gptq(rng, QuantLinear, name: str, bits: int, zeros: str, act_order: bool) -> None:
    tensors, dequantized = _float_tensors(rng, CONFIG), {}
    for i in range(CONFIG.num_layers):
        for module, (out, n_in) in _shapes(CONFIG).items():
            # Act-order quantizes the inputs in a permuted order, so input perm[j] falls in group j // GROUP.
            g_idx = np.arange(n_in) // GROUP
            if act_order:
                g_idx[rng.permutation(n_in)] = np.arange(n_in) // GROUP
            linear, scale, zero = _random_weight(rng, out, n_in, bits, zeros, g_idx)
            layer = QuantLinear(bits, GROUP, n_in, out, bias=False, weight_dtype=torch.float16)
            layer.pack(linear, scale, zero, torch.tensor(g_idx, dtype=torch.int32))
            prefix = f"model.layers.{i}.{module}"
            tensors.update({f"{prefix}.qweight": layer.qweight, f"{prefix}.qzeros": layer.qzeros,
                            f"{prefix}.scales": layer.scales, f"{prefix}.g_idx": layer.g_idx})
            layer.scales = layer.scales.float()  # the packer's dequantization, without fp16 rounding
            with torch.no_grad():
                w = layer(torch.eye(n_in))  # [in, out]
            dequantized[f"{prefix}.weight"] = w.T.contiguous()
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": GROUP, "desc_act": act_order, "sym": zeros == "sym",
            "checkpoint_format": "gptq", "static_groups": False, "true_sequential": True, "damp_percent": 0.01}
    _write(name, qcfg, tensors, dequantized)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        WQLinear_GEMM, dequantize_gemm, QuantLinear = _packers(Path(tmp))
        rng = np.random.default_rng(13)
        awq(rng, WQLinear_GEMM, dequantize_gemm)
        gptq(rng, QuantLinear, "gptq_4bit", 4, "asym", act_order=False)
        gptq(rng, QuantLinear, "gptq_8bit", 8, "sym", act_order=False)
        gptq(rng, QuantLinear, "gptq_act_order", 4, "asym", act_order=True)


if __name__ == "__main__":
    main()
