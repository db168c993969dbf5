"""`jinfer convert SRC DST`: any loadable checkpoint to an orbax one (params, config.json, tokenizer)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from jinfer.checkpoints.errors import CheckpointError


def convert(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False) -> Path:
    from tqdm import tqdm

    from jinfer.checkpoints.load import load
    from jinfer.checkpoints.orbax_io import save_orbax

    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise CheckpointError(f"destination {str(dst)!r} exists; pass overwrite=True (--force) to replace it")
    loaded = load(src, progress=lambda it: tqdm(it, desc="importing tensors", unit="tensor"))
    # Written beside the destination and renamed, so an interrupted convert leaves no half checkpoint.
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save_orbax(tmp, loaded.config, loaded.params, loaded.tokenizer)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst
