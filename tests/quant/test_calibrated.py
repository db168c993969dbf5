"""Calibrated weight quantization: the QTensor paths it adds (per-input scales, int8 activations) against
dequantize-then-dot and an explicit int8 simulation; GPTQ, AWQ and SmoothQuant against round to nearest on a
layer whose inputs are correlated and have outlier channels (the case they exist for), measured on held-out
inputs; and the whole flow on a tiny model, run by the dense reference and by the engine."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.models import llama
from jinfer.models.calibration import llama_calibration
from jinfer.quant.awq import awq_quantize
from jinfer.quant.calibrated import quantize_calibrated
from jinfer.quant.calibration import calibrate_layers
from jinfer.quant.formats import check_recorded_quantization, recorded_quantization
from jinfer.quant.gptq import gptq_quantize
from jinfer.quant.qtensor import QTensor, dequantize, qeinsum
from jinfer.quant.rtn import quantize
from jinfer.quant.smoothquant import smoothquant_quantize, w8a8_quantize
from jinfer.testing.tiny import TINY, tiny_params

SPECS = [((48, 3, 16), 1, "BTD,DNH->BTNH"), ((3, 16, 40), 2, "BTNH,NHD->BTD")]


def random_qtensor(rng, shape, n_in, fmt, group, act=None):
    w = rng.normal(size=shape).astype(np.float32)
    qt = quantize(jnp.asarray(w), fmt=fmt, n_in=n_in, group_size=group)
    s = rng.uniform(0.2, 5.0, size=shape[:n_in]).astype(np.float32)
    return dataclasses.replace(qt, input_scale=jnp.asarray(s), act=act)


@pytest.mark.parametrize("shape, n_in, spec", SPECS)
@pytest.mark.parametrize("fmt, group", [("int4", 16), ("int8", 0)])
def test_input_scale_divides_the_activation(shape, n_in, spec, fmt, group):
    rng = np.random.default_rng(0)
    qt = random_qtensor(rng, shape, n_in, fmt, group)
    x = rng.normal(size=(2, 5, *shape[:n_in])).astype(np.float32)
    stored = np.asarray(dequantize(qt, keep_input_scale=True))
    s = np.asarray(qt.input_scale).reshape(shape[:n_in] + (1,) * (len(shape) - n_in))
    np.testing.assert_allclose(np.asarray(dequantize(qt)), stored / s, rtol=1e-6)  # the weight it stands for
    got = np.asarray(qeinsum(spec, jnp.asarray(x), qt))
    np.testing.assert_allclose(got, np.einsum(spec, x / np.asarray(qt.input_scale), stored), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got, np.einsum(spec, x, np.asarray(dequantize(qt))), rtol=1e-4, atol=1e-4)
    assert qt.nbytes == sum(a.nbytes for a in (qt.values, qt.scale, qt.input_scale)) + (
        0 if qt.offset is None else qt.offset.nbytes)


def int8_simulation(spec, x, qt: QTensor, n_in):
    """W8A8 by hand: x / s rounded per token to int8, the integer dot exact in int64, then both scales."""
    x = x / (1.0 if qt.input_scale is None else np.asarray(qt.input_scale))
    axes = tuple(range(x.ndim - n_in, x.ndim))
    amax = np.abs(x).max(axis=axes, keepdims=True)
    xs = np.where(amax > 0, amax / 127.0, 1.0)
    xq = np.clip(np.round(x / xs), -127, 127).astype(np.int64)
    acc = np.einsum(spec, xq, np.asarray(qt.values).astype(np.int64))
    return acc * xs.reshape(x.shape[:x.ndim - n_in] + (1,) * (qt.values.ndim - n_in)) * np.asarray(qt.scale)[0]


@pytest.mark.parametrize("shape, n_in, spec", SPECS)
@pytest.mark.parametrize("with_scale", [False, True])
def test_int8_activations_equal_an_explicit_int8_simulation(shape, n_in, spec, with_scale):
    rng = np.random.default_rng(1)
    qt = random_qtensor(rng, shape, n_in, "int8", 0, act="int8")
    if not with_scale:
        qt = dataclasses.replace(qt, input_scale=None)
    x = rng.normal(size=(2, 5, *shape[:n_in])).astype(np.float32)
    x[0, 0] = 0.0  # an all-zero token: scale 1, output 0
    got = np.asarray(qeinsum(spec, jnp.asarray(x), qt))
    want = int8_simulation(spec, x, qt, n_in)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(got[0, 0]).max() == 0
    # And close to the float matmul with the weight it stands for (int8 activations cost ~1% here).
    ref = np.einsum(spec, x, np.asarray(dequantize(qt)))
    assert np.linalg.norm(got - ref) < 0.02 * np.linalg.norm(ref)


def test_int8_activations_need_per_channel_int8_weights():
    qt = quantize(jnp.ones((64, 8)), fmt="int4", n_in=1, group_size=32)
    with pytest.raises(ValueError, match="QTensor.act='int8'.*fmt='int4', group_size=32"):
        dataclasses.replace(qt, act="int8")
    with pytest.raises(ValueError, match="QTensor.act='fp8'"):
        dataclasses.replace(quantize(jnp.ones((64, 8)), fmt="int8", n_in=1), act="fp8")


def test_recorded_quantization_names_the_field():
    assert recorded_quantization("smoothquant", 8, None) == {"method": "smoothquant", "bits": 8, "group_size": 0,
                                                              "act": "int8"}
    assert recorded_quantization("awq", 4, None)["group_size"] == 128
    assert check_recorded_quantization({"method": "gptq", "bits": 4, "group_size": 32, "act": None})["bits"] == 4
    with pytest.raises(ValueError, match="bits=4 must be one of \\[8\\] for method='w8a8'"):
        recorded_quantization("w8a8", 4, 0)
    with pytest.raises(ValueError, match="group_size=128 must be 0"):
        recorded_quantization("smoothquant", 8, 128)
    with pytest.raises(ValueError, match="quantization.act=None does not match"):
        check_recorded_quantization({"method": "w8a8", "bits": 8, "group_size": 0, "act": None})


def correlated_inputs(rng, tokens, n, outliers=(3, 77, 150), outlier_gain=(20.0, 12.0, 30.0)):
    """Tokens whose channels are mixtures of a few shared factors plus noise, with a few large channels (as
    LLM activations have), and a fixed per-token norm spread."""
    factors = np.random.default_rng(7).normal(size=(16, n)) / 4.0  # the same mixing for every call
    x = rng.normal(size=(tokens, 16)) @ factors + 0.3 * rng.normal(size=(tokens, n))
    x[:, list(outliers)] *= np.asarray(outlier_gain)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(3)
    n, m = 256, 96
    w = (rng.normal(size=(n, m)) / np.sqrt(n)).astype(np.float32)
    return w, correlated_inputs(rng, 2048, n), correlated_inputs(rng, 1024, n)


def output_error(qt, w, x):
    return float(np.linalg.norm(np.asarray(qeinsum("TD,DF->TF", jnp.asarray(x), qt)) - x @ w))


@pytest.mark.parametrize("group", [128, 32])
def test_gptq_and_awq_beat_round_to_nearest_at_int4(layer, group):
    w, calib, held_out = layer
    rtn = output_error(quantize(jnp.asarray(w), fmt="int4", n_in=1, group_size=group), w, held_out)
    gptq = output_error(gptq_quantize(jnp.asarray(w), jnp.asarray(calib), n_in=1, bits=4, group_size=group), w,
                        held_out)
    gptq_act = output_error(gptq_quantize(jnp.asarray(w), jnp.asarray(calib), n_in=1, bits=4, group_size=group,
                                          act_order=True), w, held_out)
    awq = awq_quantize(jnp.asarray(w), jnp.asarray(calib), n_in=1, bits=4, group_size=group)
    assert awq.input_scale is not None and float(jnp.std(awq.input_scale)) > 0  # it chose α > 0
    awq = output_error(awq, w, held_out)
    assert gptq < 0.6 * rtn, (gptq, rtn)
    assert gptq_act <= rtn, (gptq_act, rtn)
    assert awq < 0.8 * rtn, (awq, rtn)


def test_gptq_gives_the_rtn_layout():
    """Same fields, shapes and dtypes as RTN's QTensor (a wo-like weight, two input axes, a short last group),
    each weight near its float value (GPTQ moves weights by the compensation, not far)."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(4, 10, 8)).astype(np.float32)
    for bits, group in ((4, 32), (8, 0)):
        qt = gptq_quantize(jnp.asarray(w), jnp.asarray(rng.normal(size=(512, 40)), jnp.float32), n_in=2,
                           bits=bits, group_size=group)
        ref = quantize(jnp.asarray(w), fmt=f"int{bits}", n_in=2, group_size=group)
        assert jax.tree_util.tree_structure(qt) == jax.tree_util.tree_structure(ref)
        assert [(a.shape, a.dtype) for a in jax.tree_util.tree_leaves(qt)] == [
            (a.shape, a.dtype) for a in jax.tree_util.tree_leaves(ref)]
        assert np.abs(np.asarray(dequantize(qt)) - w).max() < 2 * float(ref.scale.max())


