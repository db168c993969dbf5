"""The compiled steps' runtime branches, and how a plain step does without them.

A general step skips work that no row of it needs (penalties, logit processors, logprobs, a draft's cache,
the stochastic acceptance rule) under `lax.cond`, so one compiled function serves every mix of requests. On
the GPU each such branch is a round trip to the host, so the runner also compiles each step `plain` (the
plan's `plain_sampler`, "greedy" or "sampled"), for steps in which the host saw that no row uses a logit
processor or asks for logprobs: there every branch is decided when the step is traced. `cond` is the one
place that choice is made.
"""

from __future__ import annotations

import jax


def cond(pred, then, otherwise, *operands, known: bool | None = None):
    """`then(*operands)` where `pred` holds, else `otherwise(*operands)`: decided at run time (`lax.cond`), or,
    with `known`, at trace time by the step's plan. known=False: no row needs the work (a plain step's logit
    processors and logprobs); known=True: the work runs regardless, for when its result is per-row masked
    and skipping it would need the branch (a draft's cache write, the stochastic acceptance rule)."""
    if known is None:
        return jax.lax.cond(pred, then, otherwise, *operands)
    return (then if known else otherwise)(*operands)


def unused_when(plain: str | None) -> bool | None:
    """`known` for work a plain step never needs (logit processors, penalties, logprobs): False there, else
    decided at run time."""
    return None if plain is None else False


def regardless_when(plain: str | None) -> bool | None:
    """`known` for per-row-masked work a plain step runs without asking whether any row needs it."""
    return None if plain is None else True
