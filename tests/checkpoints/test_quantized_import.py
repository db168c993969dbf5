"""Quantized HF checkpoints (AutoAWQ, GPTQ, compressed-tensors) load with their layer matmul weights kept
quantized, checked against files written by the formats' own packers:
- AutoAWQ GEMM and AutoGPTQ (4-bit, 8-bit, act-order): the files in data/, written by AutoAWQ 0.2.9's and
  AutoGPTQ 0.7.1's packers together with their own dequantization (make_awq_gptq_fixtures.py says how);
- compressed-tensors: written here, in each test, by the `compressed-tensors` package (a test dependency):
  its scales and zero points from its own `calculate_qparams`, its compressors packing a transformers Llama,
  its decompressor giving the reference weights.
Each imported weight dequantizes exactly to the packer's dequantization (computed with float32 scales, which
is exact for fp16 / bf16 ones), and the model's logits equal those of the packer's dequantized float model.
Malformed or unsupported files raise CheckpointError naming the tensor."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jinfer.checkpoints.errors import CheckpointError
from jinfer.checkpoints.hf_names import get_leaf, hf_tensors
from jinfer.checkpoints.load import load
from jinfer.checkpoints.safetensors_io import load_hf_dir
from jinfer.checkpoints.tensor_files import TensorFiles
from jinfer.quant.qtensor import QTensor, dequantize
from jinfer.runtime import reference
from jinfer.testing.tiny import TINY, tiny_tokenizer

DATA = Path(__file__).parent / "data"
TOKENS = [3, 17, 42, 5, 9, 60, 1, 33, 20, 7]
# fixture -> (the QTensor format every layer matmul weight keeps, its group size); None: dequantized to float
PACKED = {"awq_gemm": ("int4", 16), "gptq_4bit": ("int4", 16), "gptq_8bit": ("int8", 16), "gptq_act_order": None}


def _assert_matches(config, params, dequantized: dict[str, np.ndarray], want_fmt, want_group):
    """Every dequantized weight of the packer equals the imported leaf's, bit for bit."""
    checked = 0
    for spec in hf_tensors(config):
        if spec.hf_name not in dequantized:
            continue
        leaf = get_leaf(params, spec.leaf)
        if want_fmt is None:
            assert not isinstance(leaf, QTensor), spec.hf_name
            got = np.asarray(leaf[spec.layer])
        else:
            assert isinstance(leaf, QTensor) and leaf.fmt == want_fmt and leaf.group_size == want_group, spec.hf_name
            got = np.asarray(dequantize(leaf))[spec.layer]
        np.testing.assert_array_equal(got, spec.to_jinfer(dequantized[spec.hf_name]), err_msg=spec.hf_name)
        checked += 1
    assert checked == 7 * config.num_layers