def test_smoothquant_beats_plain_w8a8_on_outlier_channels(layer):
    w, calib, held_out = layer
    x_calib = calib.copy()
    x_test = held_out.copy()
    for x in (x_calib, x_test):  # stronger outliers, as SmoothQuant's case (100x channels)
        x[:, [10, 200]] *= 100.0
    plain = output_error(w8a8_quantize(jnp.asarray(w), n_in=1), w, x_test)
    smooth = output_error(smoothquant_quantize(jnp.asarray(w), jnp.asarray(x_calib), n_in=1), w, x_test)
    assert smooth < 0.35 * plain, (smooth, plain)


def test_stages_compute_the_forward():
    """With no weight quantized, the stages end where `llama.forward` does (before its final norm)."""
    from jinfer.models.layers import rms_norm
    from jinfer.runtime import reference

    params = tiny_params(0)
    model = llama_calibration(TINY)
    seq = np.arange(1, 20, dtype=np.int32)

    @jax.jit
    def run(params, tokens):
        carry = model.embed(params, tokens)
        for layer in range(TINY.num_layers):
            p = jax.tree_util.tree_map(lambda a, i=layer: a[i], params["layers"])
            for stage in model.stages:
                _, carry = stage.run(p, carry)
            carry = model.finish(p, carry)
        return carry

    carry = run(params, jnp.asarray(seq[None]))
    h = rms_norm(carry, params["final_norm"], TINY.rms_norm_eps)
    got = np.asarray(llama.logits_from_hidden(params, h, TINY))[0]
    np.testing.assert_allclose(got, reference.full_logits(params, TINY, list(seq)), rtol=1e-4, atol=1e-4)


