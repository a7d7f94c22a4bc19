"""The two small interfaces every backend implements: a vision engine and an LLM engine.

The pipeline (`vila_edge.runtime`) only talks to these, so ONNX Runtime (CPU / CUDA / TensorRT
execution providers), native TensorRT and TensorRT-LLM plug in without touching it.

Arrays crossing the interfaces are host numpy arrays in float32 (the engines cast to their own I/O
dtype); a backend that keeps data on the GPU may return `numpy`-convertible objects only at these
boundaries. Shapes:

- `VisionEngine.encode(pixels [tiles, 3, S, S]) -> features [tiles, T, C]` (SigLIP + feature select)
- `VisionEngine.project(features [chunks, T, C*scales]) -> embeds [chunks, T', D]` (mm_projector)
- `LLMEngine.forward(embeds [n, D]) -> logits [V]` of the LAST of the n positions, appending the n
  positions to the engine's KV cache (prefill when the cache is empty, a later turn's prefill or a
  decode step otherwise). `forward_ids(ids, embeds)` is the same with each position's token id (-1
  for media rows), for engines that are fed token ids and a prompt-embedding table. `length` is the number of cached positions; `truncate(n)` forgets all but
  the first n (a rollback, no copy); `reset()` empties the cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from vila_edge.errors import EngineError


class ContextOverflow(EngineError):
    """The KV cache cannot hold the requested positions (the engine's max context)."""

    def __init__(self, needed: int, limit: int):
        super().__init__(f"the conversation needs {needed} positions but the engine holds at most {limit}; "
                         f"shorten the prompt, use fewer images/frames, or rebuild with a larger max context")
        self.needed = needed
        self.limit = limit


class VisionEngine(ABC):
    """Vision tower + projector."""

    name: str = "vision"
    on_gpu: bool = False  # the merge step may use vila_edge.kernels when True

    @abstractmethod
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """[tiles, 3, S, S] float32 -> [tiles, T, C] float32 features."""

    @abstractmethod
    def project(self, features: np.ndarray) -> np.ndarray:
        """[chunks, T, C*scales] float32 -> [chunks, T', D] float32 embeddings."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        return None


class LLMEngine(ABC):
    """A decoder-only LLM fed with input embeddings, holding its own KV cache."""

    name: str = "llm"
    hidden_size: int
    vocab_size: int  # logits width (may exceed the trained vocabulary; the sampler masks the rest)
    max_context: int  # positions the KV cache holds

    def __init__(self) -> None:
        self.length = 0

    @abstractmethod
    def embed(self, ids) -> np.ndarray:
        """Token ids -> [n, D] float32 rows of the embedding table."""

    @abstractmethod
    def forward(self, embeds: np.ndarray) -> np.ndarray:
        """Append n positions ([n, D]) to the cache; return float32 logits [V] of the last one.

        Raises ContextOverflow (and changes nothing) when length + n > max_context.
        """

    def forward_ids(self, ids, embeds: np.ndarray) -> np.ndarray:
        """`forward` with each position's token id (-1 for media feature rows). Engines that take token
        ids plus a prompt-embedding table (TensorRT-LLM) use them; embedding-only engines ignore them."""
        return self.forward(embeds)

    # can `forward_all` return every appended position's logits (speculative decoding's verification)?
    can_forward_all: bool = False

    def forward_all(self, ids, embeds: np.ndarray) -> np.ndarray:
        """`forward_ids` returning float32 logits [n, V] of every one of the n positions (position i's
        row predicts the token after it), for verifying n-1 drafted tokens in one run."""
        raise EngineError(f"the {self.name} engine returns the last position's logits only; speculative "
                          f"decoding needs a decoder with a logits_to_keep input (rebuild with `vila-edge build`)")

    def reset(self) -> None:
        self.length = 0

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {n}")
        self.length = n

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_context:
            raise ContextOverflow(self.length + n, self.max_context)

    def checked_embeds(self, embeds) -> np.ndarray:
        """`forward`'s input as an [n >= 1, hidden_size] array that fits the cache (else one clear error)."""
        embeds = np.asarray(embeds)
        if embeds.ndim != 2 or embeds.shape[1] != self.hidden_size:
            raise EngineError(f"expected embeddings [n, {self.hidden_size}], got {list(embeds.shape)}")
        if embeds.shape[0] == 0:
            raise EngineError("forward() needs at least one position")
        self.check_room(embeds.shape[0])
        return embeds

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        return None


def embedding_rows(table: np.ndarray, ids) -> np.ndarray:
    """Rows of an embedding table (memory-mapped .npy) as float32, ids range-checked."""
    ids = np.asarray(list(ids), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise EngineError(f"token id out of range for the embedding table ({table.shape[0]} rows)")
    return np.asarray(table[ids], dtype=np.float32)