def _float_dir(dst: Path, quantized: Path, dequantized: dict[str, np.ndarray]) -> Path:
    """An HF float directory with the quantized checkpoint's float tensors and the packer's dequantized
    weights: the model the quantized one stands for."""
    dst.mkdir()
    cfg = json.loads((quantized / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    file = quantized / "model.safetensors"
    with safe_open(str(file), framework="numpy") as f:
        t = TensorFiles(dict.fromkeys(f.keys(), file), file)
    kept = {}
    for name in t.files:
        a = t.get(name)
        if a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16:
            kept[name] = np.asarray(a, np.float32)
    kept.update({k: np.asarray(v, np.float32) for k, v in dequantized.items()})
    save_file(kept, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _assert_same_logits(quantized: Path, float_dir: Path, dtype=np.float32):
    config, params = load_hf_dir(quantized, dtype=dtype)
    _, want = load_hf_dir(float_dir, dtype=dtype)
    got = reference.full_logits(params, config, TOKENS)
    np.testing.assert_allclose(got, reference.full_logits(want, config, TOKENS), rtol=1e-5, atol=1e-5)


# --- AutoAWQ and GPTQ: the packers' files in data/ ---------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PACKED))
def test_packed_weights_dequantize_as_the_packer_does(name):
    d = DATA / name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, params = load_hf_dir(d, dtype=np.float32)
    fmt, group = PACKED[name] or (None, None)
    _assert_matches(config, params, load_file(str(d / "dequantized.safetensors")), fmt, group)
    floated = [str(w.message) for w in caught if "dequantized to float" in str(w.message)]
    assert (len(floated) == 1 and "act-order" in floated[0]) if fmt is None else not floated


@pytest.mark.parametrize("name", ["awq_gemm", "gptq_act_order"])
def test_packed_model_forward_equals_the_packers_float_model(tmp_path, name):
    d = DATA / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _assert_same_logits(d, _float_dir(tmp_path / "float", d, load_file(str(d / "dequantized.safetensors"))))


def test_load_reports_the_stored_quantization_and_the_engine_keeps_it(tmp_path):
    from jinfer.engine.config import EngineConfig
    from jinfer.entrypoints.llm import LLM
    from jinfer.inputs import SamplingParams

    d = tmp_path / "awq"
    shutil.copytree(DATA / "awq_gemm", d)
    tiny_tokenizer(64).save(d)
    loaded = load(d)
    assert loaded.quantization == {"method": "awq", "bits": 4, "group_size": 16}
    assert all(isinstance(loaded.params["layers"][k], QTensor) for k in ("wq", "wo", "w_down"))
    cfg = EngineConfig(max_slots=2, page_size=4, num_pages=16, token_buckets=(16,))
    llm = LLM(loaded, engine_config=cfg, warmup=False)
    assert llm.engine.config.quantization is None  # nothing quantized again at load
    sampling = SamplingParams(max_tokens=4, temperature=0.0)
    out = llm.generate([TOKENS], sampling, use_tqdm=False)[0].token_ids
    assert out == reference.generate(loaded.params, loaded.config, [TOKENS], [sampling])[0].token_ids


def _copy(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    shutil.copytree(DATA / name, d)
    (d / "dequantized.safetensors").unlink()
    return d


def _edit_tensors(d: Path, edit) -> None:
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_wrong_qweight_shape_names_the_tensor(tmp_path):
    d = _copy(tmp_path, "awq_gemm")
    name = "model.layers.1.self_attn.q_proj.qweight"
    _edit_tensors(d, lambda t: t.update({name: np.ascontiguousarray(t[name][:-1])}))
    with pytest.raises(CheckpointError, match=rf"{name}.*shape \[31, 8\].*\[32, 8\]"):
        load_hf_dir(d)


def test_missing_scales_names_the_tensor(tmp_path):
    d = _copy(tmp_path, "gptq_4bit")
    name = "model.layers.0.mlp.down_proj.scales"
    _edit_tensors(d, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"{name}.*missing"):
        load_hf_dir(d)


@pytest.mark.parametrize("name, changes, match", [
    ("gptq_4bit", {"bits": 3}, r"q_proj: GPTQ with bits=3"),
    ("awq_gemm", {"bits": 8}, r"q_proj: AWQ with bits=8"),
    ("awq_gemm", {"version": "gemv"}, r"q_proj: AWQ .*version='gemv'"),
    ("awq_gemm", {"group_size": 24}, r"layers\.0\.self_attn\.q_proj: AWQ groups of 24 over 32 inputs"),
    ("gptq_4bit", {"group_size": 8}, r"q_proj\.qzeros.*shape \[2, 8\].*\[4, 8\]"),
    ("gptq_4bit", {"checkpoint_format": "marlin"}, r"checkpoint_format 'marlin'"),
    ("gptq_4bit", {"quant_method": "bitsandbytes"}, r"quant_method='bitsandbytes'"),
])
def test_unsupported_or_mismatched_config_names_the_problem(tmp_path, name, changes, match):
    d = _copy(tmp_path, name)
    _edit_config(d, **changes)
    with pytest.raises(CheckpointError, match=match):
        load_hf_dir(d)


# --- compressed-tensors: written by the package in the test -------------------------------------------------

CT_CASES = {
    # id: (format, weights arguments, the QTensor format and group size each weight keeps, None: float)
    "pack4-group-asym": ("pack-quantized", dict(num_bits=4, strategy="group", group_size=32, symmetric=False),
                         ("int4", 32)),
    "pack4-channel-sym": ("pack-quantized", dict(num_bits=4, strategy="channel", symmetric=True), ("int4", 0)),
    "pack8-group-sym": ("pack-quantized", dict(num_bits=8, strategy="group", group_size=32, symmetric=True),
                        ("int8", 32)),
    "int8-channel-sym": ("int-quantized", dict(num_bits=8, strategy="channel", symmetric=True), ("int8", 0)),
    "int8-tensor-asym": ("int-quantized", dict(num_bits=8, strategy="tensor", symmetric=False), None),
    "fp8-channel": ("float-quantized", dict(num_bits=8, type="float", strategy="channel", symmetric=True),
                    ("fp8", 0)),
    "fp8-tensor": ("float-quantized", dict(num_bits=8, type="float", strategy="tensor", symmetric=True), ("fp8", 0)),
    "fp8-block": ("float-quantized", dict(num_bits=8, type="float", strategy="block", block_structure=[32, 32],
                                          symmetric=True), ("fp8", 32)),
}


def _ct_minmax(w, args):
    """The min and max each scale covers, shaped as compressed-tensors shapes that scale."""
    import torch

    if args.strategy == "group":
        g = w.reshape(w.shape[0], -1, args.group_size)
        return g.amin(-1), g.amax(-1)
    if args.strategy == "channel":
        return w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    if args.strategy == "block":
        r, c = args.block_structure
        b = w.reshape(w.shape[0] // r, r, w.shape[1] // c, c)
        return b.amin((1, 3)), b.amax((1, 3))
    return w.amin().reshape(1), w.amax().reshape(1) + torch.zeros(1)


def write_compressed_tensors(d: Path, fmt: str, weights: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """A bf16 transformers Llama of TINY's shape compressed by compressed-tensors into `d`; returns the
    package's decompression of each quantized weight (float32 [out, in] by HF name)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY.to_hf_config())).to(torch.bfloat16)
    qcfg = QuantizationConfig(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                              ignore=["lm_head"], format=fmt)
    apply_quantization_config(model, qcfg)
    for m in model.modules():
        if hasattr(m, "weight_scale"):
            args = m.quantization_scheme.weights
            scale, zero = calculate_qparams(*_ct_minmax(m.weight.data.float(), args), args)
            m.weight_scale.data = scale.to(m.weight_scale.dtype).reshape(m.weight_scale.shape)
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data = zero.to(m.weight_zero_point.dtype).reshape(m.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(d)
    compressor.update_config(d)
    model.float()  # the scales in float32 (exactly), so the package's decompression rounds nothing
    compressor.decompress_model(model)
    return {f"{name}.weight": m.weight.data.numpy().copy() for name, m in model.named_modules()
            if name.startswith("model.layers.") and isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("case", sorted(CT_CASES))
def test_compressed_tensors_dequantize_as_the_package_does(tmp_path, case):
    fmt, weights, kept = CT_CASES[case]
    dequantized = write_compressed_tensors(tmp_path, fmt, weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, params = load_hf_dir(tmp_path, dtype=np.float32)
    _assert_matches(config, params, dequantized, *(kept or (None, None)))
    assert any("dequantized to float" in str(w.message) for w in caught) == (kept is None)


@pytest.mark.parametrize("case", ["pack4-group-asym", "fp8-block"])
def test_compressed_tensors_forward_equals_the_packages_float_model(tmp_path, case):
    fmt, weights, _ = CT_CASES[case]
    q = tmp_path / "q"
    dequantized = write_compressed_tensors(q, fmt, weights)
    _assert_same_logits(q, _float_dir(tmp_path / "float", q, dequantized))
    tiny_tokenizer(TINY.vocab_size).save(q)
    assert load(q).quantization == {"method": "compressed-tensors", "format": fmt}


def test_compressed_tensors_malformed(tmp_path):
    write_compressed_tensors(tmp_path, *CT_CASES["pack4-group-asym"][:2])
    cfg = json.loads((tmp_path / "config.json").read_text())
    weights = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    for changes, match in [({"num_bits": 2}, r"model\.layers\.0\.self_attn\.q_proj: 2-bit int weights"),
                           ({"group_size": 24}, r"q_proj.*group_size 24 does not divide the 64 inputs"),
                           ({"group_size": 16}, r"q_proj\.weight_scale.*shape \[64, 2\].*\[64, 4\]")]:
        bad = tmp_path / f"bad{len(changes)}-{list(changes.values())[0]}"
        shutil.copytree(tmp_path, bad, ignore=shutil.ignore_patterns("bad*"))
        cfg_bad = json.loads(json.dumps(cfg))
        cfg_bad["quantization_config"]["config_groups"]["group_0"]["weights"] = {**weights, **changes}
        (bad / "config.json").write_text(json.dumps(cfg_bad))
        with pytest.raises(CheckpointError, match=match):
            load_hf_dir(bad)
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    tensors = load_torch(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight_zero_point"]
    save_torch(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight_zero_point.*missing"):
        load_hf_dir(tmp_path)
