"""`jinfer quantize SRC DST`: the checkpoint it writes records its quantization, loads quantized with no flag,
and holds exactly the params that `quantize_calibrated` gives on the same calibration tokens."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jinfer.checkpoints.load import load
from jinfer.checkpoints.orbax_io import save_orbax
from jinfer.entrypoints import cli
from jinfer.entrypoints.quantize import calibration_sequences
from jinfer.models.calibration import llama_calibration
from jinfer.quant.calibrated import quantize_calibrated
from jinfer.quant.qtensor import is_qtensor
from jinfer.testing.tiny import TINY, tiny_params, tiny_tokenizer

WORDS = " ".join(f"w{int(t)}" for t in np.random.default_rng(0).integers(0, TINY.vocab_size, 300))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("float")
    save_orbax(path, TINY, jax.tree.map(np.asarray, tiny_params(4)), tiny_tokenizer())
    return path


def _leaves(params):
    return jax.tree_util.tree_leaves(params, is_leaf=is_qtensor)


def test_awq_checkpoint_round_trip(src, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text(WORDS)
    dst = tmp_path / "awq"
    argv = ["quantize", str(src), str(dst), "--method", "awq", "--bits", "4", "--group-size", "16",
            "--calibration", str(text), "--calibration-seq-len", "64"]
    assert cli.main(argv) == 0
    assert f"wrote {dst}" in capsys.readouterr().out
    loaded = load(dst)
    assert loaded.quantization == {"method": "awq", "bits": 4, "group_size": 16, "act": None}
    wq = loaded.params["layers"]["wq"]
    assert is_qtensor(wq) and (wq.fmt, wq.group_size) == ("int4", 16) and wq.input_scale is not None

    seqs = calibration_sequences(tiny_tokenizer(), WORDS, 64, 4096)
    assert [len(s) for s in seqs] == [64] * 4 + [44]
    want = quantize_calibrated(tiny_params(4), llama_calibration(TINY), "awq", 4, 16, seqs)
    for a, b in zip(_leaves(want), _leaves(loaded.params)):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    assert cli.main(argv) == 2  # the destination exists and --force was not given
    assert "exists" in capsys.readouterr().err


def test_errors_name_what_is_wrong(src, tmp_path, capsys):
    assert cli.main(["quantize", str(src), str(tmp_path / "a"), "--method", "gptq"]) == 2
    assert "needs calibration text" in capsys.readouterr().err
    assert cli.main(["quantize", str(src), str(tmp_path / "b"), "--method", "smoothquant", "--bits", "4"]) == 2
    assert "bits=4 must be one of [8]" in capsys.readouterr().err
    assert cli.main(["quantize", str(src), str(tmp_path / "c"), "--method", "rtn", "--bits", "8"]) == 0
    capsys.readouterr()
    assert load(tmp_path / "c").params["layers"]["w_up"].fmt == "int8"
    # A quantized checkpoint is not a source.
    assert cli.main(["quantize", str(tmp_path / "c"), str(tmp_path / "d"), "--method", "rtn"]) == 2
    assert "already quantized" in capsys.readouterr().err
