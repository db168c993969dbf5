"""Quantized params in orbax checkpoints: QTensor leaves round-trip bit for bit with their static fields, the
checkpoint loads quantized with no flag, and a malformed record or array gets an error naming the tensor."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jinfer.checkpoints.errors import CheckpointError
from jinfer.checkpoints.load import LoadedModel, load
from jinfer.checkpoints.orbax_io import restore_orbax, save_orbax
from jinfer.inputs import SamplingParams
from jinfer.models import llama
from jinfer.quant.params import quantize_params
from jinfer.quant.qtensor import QTensor, is_qtensor
from jinfer.runtime import reference
from jinfer.runtime.matmul import kernel_layout
from jinfer.testing.tiny import TINY, tiny_params, tiny_tokenizer


def _quantized(method, group=None, seed=0):
    params = tiny_params(seed)
    # Two formats in one tree, as a mixed checkpoint (e.g. GGUF blocks beside float tensors) would have.
    mixed = quantize_params(params, {"w_down": 1}, "int8")
    return quantize_params(mixed, llama.MATMUL_INPUT_AXES, method, group)


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_qtensor)


@pytest.mark.parametrize("method, group", [("int4", 32), ("fp8", None)])
def test_quantized_round_trip_is_bit_identical(tmp_path, method, group):
    params = _quantized(method, group)
    save_orbax(tmp_path, TINY, params, tiny_tokenizer(), quantization={"method": "rtn", "format": method})
    _, got = restore_orbax(tmp_path)
    want_leaves, got_leaves = _leaves(params), _leaves(got)
    assert [p for p, _ in want_leaves] == [p for p, _ in got_leaves]
    n_quantized = 0
    for (path, a), (_, b) in zip(want_leaves, got_leaves):
        assert type(a) is type(b), jax.tree_util.keystr(path)
        if isinstance(a, QTensor):
            n_quantized += 1
            assert (a.fmt, a.n_in, a.n_out, a.group_size) == (b.fmt, b.n_in, b.n_out, b.group_size)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)
    assert n_quantized == len(llama.MATMUL_INPUT_AXES)
    assert got["layers"]["w_down"].fmt == "int8"  # the first quantization stayed; the second skipped it

    loaded = load(tmp_path)  # as `--model DST`: no quantization flag
    assert loaded.quantization == {"method": "rtn", "format": method}
    prompts, sampling = [[1, 2, 3, 4, 5]], [SamplingParams(max_tokens=8, temperature=0.0)]
    want = reference.generate(params, TINY, prompts, sampling)[0].token_ids
    assert reference.generate(loaded.params, TINY, prompts, sampling)[0].token_ids == want


def test_float_checkpoint_has_no_record(tmp_path):
    save_orbax(tmp_path, TINY, _quantized("int8"), tiny_tokenizer())
    save_orbax(tmp_path, TINY, tiny_params(0))  # overwritten with floats: the stale record goes too
    assert not (tmp_path / "quantization.json").exists()
    assert load(tmp_path).quantization is None


def _edit_record(path, name, **changes):
    file = path / "quantization.json"
    record = json.loads(file.read_text())
    record["leaves"][name].update(changes)
    file.write_text(json.dumps(record))


@pytest.mark.parametrize("change, match", [
    (dict(fmt="int3"), "'layers/wq' has format 'int3'"),
    (dict(group_size=16), "'layers/wq': scale has shape"),
    (dict(fmt="int8"), "'layers/wq': int8 values must be int8"),
    (dict(n_in=4), "'layers/wq': n_in=4 \\+ n_out=2 exceed"),
    (dict(arrays=["values"]), "'layers/wq' lists arrays"),
    (dict(layout="sideways"), "'layers/wq' has layout 'sideways'"),
])
def test_malformed_record_names_the_tensor(tmp_path, change, match):
    save_orbax(tmp_path, TINY, _quantized("int4", 32), tiny_tokenizer())
    _edit_record(tmp_path, "layers/wq", **change)
    with pytest.raises(CheckpointError, match=match):
        load(tmp_path)


def test_out_in_layout_round_trips_and_old_records_read_as_in_out(tmp_path):
    """A tree with int4 leaves stored "out_in" (the GPU kernel's) saves and restores bit for bit with its layout;
    a record written before layouts existed (no "layout" key) reads as "in_out"."""
    params = kernel_layout(_quantized("int4", 32), "", formats=("int4", "int8"))
    assert params["layers"]["wq"].layout == "out_in"
    save_orbax(tmp_path, TINY, params, tiny_tokenizer())
    _, got = restore_orbax(tmp_path)
    for (path, a), (_, b) in zip(_leaves(params), _leaves(got)):
        assert getattr(a, "layout", None) == getattr(b, "layout", None), jax.tree_util.keystr(path)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), jax.tree_util.keystr(path)

    save_orbax(tmp_path, TINY, _quantized("int4", 32), tiny_tokenizer())
    file = tmp_path / "quantization.json"
    record = json.loads(file.read_text())
    for leaf in record["leaves"].values():
        del leaf["layout"]
    file.write_text(json.dumps(record))
    assert load(tmp_path).params["layers"]["wq"].layout == "in_out"


def test_record_of_a_leaf_the_config_lacks(tmp_path):
    save_orbax(tmp_path, TINY, _quantized("int8"), tiny_tokenizer())
    file = tmp_path / "quantization.json"
    record = json.loads(file.read_text())
    record["leaves"]["layers/w_extra"] = record["leaves"]["layers/wq"]
    file.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="w_extra"):
        load(tmp_path)


def test_a_stored_quantized_checkpoint_refuses_a_second_quantization():
    from jinfer.engine.config import EngineConfig
    from jinfer.entrypoints.llm import LLM

    loaded = LoadedModel(TINY, _quantized("int8"), tiny_tokenizer(), quantization={"method": "rtn"})
    cfg = EngineConfig(max_slots=2, page_size=4, num_pages=16, token_buckets=(8,))
    with pytest.raises(ValueError, match="quantization='int4'.*stored quantized"):
        LLM(loaded, engine_config=cfg, warmup=False, quantization="int4")
    llm = LLM(loaded, engine_config=cfg, warmup=False)  # as stored
    assert llm.engine.config.quantization is None
