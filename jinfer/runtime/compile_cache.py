"""XLA's persistent compilation cache, shared by the CLI and the server, so a second start skips
compiling the same step functions (the cache lives under the jinfer cache directory, `xla/`)."""

from __future__ import annotations


def enable_compile_cache() -> None:
    """Points jax at the persistent cache; call it before the first compile (it also applies jinfer's GPU
    XLA flags, which must be set before the backend starts)."""
    from jinfer.runtime.xla_flags import apply_gpu_flags

    apply_gpu_flags()
    import jax

    from jinfer.checkpoints.registry import cache_dir

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
