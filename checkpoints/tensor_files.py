"""Reading single tensors by name from a set of safetensors files, in every dtype quantized checkpoints use.

safetensors' numpy reader knows neither bfloat16 (the scales of most HF checkpoints) nor float8 (FP8
weights), so this reads the format itself: an 8-byte little-endian header length, a JSON header mapping each
name to its dtype, shape and byte range of the data that follows. Arrays come back memory-mapped (no copy
until a caller converts them); every problem raises CheckpointError naming the tensor and the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from jinfer.checkpoints.errors import CheckpointError

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


class TensorFiles:
    """The tensors of one checkpoint: `files` maps each tensor name to the safetensors file holding it."""

    def __init__(self, files: dict[str, Path], listing: Path):
        self.files = files
        self.listing = listing  # the file that lists them (the single file or the shards' index), for errors
        self._headers: dict[Path, tuple[dict, int]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _entry(self, name: str) -> tuple[dict, int, Path]:
        if name not in self.files:
            raise CheckpointError(f"tensor {name!r} is missing from {str(self.listing)!r}")
        file = self.files[name]
        if file not in self._headers:
            self._headers[file] = _read_header(file)
        header, data_start = self._headers[file]
        if name not in header:
            raise CheckpointError(f"tensor {name!r} is missing from {str(file)!r}")
        return header[name], data_start, file

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)[0]["shape"])

    def get_checked(self, name: str, shape: tuple, kinds: str) -> np.ndarray:
        """The tensor, checked to have `shape` and a numpy dtype kind in `kinds` ('i' ints, 'f' floats (bfloat16
        and float8 too))."""
        got = self.shape(name)
        if got != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {list(got)}; the format and config.json imply "
                                  f"{list(shape)}")
        a = self.get(name)
        kind = "f" if a.dtype.kind == "V" or a.dtype in (DTYPES["BF16"], DTYPES["F8_E4M3"]) else a.dtype.kind
        if kind not in kinds:
            what = " or ".join({"i": "integers", "f": "floats"}[k] for k in kinds)
            raise CheckpointError(f"tensor {name!r} is {a.dtype}; the format stores {what} there")
        return a

    def get(self, name: str) -> np.ndarray:
        entry, data_start, file = self._entry(name)
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"tensor {name!r} in {str(file)!r} has dtype {entry.get('dtype')!r} or a "
                                  f"malformed header entry ({e}); jinfer reads {sorted(DTYPES)}") from e
        if end - begin != int(np.prod(shape)) * dtype.itemsize or file.stat().st_size < data_start + end:
            raise CheckpointError(f"tensor {name!r} in {str(file)!r}: its bytes [{begin}, {end}) do not hold "
                                  f"{entry['dtype']}{list(shape)} (truncated or corrupt file?)")
        if not shape or 0 in shape:
            return np.zeros(shape, dtype)
        return np.memmap(file, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


def _read_header(file: Path) -> tuple[dict, int]:
    """(name -> header entry, offset of the data) of one safetensors file."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(file)!r} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{str(file)!r}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + n
