"""GPTQ (Frantar et al. 2022): one weight quantized input row by input row, each row's rounding error spread
over the rows not yet quantized so the layer's output on the calibration inputs moves least.

With X the calibration inputs [tokens, n] and W [n, m] (our layout: inputs are rows; the paper's columns),
the output error ||XQ - XW||² is a quadratic form in H = 2XᵀX. Quantizing row i to q_i and updating the
remaining rows by -(w_i - q_i) · [H⁻¹]_{i,>i} / [H⁻¹]_{ii} is optimal for it (OBQ); GPTQ takes the rows in a
fixed order, reads those H⁻¹ rows from the upper Cholesky factor U of H⁻¹ (Uᵀ U = H⁻¹, so row i of U is the
inverse restricted to rows ≥ i, scaled), and applies the updates lazily: inside a block of rows at once,
to the rows after the block in one matrix product.

Scales: the same grids as round to nearest (jinfer.quant.rtn), so the result is the QTensor layout RTN gives
(int4 asymmetric: [min, max] of a group onto 0..15, offset = min; int8 symmetric). Each group's scale and
offset are fitted when its first row is reached, on the rows as updated by then (blocks are aligned to groups
so a group's rows have every update). act_order=True takes the rows by decreasing diag(H) (the inputs with
the most energy first, while most rows remain to absorb their error); the groups stay the contiguous groups
QTensor stores, their scales fitted on the original weight before the pass ("static groups"), since a group's
rows are then reached out of order.

Float64 numpy on the host: the Cholesky factor of a damped H is robust in it, and the row loop is sequential.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.quant.qtensor import QTensor, pack_int4

BLOCK = 128  # rows updated together before the lazy update of the rest


def fit_group(rows: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """rows [g, m] -> (scale [m], offset [m] | None): RTN's grid for these rows."""
    if bits == 4:
        lo, hi = rows.min(axis=0), rows.max(axis=0)
        return np.where(hi > lo, (hi - lo) / 15.0, 1.0), lo
    amax = np.abs(rows).max(axis=0)
    return np.where(amax > 0, amax / 127.0, 1.0), None


def round_row(w: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    """The integer code of one row on its group's grid."""
    if offset is not None:
        return np.clip(np.round((w - offset) / scale), 0, 15)
    return np.clip(np.round(w / scale), -127, 127)


def gptq_quantize(w: jax.Array, x: jax.Array, *, n_in: int, bits: int, group_size: int = 0,
                  act_order: bool = False, damp: float = 0.01, block: int = BLOCK) -> QTensor:
    """w [*in, *out] (one layer's weight), x f32[tokens, prod(in)] its calibration inputs -> QTensor of
    fmt int4 / int8 (bits), `group_size` inputs per scale (0: per output channel). damp: added to H's
    diagonal as a share of its mean (keeps H invertible when inputs are collinear or never active)."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r} must be 4 or 8")
    in_shape, out_shape = tuple(w.shape[:n_in]), tuple(w.shape[n_in:])
    n, m = math.prod(in_shape), math.prod(out_shape)
    if x.shape != (x.shape[0], n):
        raise ValueError(f"x has shape {x.shape}; expected [tokens, {n}] for a weight of inputs {in_shape}")
    W = np.asarray(w, np.float64).reshape(n, m)
    X = np.asarray(x, np.float64)
    H = 2.0 * (X.T @ X) / max(len(X), 1)
    dead = np.diag(H) == 0  # inputs never active: their rows are rounded, their error goes nowhere
    H[dead, dead] = 1.0
    H[np.diag_indices(n)] += damp * np.mean(np.diag(H))
    g = group_size or n
    G = math.ceil(n / g)
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n)
    Hp = H[np.ix_(perm, perm)]
    U = np.linalg.cholesky(np.linalg.inv(Hp)).T  # upper: Uᵀ U = Hp⁻¹

    scale, offset = np.ones((G, m)), (np.zeros((G, m)) if bits == 4 else None)
    if act_order or g == n:  # fitted before the pass, on the contiguous groups of the original weight
        for j in range(G):
            scale[j], o = fit_group(W[j * g:(j + 1) * g], bits)
            if offset is not None:
                offset[j] = o
    block = g * max(1, block // g) if g < n else block  # a group never straddles two blocks
    Wp = W[perm]
    codes = np.zeros((n, m))
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        Wb = Wp[b0:b1].copy()
        err = np.zeros_like(Wb)
        for i in range(b1 - b0):
            r = b0 + i
            j = perm[r] // g  # the row's group, in the stored (original) order
            if not act_order and g < n and r % g == 0:  # first row of a group: fit it on the rows as updated
                scale[j], o = fit_group(Wb[i:i + g], bits)
                if offset is not None:
                    offset[j] = o
            o = None if offset is None else offset[j]
            q = round_row(Wb[i], scale[j], o)
            codes[r] = q
            e = (Wb[i] - (q * scale[j] + (0 if o is None else o))) / U[r, r]
            Wb[i + 1:] -= np.outer(U[r, r + 1:b1], e)
            err[i] = e
        Wp[b1:] -= U[b0:b1, b1:].T @ err
    q = np.empty_like(codes)
    q[perm] = codes
    q = q.reshape(*in_shape, *out_shape)
    if bits == 4:
        values = jnp.asarray(pack_int4(q.astype(np.uint8)))
        fields = (values, jnp.asarray(scale.reshape(G, *out_shape), jnp.float32),
                  jnp.asarray(offset.reshape(G, *out_shape), jnp.float32))
    else:
        fields = (jnp.asarray(q.astype(np.int8)), jnp.asarray(scale.reshape(G, *out_shape), jnp.float32), None)
    return QTensor(*fields, "int4" if bits == 4 else "int8", n_in, len(out_shape), group_size)
