"""vila-edge: run VILA / NVILA vision-language models on Jetson Orin and laptops."""

__version__ = "0.1.0"

from vila_edge.errors import CheckpointError, EngineError, MediaError, PromptError, VilaEdgeError  # noqa: E402

__all__ = ["CheckpointError", "EngineError", "MediaError", "PromptError", "VilaEdgeError", "__version__"]
