"""XLA flags jinfer wants on GPUs, applied before the backend starts (XLA reads XLA_FLAGS once).

Measured on the H100 (jax 0.11.2, Llama-3.1-8B shape, bf16, batch-1 decode step): with XLA's defaults
the layer scan copies every layer's weights out of the stacked arrays before its Triton GEMMs
(17.2 ms a step); letting cuBLAS read the slices in place (dynamic-slice fusion, cuBLAS GEMMs)
takes it to 10.2 ms. See benchmarks/RESULTS.md.

On the H200 (jax 0.11.2, same shape, batch-1 decode blocks of 32): recording the layer loop's kernels,
cuBLAS calls on weight slices included, as CUDA graphs (command buffers with DYNAMIC_SLICE_FUSION and
WHILE) took 193 tok/s to 202; WHILE without DYNAMIC_SLICE_FUSION splits the graphs at every product (189).

No GEMM autotuning (`--xla_gpu_autotune_level=0`: cuBLAS's own heuristic algorithm for every product). On the
H200 (session 36, same shape, batch 1, unrolled layers): the autotuner timed each product alone and picked
split-K algorithms for the o and down products, each then a second kernel (`splitKreduce`) inside the CUDA
graph: 222.8 tok/s; with the heuristic 228.9, and the batch-1 TTFT 30.6 -> 20.8 ms. The scanned layers' products
(weight slices read in place) ran without split-K in every earlier trace.
"""

from __future__ import annotations

import os

GPU_FLAGS = ("--xla_gpu_enable_dynamic_slice_fusion=true", "--xla_gpu_enable_triton_gemm=false",
             "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,DYNAMIC_SLICE_FUSION,WHILE",
             "--xla_gpu_autotune_level=0")


def apply_gpu_flags() -> None:
    """Adds our GPU flags to XLA_FLAGS unless the user set them; harmless on CPU and TPU."""
    current = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in GPU_FLAGS if f.split("=")[0] not in current]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
