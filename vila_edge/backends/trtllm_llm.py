"""LLM engine on TensorRT-LLM (`tensorrt_llm.runtime.ModelRunnerCpp`, the Executor API).

Visual features reach a TensorRT-LLM engine the way its multimodal runner feeds VILA (reference doc
§8.1, `vila_edge.builder.trtllm`): text positions are ordinary token ids, every media feature row gets a
"fake" id `fake_id_base + k` (fake_id_base = the LLM's vocab_size) whose row k of the prompt-tuning
table holds the feature. The pipeline passes each position's id through `forward_ids` (-1 marks a
media row). The table holds at most `max_prompt_embedding_table_size` rows (the builder's
max_multimodal_len) for the whole conversation.

`forward_ids()` sends the conversation so far as one request with `max_new_tokens=1` and returns the
logits of its last position (the pipeline does its own sampling, masking and stop handling, like every
backend). With `kv_cache_enable_block_reuse` the Executor reuses the KV blocks of the unchanged prefix,
so a call recomputes only the trailing partial block: exact, multi-turn capable, but not TensorRT-LLM's
fastest decode loop. Logits come back as generation logits: the engine must be built with
`--gather_generation_logits` (otherwise the Executor refuses and this backend says so).

Engine location: `<engine dir>/trtllm/` holding `trtllm_info.json` (written by
`vila_edge.builder.trtllm.build_trtllm_engine`) and the engine folder it names, or a folder with the
engine's `config.json` directly. Imported lazily: nothing here loads unless the backend is chosen.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vila_edge.backends.base import LLMEngine
from vila_edge.errors import EngineError


def find_trtllm_engine(engine_dir) -> tuple[Path, dict] | None:
    """(engine folder, trtllm_info dict) inside an engine directory, or None."""
    engine_dir = Path(engine_dir)
    for cand in (engine_dir / "trtllm", engine_dir / "llm" / "trtllm"):
        info_path = cand / "trtllm_info.json"
        if info_path.is_file():
            try:
                info = json.loads(info_path.read_text())
            except ValueError:
                continue
            eng = cand / str(info.get("engine_dir", "llm"))
            if (eng / "config.json").is_file():
                return eng, info
        if (cand / "config.json").is_file():
            return cand, {}
    return None


class TensorRTLLMEngine(LLMEngine):
    name = "tensorrt-llm"

    def __init__(self, engine_dir, embed_tokens, info: dict | None = None, *, max_context: int | None = None,
                 free_gpu_memory_fraction: float = 0.5):
        super().__init__()
        try:
            import torch
            from tensorrt_llm.runtime import ModelRunnerCpp
        except ImportError:
            raise EngineError("the TensorRT-LLM backend needs the `tensorrt_llm` package (and torch with CUDA)") from None
        self._torch = torch
        engine_dir = Path(engine_dir)
        info = dict(info or {})
        cfg = json.loads((engine_dir / "config.json").read_text())
        build = cfg.get("build_config", {})
        pre = cfg.get("pretrained_config", {})
        table = info.get("prompt_table") or {}
        self.vocab_size = int(pre.get("vocab_size", 0))
        self.fake_id_base = int(table.get("fake_id_base") or self.vocab_size)
        self.table_rows = int(table.get("max_rows") or build.get("max_prompt_embedding_table_size", 0) or 0)
        seq_cap = int(build.get("max_seq_len", 0) or 4096)
        self.max_context = min(seq_cap - 1, max_context or seq_cap)
        self.embed_table = np.load(embed_tokens, mmap_mode="r")
        self.hidden_size = int(self.embed_table.shape[1])
        hidden = int(pre.get("hidden_size", self.hidden_size))
        if hidden != self.hidden_size:
            raise EngineError(f"{embed_tokens}: width {self.hidden_size} != TensorRT-LLM engine hidden size {hidden}")
        self.runner = ModelRunnerCpp.from_dir(str(engine_dir), kv_cache_enable_block_reuse=True,
                                              gather_generation_logits=True, max_output_len=1,
                                              kv_cache_free_gpu_memory_fraction=free_gpu_memory_fraction)
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(pre.get("dtype", "float16"), torch.float16)
        self._table = torch.zeros((max(1, self.table_rows), self.hidden_size), dtype=dtype, device="cuda")
        self._ids: list[int] = []  # the conversation as the engine sees it (real ids, fake ids for media rows)
        self._rows = 0  # prompt-table rows in use
        self.engine_dir = engine_dir

    def embed(self, ids) -> np.ndarray:
        ids = np.asarray(list(ids), dtype=np.int64)
        return np.asarray(self.embed_table[ids], dtype=np.float32)

    def reset(self) -> None:
        super().reset()
        self._ids.clear()
        self._rows = 0

    def truncate(self, n: int) -> None:
        super().truncate(n)
        del self._ids[n:]
        fakes = [i for i in self._ids if i >= self.fake_id_base]
        self._rows = (max(fakes) - self.fake_id_base + 1) if fakes else 0

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        return self.forward_ids([-1] * int(embeds.shape[0]), embeds)

    def forward_ids(self, ids: Sequence[int], embeds: np.ndarray) -> np.ndarray:
        torch = self._torch
        n = int(embeds.shape[0])
        if len(ids) != n:
            raise EngineError(f"forward_ids: {len(ids)} ids for {n} embedding rows")
        self.check_room(n)
        media = [k for k, t in enumerate(ids) if t < 0]
        if self._rows + len(media) > self.table_rows:
            raise EngineError(f"the conversation holds {self._rows + len(media)} image/video rows but the TensorRT-LLM "
                              f"engine's prompt table takes {self.table_rows}; rebuild with a larger "
                              f"max_multimodal_len or start a new conversation")
        new_ids = []
        rows = self._rows
        if media:
            x = torch.from_numpy(np.ascontiguousarray(embeds[media], dtype=np.float32))
            self._table[rows:rows + len(media)] = x.to(self._table.device, self._table.dtype)
        for t in ids:
            if t < 0:
                new_ids.append(self.fake_id_base + rows)
                rows += 1
            else:
                new_ids.append(int(t))
        seq = torch.tensor(self._ids + new_ids, dtype=torch.int32)
        try:
            out = self.runner.generate(batch_input_ids=[seq], prompt_table=self._table[None],
                                       max_new_tokens=1, end_id=-1, pad_id=0, streaming=False, return_dict=True,
                                       output_generation_logits=True, temperature=1.0, top_k=1)
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"{self.engine_dir}: TensorRT-LLM generate failed ({exc}); the engine needs "
                              f"--gather_generation_logits and a prompt table") from None
        logits = out.get("generation_logits") if isinstance(out, dict) else None
        if logits is None:
            raise EngineError(f"{self.engine_dir}: no generation logits returned; rebuild the engine with "
                              f"--gather_generation_logits")
        self._ids += new_ids
        self._rows = rows
        self.length += n
        return logits[0, 0, 0].float().cpu().numpy()

    def describe(self) -> dict:
        return {"backend": self.name, "engine": str(self.engine_dir), "max_context": self.max_context,
                "prompt_table_rows": self.table_rows, "kv_cache": "paged, prefix block reuse"}

    def close(self) -> None:
        runner = getattr(self, "runner", None)
        executor = getattr(runner, "executor", None)
        if executor is not None and hasattr(executor, "shutdown"):
            try:
                executor.shutdown()
            except Exception:  # noqa: BLE001
                pass
