"""LLM engine on TensorRT-LLM (`tensorrt_llm.runtime.ModelRunnerCpp`, the Executor API).

Input embeddings reach a TensorRT-LLM engine the way its multimodal runner feeds VILA (reference doc
§8.1): as a prompt-tuning table. Every position the pipeline appends gets a "fake" token id
`vocab_size_padded + k` whose row k of the table holds its embedding, so text, image features and end
tokens all arrive exactly as the pipeline spliced them. The engine must be built from `<ckpt>/llm`
with `--max_prompt_embedding_table_size` >= the context length and `--gather_generation_logits`
(the pipeline does its own sampling, masking and stop handling, like every backend).

`forward()` sends the whole sequence as one request with `max_new_tokens=1` and returns the logits
of the last position; with `kv_cache_enable_block_reuse` the Executor finds the already-computed KV
blocks of the unchanged prefix, so each call recomputes only the trailing partial block. This keeps
the LLMEngine contract (and multi-turn reuse) exact; it is not TensorRT-LLM's fastest decode loop.
Imported lazily: nothing here loads unless the backend is chosen.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vila_edge.backends.base import LLMEngine
from vila_edge.errors import EngineError


class TensorRTLLMEngine(LLMEngine):
    name = "tensorrt-llm"

    def __init__(self, engine_dir, embed_tokens, *, max_context: int | None = None,
                 free_gpu_memory_fraction: float = 0.5):
        super().__init__()
        try:
            import torch
            from tensorrt_llm.runtime import ModelRunnerCpp
        except ImportError:
            raise EngineError("the TensorRT-LLM backend needs the `tensorrt_llm` package (and torch with CUDA)") from None
        self._torch = torch
        engine_dir = Path(engine_dir)
        cfg = json.loads((engine_dir / "config.json").read_text())
        build = cfg.get("build_config", {})
        pre = cfg.get("pretrained_config", {})
        self.hidden_size = int(pre.get("hidden_size", 0))
        self.vocab_size = int(pre.get("vocab_size", 0))
        self._vocab_padded = -(-self.vocab_size // 64) * 64 if self.vocab_size else 0
        table_cap = int(build.get("max_prompt_embedding_table_size", 0) or 0)
        if not table_cap:
            raise EngineError(f"{engine_dir}: the TensorRT-LLM engine was built without a prompt-embedding table "
                              f"(--max_prompt_embedding_table_size); rebuild it")
        seq_cap = int(build.get("max_seq_len", 0) or build.get("max_input_len", 0) or 4096)
        self.max_context = min(x for x in (table_cap, seq_cap - 1, max_context or seq_cap) if x)
        self.embed_table = np.load(embed_tokens, mmap_mode="r")
        if self.hidden_size and self.embed_table.shape[1] != self.hidden_size:
            raise EngineError(f"{embed_tokens}: width {self.embed_table.shape[1]} != engine hidden {self.hidden_size}")
        self.hidden_size = int(self.embed_table.shape[1])
        self.runner = ModelRunnerCpp.from_dir(str(engine_dir), kv_cache_enable_block_reuse=True,
                                              gather_generation_logits=True, max_output_len=1,
                                              kv_cache_free_gpu_memory_fraction=free_gpu_memory_fraction)
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(pre.get("dtype", "float16"), torch.float16)
        self._table = torch.zeros((self.max_context, self.hidden_size), dtype=dtype, device="cuda")
        self.engine_dir = engine_dir

    def embed(self, ids) -> np.ndarray:
        ids = np.asarray(list(ids), dtype=np.int64)
        return np.asarray(self.embed_table[ids], dtype=np.float32)

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        torch = self._torch
        n = int(embeds.shape[0])
        self.check_room(n)
        start, total = self.length, self.length + n
        self._table[start:total] = torch.from_numpy(np.ascontiguousarray(embeds, dtype=np.float32)).to(
            self._table.device, self._table.dtype)
        ids = torch.arange(total, dtype=torch.int32) + self._vocab_padded
        try:
            out = self.runner.generate(batch_input_ids=[ids], prompt_table=self._table[:total][None],
                                       max_new_tokens=1, end_id=-1, pad_id=0, streaming=False, return_dict=True,
                                       output_generation_logits=True, temperature=1.0, top_k=1)
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"{self.engine_dir}: TensorRT-LLM generate failed ({exc})") from None
        logits = out["generation_logits"]  # [batch, beams, steps, vocab]
        self.length = total
        return logits[0, 0, 0].float().cpu().numpy()

    def describe(self) -> dict:
        return {"backend": self.name, "engine": str(self.engine_dir), "max_context": self.max_context,
                "kv_cache": "paged, prefix block reuse"}

    def close(self) -> None:
        shutdown = getattr(self.runner, "__del__", None)
        if shutdown:
            try:
                shutdown()
            except Exception:  # noqa: BLE001
                pass
