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


# What `kv_cache_dtype=` stores the KV pages in (jinfer.quant.kv); None keeps the model's dtype.
KV_CACHE_DTYPES = ("int8", "fp8")
KV_CACHE_ALIASES = {"auto": None, "fp8_e4m3": "fp8"}  # vLLM's spellings of the same choices


def resolve_kv_cache_dtype(name, field: str = "kv_cache_dtype") -> str | None:
    """None, "int8" or "fp8" for any accepted spelling; raises ValueError naming the field otherwise."""
    name = KV_CACHE_ALIASES.get(name, name) if isinstance(name, str) or name is None else name
    if name is not None and name not in KV_CACHE_DTYPES:
        choices = [*KV_CACHE_DTYPES, *KV_CACHE_ALIASES]
        raise ValueError(f"{field}={name!r} must be one of {choices} or None")
    return name


# Calibrated weight quantization (jinfer.quant.calibrated): methods that see activations of calibration text.
CALIBRATED_METHODS = ("rtn", "gptq", "awq", "smoothquant", "w8a8")
CALIBRATED_BITS = {"rtn": (4, 8), "gptq": (4, 8), "awq": (4, 8), "smoothquant": (8,), "w8a8": (8,)}
ACTIVATION_FORMAT = {"smoothquant": "int8", "w8a8": "int8"}  # the QTensor.act each method gives; else None
NEEDS_CALIBRATION = ("gptq", "awq", "smoothquant")  # rtn and plain w8a8 round the weights alone


def check_calibrated(method, bits, group_size) -> int:
    """Raises ValueError naming the field for a calibrated method, bit width or group size jinfer does not
    have; returns the group size to use (None: the format's default; W8A8 needs one scale per channel, 0)."""
    if method not in CALIBRATED_METHODS:
        raise ValueError(f"method={method!r} must be one of {list(CALIBRATED_METHODS)}")
    if bits not in CALIBRATED_BITS[method]:
        raise ValueError(f"bits={bits!r} must be one of {list(CALIBRATED_BITS[method])} for method={method!r}")
    g = DEFAULT_GROUP_SIZE[f"int{bits}"] if group_size is None else group_size
    if not isinstance(g, int) or isinstance(g, bool) or g < 0:
        raise ValueError(f"group_size={group_size!r} must be an integer >= 0 (0: one scale per output channel)")
    if method in ACTIVATION_FORMAT and g != 0:
        raise ValueError(f"group_size={g} must be 0 for method={method!r}: int8 activations times int8 weights "
                         f"need one weight scale per output channel")
    return g


def recorded_quantization(method: str, bits: int, group_size: int | None) -> dict:
    """What a checkpoint records of how its weights were quantized: {"method", "bits", "group_size", "act"}
    (checked; group_size resolved; act: the activation format the method implies, or None)."""
    g = check_calibrated(method, bits, group_size)
    return {"method": method, "bits": bits, "group_size": g, "act": ACTIVATION_FORMAT.get(method)}


def check_recorded_quantization(record: dict, field: str = "quantization") -> dict:
    """A record read back from a checkpoint, checked field by field (each error names `field.key`)."""
    if not isinstance(record, dict):
        raise ValueError(f"{field}={record!r} must be a dict with keys method, bits, group_size, act")
    missing = {"method", "bits", "group_size", "act"} - set(record)
    if missing:
        raise ValueError(f"{field} lacks {sorted(missing)}")
    try:
        want = recorded_quantization(record["method"], record["bits"], record["group_size"])
    except ValueError as e:
        raise ValueError(f"{field}: {e}") from None
    if record["act"] != want["act"] or record["group_size"] != want["group_size"]:
        key = "act" if record["act"] != want["act"] else "group_size"
        raise ValueError(f"{field}.{key}={record[key]!r} does not match method={record['method']!r} "
                         f"(expected {want[key]!r})")
    return want
