"""Weight-only quantized matmul for decode shapes: `quantized_matmul` (x times a QTensor, a Pallas kernel that
dequantizes in registers) and `quantized_matmul_reference` (jnp)."""

from jinfer.kernels.quant_matmul.ops import quantized_matmul
from jinfer.kernels.quant_matmul.reference import quantized_matmul_reference

__all__ = ["quantized_matmul", "quantized_matmul_reference"]
