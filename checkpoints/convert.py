"""`jinfer convert SRC DST`: any loadable checkpoint to an orbax one (params, config.json, tokenizer)."""

from __future__ import annotations

import os
from pathlib import Path

from jinfer.checkpoints.errors import CheckpointError


def convert(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False) -> Path:
    from tqdm import tqdm

    from jinfer.checkpoints.load import load
    from jinfer.checkpoints.orbax_io import save_orbax_atomic

    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:  # checked before the import, which can take minutes
        raise CheckpointError(f"destination {str(dst)!r} exists; pass overwrite=True (--force) to replace it")
    loaded = load(src, progress=lambda it: tqdm(it, desc="importing tensors", unit="tensor"))
    return save_orbax_atomic(dst, loaded.config, loaded.params, loaded.tokenizer)
