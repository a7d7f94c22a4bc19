"""Read a checkpoint one tensor (or a few rows of one) at a time, without loading the model.

Safetensors files (one file or the shards of ``model.safetensors.index.json``) are memory-mapped;
each read copies its bytes out of the map and then drops those pages (``madvise(MADV_DONTNEED)``).
Pages of a file mapping that were touched count in the process's resident set until they are
unmapped or dropped, so without that the RSS of a streamed build would grow to the checkpoint's
size even though nothing holds it. TinyChat v2 ``.pt`` files are opened with
``torch.load(mmap=True)`` (a zip of storages: same one-tensor-at-a-time reads, pages not dropped).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vila_edge.checkpoint import TensorInfo, _weight_index

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ROW_CHUNK_BYTES = 64 << 20  # rows read per step when a big table (embedding, lm_head) is walked


class SafetensorsReader:
    """Tensors of a HF folder's safetensors by name; ``prefix`` is stripped (``"llm."`` in -hf folders)."""

    def __init__(self, folder: Path | str, prefix: str = "", skip_files: tuple[str, ...] = ()):
        self.folder = Path(folder)
        self.index: dict[str, TensorInfo] = {
            name: info for name, info in _weight_index(self.folder, prefix).items() if info.file.name not in skip_files
        }
        self._maps: dict[Path, mmap.mmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def names(self) -> list[str]:
        return sorted(self.index)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.index[name]
        except KeyError:
            raise KeyError(f"{self.folder}: no tensor {name!r} in the checkpoint") from None

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            with open(path, "rb") as handle:
                self._maps[path] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[path]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """A copy of tensor ``name`` (rows ``start:stop`` of its first dimension), in its stored dtype."""
        info = self._info(name)
        if info.dtype not in TORCH_DTYPES:
            raise ValueError(f"{info.file}: tensor {name} has dtype {info.dtype}, which the builder cannot read")
        shape = info.shape or (1,)
        stop = shape[0] if stop is None else stop
        row_bytes = info.nbytes // max(shape[0], 1)
        begin, length = info.offset + start * row_bytes, (stop - start) * row_bytes
        out = torch.empty((stop - start, *shape[1:]), dtype=TORCH_DTYPES[info.dtype])
        mapped = self._map(info.file)
        out.reshape(-1).view(torch.uint8).numpy()[:] = np.frombuffer(mapped, np.uint8, length, begin)
        _drop_pages(mapped, begin, length)
        return out.reshape(info.shape) if not info.shape else out

    def row_chunks(self, name: str, dtype: torch.dtype | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows) of a 2-D tensor, ~64 MiB at a time."""
        rows, cols = self.shape(name)
        step = max(1, ROW_CHUNK_BYTES // max(1, self._info(name).nbytes // rows))
        for start in range(0, rows, step):
            chunk = self.read(name, start, min(rows, start + step))
            yield start, chunk if dtype is None else chunk.to(dtype)

    def close(self) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TorchFileReader:
    """The same reads over a ``torch.save`` state dict (TinyChat v2), memory-mapped by torch."""

    def __init__(self, path: Path | str):
        self.folder = Path(path).parent
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        self.state = {k: v for k, v in state.items() if torch.is_tensor(v)}

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def names(self) -> list[str]:
        return sorted(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        tensor = self.state[name]
        return (tensor if tensor.dim() == 0 else tensor[start:stop]).clone()

    def row_chunks(self, name: str, dtype: torch.dtype | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        tensor = self.state[name]
        step = max(1, ROW_CHUNK_BYTES // max(1, tensor[0].numel() * tensor.element_size()))
        for start in range(0, tensor.shape[0], step):
            chunk = tensor[start:start + step].clone()
            yield start, chunk if dtype is None else chunk.to(dtype)

    def close(self) -> None:
        self.state = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _drop_pages(mapped: mmap.mmap, begin: int, length: int) -> None:
    """Release the map's pages of [begin, begin + length) (file-backed: they are re-read if touched again)."""
    if not hasattr(mapped, "madvise") or not hasattr(mmap, "MADV_DONTNEED") or length <= 0:
        return
    first = begin - begin % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, first, min(len(mapped), begin + length) - first)