def test_each_stage_sees_the_quantized_weights_before_it():
    """calibrate_layers hands each weight the inputs computed with every earlier weight already replaced."""
    params = tiny_params(0)
    model = llama_calibration(TINY)
    seen = []

    def record(w, x, n_in):  # zero weights: every later input differs from the float model's
        seen.append(np.asarray(x))
        return quantize(jnp.zeros_like(w), fmt="int8", n_in=n_in)

    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, TINY.vocab_size, n).astype(np.int32) for n in (9, 5)]
    out = calibrate_layers(params, model, seqs, record)
    assert len(seen) == 7 * TINY.num_layers and all(len(x) == 14 for x in seen)  # padding dropped
    assert np.abs(seen[3]).max() == 0  # wo's input is attention over v = 0
    assert out["layers"]["wq"].values.shape == params["layers"]["wq"].shape


@pytest.fixture(scope="module")
def calibration_tokens():
    rng = np.random.default_rng(6)
    return [rng.integers(0, TINY.vocab_size, n).astype(np.int32) for n in (48, 31, 64, 17, 40)]


@pytest.mark.parametrize("method, bits, group", [("gptq", 4, 32), ("awq", 4, 32), ("smoothquant", 8, 0),
                                                 ("w8a8", 8, 0), ("rtn", 4, 32)])
def test_quantize_calibrated_runs_in_the_dense_reference(method, bits, group, calibration_tokens):
    from jinfer.runtime import reference

    params = tiny_params(1)
    calls = []
    q = quantize_calibrated(params, llama_calibration(TINY), method, bits, group, calibration_tokens,
                            progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i + 1, TINY.num_layers) for i in range(TINY.num_layers)]
    for name in llama.MATMUL_INPUT_AXES:
        qt = q["layers"][name]
        assert isinstance(qt, QTensor) and qt.shape == params["layers"][name].shape, name
        assert qt.act == ("int8" if bits == 8 else None)
        assert (qt.input_scale is not None) == (method in ("awq", "smoothquant")), name
    seq = list(calibration_tokens[0][:24])
    ref = reference.full_logits(params, TINY, seq)
    got = reference.full_logits(q, TINY, seq)
    assert np.isfinite(got).all()
    assert np.abs(got - ref).mean() < 0.2 * np.abs(ref).mean()


def test_engine_runs_calibrated_params_as_the_reference_does(calibration_tokens):
    from jinfer.engine.config import EngineConfig
    from jinfer.runtime import reference
    from jinfer.runtime.build import build_engine
    from tests.engine.test_engine import greedy, run_workload

    params = tiny_params(2)
    q = quantize_calibrated(params, llama_calibration(TINY), "smoothquant", 8, 0, calibration_tokens)
    cfg = EngineConfig(max_slots=2, page_size=4, num_pages=16, token_buckets=(8,), max_prefill_chunk=8)
    eng = build_engine(TINY, q, None, cfg, seed=0)
    rng = np.random.default_rng(3)
    arrivals = [(0, list(rng.integers(0, TINY.vocab_size, n)), greedy(6)) for n in (5, 11)]
    outs = run_workload(eng, arrivals)
    want = reference.generate(q, TINY, [a[1] for a in arrivals], [a[2] for a in arrivals])
    assert [outs[i].token_ids for i in range(len(arrivals))] == [w.token_ids for w in want]
