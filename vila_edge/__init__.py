"""vila-edge: run VILA / NVILA vision-language models on Jetson Orin and laptops."""

__version__ = "0.1.0"

from vila_edge.errors import CheckpointError, EngineError, MediaError, PromptError, VilaEdgeError  # noqa: E402


def load(engine_dir, **kwargs):
    """Open an engine directory -> `vila_edge.runtime.Pipeline` (see `vila_edge.runtime.load` for options:
    device, threads, max_context, vision_backend, llm_backend, vision_cache_mb, prefix_reuse)."""
    from vila_edge.runtime import load as _load

    return _load(engine_dir, **kwargs)


__all__ = ["CheckpointError", "EngineError", "MediaError", "PromptError", "VilaEdgeError", "__version__", "load"]
