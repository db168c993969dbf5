"""Two processes on localhost form one jax.distributed job (CPU, gloo, two devices each): a forward with the
params sharded over both equals the single-process logits, and `jinfer batch` spread over both hosts merges
into the single-process output, in input order."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from jinfer import LLM
from jinfer.checkpoints.load import LoadedModel
from jinfer.checkpoints.safetensors_io import save_hf_dir
from jinfer.engine.config import EngineConfig
from jinfer.entrypoints.batch import run_batch
from jinfer.runtime import reference
from jinfer.testing.tiny import TINY_MESH as CONFIG
from jinfer.testing.tiny import tiny_params, tiny_tokenizer
from tests.entrypoints.test_batch import untimed
from tests.scripts.multihost_check import TOKENS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_job_equals_one_process(tmp_path):
    params = tiny_params(4, CONFIG)
    save_hf_dir(tmp_path / "model", CONFIG, params)
    tok = tiny_tokenizer(CONFIG.vocab_size)
    tok.save(tmp_path / "model")
    rng = np.random.default_rng(3)
    lines = [json.dumps({"id": i, "prompt": [int(t) for t in rng.integers(0, 128, int(rng.integers(1, 30)))],
                         "max_tokens": int(rng.integers(1, 10)), "temperature": 0, "ignore_eos": True})
             for i in range(9)]
    lines.insert(4, json.dumps({"prompt": [1], "top_p": 2.0}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")

    root = Path(__file__).resolve().parents[2]
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(root / "tests" / "scripts" / "multihost_check.py"), str(pid), port,
                               str(tmp_path)], env={**os.environ, "PYTHONPATH": str(root)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for pid in (0, 1)]
    for pid, p in enumerate(procs):
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, f"process {pid}:\n{out}\n{err[-3000:]}"
        assert f"host {pid} of 2: 5 completed" in err or f"host {pid} of 2: 4 completed" in err, err[-2000:]

    want = reference.full_logits(params, CONFIG, TOKENS)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), want, rtol=0, atol=1e-5)

    merged = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert not list(tmp_path.glob("out.jsonl.host*")), "the hosts' shares are removed once merged"
    llm = LLM(LoadedModel(CONFIG, params, tok), engine_config=EngineConfig(max_slots=4, num_pages=128))
    run_batch(llm, tmp_path / "in.jsonl", tmp_path / "single.jsonl", progress=False)
    single = [json.loads(x) for x in (tmp_path / "single.jsonl").read_text().splitlines()]
    assert len(merged) == len(lines) and "top_p=2.0" in merged[4]["error"]
    assert [untimed(r) if "usage" in r else r for r in merged] == [untimed(r) if "usage" in r else r for r in single]
