"""The `jinfer` command line in subprocesses: convert, generate from the converted checkpoint, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer.checkpoints.load import load
from jinfer.runtime import reference

pytestmark = pytest.mark.slow


def _jinfer(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "jinfer.entrypoints.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def orbax_dir(smollm2_gguf, tmp_path_factory):
    dst = tmp_path_factory.mktemp("ckpt") / "smollm2"
    res = _jinfer("convert", str(smollm2_gguf), str(dst))
    assert res.returncode == 0, res.stderr
    return dst


def test_orbax_round_trip_is_bit_identical(orbax_dir, smollm2):
    restored = load(orbax_dir)
    assert restored.config == smollm2.config
    ids = smollm2.tokenizer.encode("Bit-identical logits, please.")
    want = reference.full_logits(smollm2.params, smollm2.config, ids)
    got = reference.full_logits(jax.tree_util.tree_map(jnp.asarray, restored.params), restored.config, ids)
    np.testing.assert_array_equal(got, want)
    assert restored.tokenizer.encode("Bit-identical logits, please.") == ids


def test_generate_streams_from_the_converted_checkpoint(orbax_dir):
    res = _jinfer("generate", "The capital of France is", "--model", str(orbax_dir), "--temperature", "0",
                  "--max-tokens", "4", env={"JINFER_CACHE": str(orbax_dir.parent / "cache")})
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("The capital of France is Paris")


def test_convert_refuses_to_overwrite(orbax_dir, smollm2_gguf):
    res = _jinfer("convert", str(smollm2_gguf), str(orbax_dir))
    assert res.returncode == 2 and "exists" in res.stderr


def test_missing_model_is_a_clear_error(tmp_path):
    res = _jinfer("generate", "hi", "--model", str(tmp_path / "nothing.gguf"))
    assert res.returncode == 2
    assert "nothing.gguf" in res.stderr and "Traceback" not in res.stderr
