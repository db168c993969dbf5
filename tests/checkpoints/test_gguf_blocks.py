"""GGUF blocks kept as QTensors (checkpoints/gguf_blocks.py, `load_gguf(keep_blocks=True)`) against the
`gguf` package's own packer and dequantizer: random weights packed by `gguf.quants.quantize` decode to
exactly what `gguf.quants.dequantize` gives, and files written by gguf's writer (Q4_0, Q8_0) and the real
SmolLM2 file (Q4_1) load with every layer matmul weight kept in 4 or 8 bits, decoding to the float weights
the importer produces from the same file."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from jinfer.checkpoints.gguf_blocks import read_blocks, to_qtensor
from jinfer.checkpoints.gguf_import import load_gguf
from jinfer.quant.params import param_bytes
from jinfer.quant.qtensor import QTensor, dequantize
from jinfer.testing.tiny import TINY, tiny_params
from tests.checkpoints.gguf_writer import write_llama_gguf


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_blocks_decode_as_ggml_does(type_name):
    rng = np.random.default_rng(len(type_name))
    w = (rng.normal(size=(48, 160)) * rng.uniform(0.01, 2.0, size=(48, 1))).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[type_name]
    data = gguf.quants.quantize(w, qtype)
    want = gguf.quants.dequantize(data, qtype).astype(np.float32)

    q, scale, offset = read_blocks(data, type_name, 48, 160)
    assert scale.shape == (48, 5) and q.shape == (48, 160)
    got = q.astype(np.float32) * np.repeat(scale, 32, axis=1)
    if offset is not None:
        got = got + np.repeat(offset, 32, axis=1)
    np.testing.assert_array_equal(got, want)

    # As a QTensor of jinfer's [in, out] layout (a w_gate-like weight): rows are outputs.
    qt = to_qtensor(q, scale, offset, lambda a: a, (160,), (48,))
    assert qt.fmt == ("int8" if type_name == "Q8_0" else "int4") and qt.group_size == 32
    np.testing.assert_allclose(np.asarray(dequantize(qt)), want.T, rtol=0, atol=1e-6 * np.abs(want).max())


MATMULS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def assert_kept_equal_floats(path, want_fmt):
    config, floats, _ = load_gguf(path)
    _, kept, _ = load_gguf(path, keep_blocks=True)
    for name in MATMULS:
        qt = kept["layers"][name]
        assert isinstance(qt, QTensor) and qt.fmt == want_fmt and qt.group_size == 32, name
        want = floats["layers"][name]
        np.testing.assert_allclose(np.asarray(dequantize(qt)), want, rtol=0, atol=1e-6 * np.abs(want).max(),
                                   err_msg=name)
    for name in ("attn_norm", "mlp_norm"):
        np.testing.assert_array_equal(kept["layers"][name], floats["layers"][name])
    np.testing.assert_array_equal(kept["embed"], floats["embed"])
    return config, floats, kept


@pytest.mark.parametrize("qtype, fmt", [(gguf.GGMLQuantizationType.Q4_0, "int4"),
                                        (gguf.GGMLQuantizationType.Q8_0, "int8")])
def test_importer_keeps_a_written_files_blocks(tmp_path, qtype, fmt):
    params = {k: np.asarray(v) for k, v in tiny_params(4).items() if k != "layers"}
    params["layers"] = {k: np.asarray(v) for k, v in tiny_params(4)["layers"].items()}
    write_llama_gguf(tmp_path / "tiny.gguf", TINY, params, qtype=qtype)
    assert_kept_equal_floats(tmp_path / "tiny.gguf", fmt)


def test_the_default_models_q4_1_weights_stay_4_bit(smollm2_gguf):
    config, floats, kept = assert_kept_equal_floats(smollm2_gguf, "int4")
    bf16 = sum(floats["layers"][n].size * 2 for n in MATMULS)
    assert param_bytes({"layers": {n: kept["layers"][n] for n in MATMULS}}) <= 0.32 * bf16
