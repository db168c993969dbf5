"""`jinfer quantize SRC DST`: a float checkpoint quantized once, offline, into an orbax checkpoint that records
how (quantization.json), so `--model DST` loads it quantized with no other flag."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jinfer.checkpoints.errors import CheckpointError


def calibration_sequences(tokenizer, text: str, seq_len: int, max_tokens: int) -> list[np.ndarray]:
    """The text's tokens cut into consecutive sequences of `seq_len` (at most `max_tokens` in all; a last
    shorter piece is kept when it has at least 16 tokens)."""
    if seq_len < 2 or max_tokens < 2:
        raise ValueError(f"calibration_seq_len={seq_len} and calibration_tokens={max_tokens} must be at least 2")
    ids = np.asarray(tokenizer.encode(text), np.int32)[:max_tokens]
    pieces = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)]
    pieces = [p for p in pieces if len(p) >= min(16, seq_len)]
    if not pieces:
        raise ValueError(f"the calibration text has {len(ids)} tokens; at least {min(16, seq_len)} are needed")
    return pieces


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, method: str, bits: int,
                        group_size: int | None = None, calibration: str | os.PathLike | None = None,
                        calibration_tokens: int = 4096, calibration_seq_len: int = 512, act_order: bool = False,
                        overwrite: bool = False, progress: bool = True) -> Path:
    """Loads `src` (anything `load` takes, in float32), quantizes its layer matmul weights by `method`
    ("rtn", "gptq", "awq", "smoothquant", "w8a8") to `bits`, and writes `dst`. The calibrated methods read
    up to `calibration_tokens` tokens of the text file `calibration`; `act_order`: GPTQ's column order."""
    from jinfer.checkpoints.load import load
    from jinfer.checkpoints.orbax_io import save_orbax_atomic
    from jinfer.models.calibration import llama_calibration
    from jinfer.quant.calibrated import quantize_calibrated
    from jinfer.quant.formats import NEEDS_CALIBRATION, recorded_quantization

    record = recorded_quantization(method, bits, group_size)  # checked before the minutes of loading
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise CheckpointError(f"destination {str(dst)!r} exists; pass overwrite=True (--force) to replace it")
    if method in NEEDS_CALIBRATION and calibration is None:
        raise ValueError(f"method={method!r} needs calibration text (--calibration FILE)")
    text = None
    if calibration is not None:
        try:
            text = Path(calibration).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise FileNotFoundError(f"calibration={str(calibration)!r}: {e}") from e
    loaded = load(src)
    if loaded.quantization is not None:
        raise ValueError(f"{str(src)!r} is already quantized ({loaded.quantization}); quantize a float checkpoint")
    seqs = [] if text is None else calibration_sequences(loaded.tokenizer, text, calibration_seq_len,
                                                         calibration_tokens)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=loaded.config.num_layers, desc=f"quantizing ({method}, {bits} bits)", unit="layer")

    def advance(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        params = quantize_calibrated(loaded.params, llama_calibration(loaded.config), method, bits,
                                     record["group_size"], seqs, progress=advance, act_order=act_order)
    finally:
        if bar is not None:
            bar.close()
    return save_orbax_atomic(dst, loaded.config, params, loaded.tokenizer, quantization=record)


def add_arguments(p) -> None:
    from jinfer.quant.formats import CALIBRATED_METHODS

    p.add_argument("src", help="a float checkpoint: registered name, GGUF file, HF directory or orbax checkpoint")
    p.add_argument("dst", help="the orbax checkpoint to write")
    p.add_argument("--method", required=True, choices=CALIBRATED_METHODS,
                   help="rtn: round to nearest; gptq, awq: calibrated weight-only; smoothquant, w8a8: int8 "
                        "weights and activations, with and without smoothing")
    p.add_argument("--bits", type=int, default=4, choices=(4, 8), help="weight bits (default: %(default)s)")
    p.add_argument("--group-size", type=int, default=None,
                   help="inputs per scale (default: 128 for 4 bits, one scale per output channel for 8)")
    p.add_argument("--calibration", default=None, help="a text file (needed by gptq, awq, smoothquant)")
    p.add_argument("--calibration-tokens", type=int, default=4096,
                   help="calibration tokens read (default: %(default)s)")
    p.add_argument("--calibration-seq-len", type=int, default=512,
                   help="tokens per calibration sequence (default: %(default)s)")
    p.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing activation size")
    p.add_argument("--force", action="store_true", help="replace an existing destination")


def run(args) -> int:
    out = quantize_checkpoint(args.src, args.dst, method=args.method, bits=args.bits, group_size=args.group_size,
                              calibration=args.calibration, calibration_tokens=args.calibration_tokens,
                              calibration_seq_len=args.calibration_seq_len, act_order=args.act_order,
                              overwrite=args.force)
    print(f"wrote {out}")
    return 0
