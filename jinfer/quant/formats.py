"""The weight formats jinfer quantizes to, by the names users give them (vLLM's `quantization=`); no jax here,
so the host-side EngineConfig can check them."""

FORMATS = ("int8", "int4", "fp8")  # what `quantization=` rounds a float weight to (jinfer.quant.rtn)
METHODS = FORMATS + ("gguf",)  # "gguf": a GGUF file's Q8_0 / Q4_0 / Q4_1 blocks kept as they are
DEFAULT_GROUP_SIZE = {"int8": 0, "int4": 128, "fp8": 0}  # inputs per scale; 0: one scale per output channel


def check_quantization(method, group_size, field: str = "quantization") -> None:
    """Raises ValueError naming the field for a format or group size jinfer does not have."""
    if method is not None and method not in METHODS:
        raise ValueError(f"{field}={method!r} must be one of {list(METHODS)} or None")
    if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool)
                                   or group_size < 0):
        raise ValueError(f"{field}_group_size={group_size!r} must be an integer >= 0 (0: one scale per output "
                         f"channel)")
