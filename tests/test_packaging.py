"""The package as pip builds it: one top-level name, every source package listed, and a plain (non-editable)
install that serves the tiny model with no source checkout and no tests/ folder in reach."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(out), str(ROOT)], check=True, capture_output=True, cwd=out)
    (whl,) = out.glob("jinfer-*.whl")
    return whl


def test_the_wheel_holds_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"jinfer"}
    assert "jinfer/kernels/paged_attention/ops.py" in names
    assert "jinfer/serve/proto/jinfer/v1/jinfer.proto" in names
    assert not [n for n in names if n.startswith("jinfer/tests/") or "/tests/" in n]


def test_every_source_package_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = set()
    for name, folder in cfg["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([name, *rel.parts]))
    assert on_disk == set(cfg["packages"])


def test_a_plain_install_serves_the_tiny_model(wheel, tmp_path):
    # A venv that sees this environment's dependencies (jax, grpcio, ...) but installs jinfer from the wheel
    # alone, run from an empty folder: nothing of the source checkout is importable.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py, cli = venv / "bin" / "python", venv / "bin" / "jinfer"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True,
                   capture_output=True, cwd=tmp_path)
    where = subprocess.run([str(py), "-c", "import jinfer, jinfer.kernels; print(jinfer.__file__); "
                            "print(jinfer.kernels.__file__)"], check=True, capture_output=True, text=True,
                           cwd=tmp_path).stdout.split()
    assert all(str(venv) in w for w in where), where
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([str(cli), "serve", "--model", "tiny-random", "--port", "0", "--no-compile-cache",
                             "--max-slots", "2", "--token-buckets", "8,32", "--num-pages", "64",
                             "--quantization", "int8"],  # jinfer.quant is in the wheel too
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port, log = None, []
        for line in proc.stderr:
            log.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "listening":
                port = record["port"]
            if record.get("event") == "serving":
                break
        assert port is not None and proc.poll() is None, "".join(log)
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
