"""LLM engine on TensorRT-LLM (`tensorrt_llm.runtime.ModelRunnerCpp`, the Executor API).

Visual features reach a TensorRT-LLM engine the way its multimodal runner feeds VILA (reference doc
§8.1, `vila_edge.builder.trtllm`): text positions are ordinary token ids, every media feature row gets a
"fake" id `fake_id_base + k` (fake_id_base = the LLM's vocab_size) whose row k of the prompt-tuning
table holds the feature. The pipeline passes each position's id through `forward_ids` (-1 marks a
media row). The table holds at most `max_prompt_embedding_table_size` rows (the builder's
max_multimodal_len) for the whole conversation.

`forward_ids()` sends the conversation so far as one request with `max_new_tokens=1` and returns the
logits of its last position (the pipeline does its own sampling, masking and stop handling, like every
backend). With KV-cache block reuse the Executor reuses the KV blocks of the unchanged prefix, so a call
recomputes only the trailing partial block: exact, multi-turn capable, but not TensorRT-LLM's fastest
decode loop. The engine's `max_input_len` therefore bounds the whole conversation (`runtime_context_limit`).

Block reuse keys blocks by token ids, and fake ids restart at `fake_id_base` after `reset()` /
`truncate()`: a new image would hit the old image's KV. TensorRT-LLM >= 0.13 takes an extra id per token
for exactly this (`generate(input_token_extra_ids=...)`, docs/source/kv_cache_reuse.md "Enable kv cache
reuse for p-tuning"): text 0, the rows of each image one id never used before. Releases whose
`generate` lacks that parameter (0.12, incl. v0.12.0-jetson) run with block reuse off: correct, slower.
Logits come back as generation logits: the engine is built with `--gather_generation_logits`;
`ModelRunnerCpp.from_dir(gather_generation_logits=)` is passed only where it exists (not in 0.12/0.13).

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


def runtime_context_limit(build: dict, max_context: int | None = None) -> int:
    """Positions a conversation may hold on this engine. Every step sends the whole conversation as the
    input of a one-token request, so the engine's `max_input_len` is the limit (and `max_seq_len - 1`,
    the room for that one token); both are read from the engine's `config.json` "build_config"."""
    seq_cap = int(build.get("max_seq_len") or 0) or 4096
    input_cap = int(build.get("max_input_len") or 0) or seq_cap - 1
    return min(seq_cap - 1, input_cap, max_context or seq_cap)


def explicit_parameters(function) -> set[str]:
    """Named parameters of an upstream function (`**kwargs` swallows anything, so it does not count)."""
    import inspect

    return {name for name, p in inspect.signature(function).parameters.items()
            if p.kind is not inspect.Parameter.VAR_KEYWORD}


def runner_options(runner_cls, free_gpu_memory_fraction: float, build: dict | None = None) -> tuple[dict, bool]:
    """(`ModelRunnerCpp.from_dir` keywords, whether to send extra ids) for the installed release and an
    engine's "build_config". Block reuse only with extra ids (see the module doc) and an engine built
    with paged context FMHA, which reuse requires (docs/source/kv_cache_reuse.md)."""
    plugins = (build or {}).get("plugin_config") or {}
    extra_ids = "input_token_extra_ids" in explicit_parameters(runner_cls.generate) \
        and plugins.get("use_paged_context_fmha", True) is not False
    kwargs = {"kv_cache_enable_block_reuse": extra_ids, "max_output_len": 1,
              "kv_cache_free_gpu_memory_fraction": free_gpu_memory_fraction}
    if "gather_generation_logits" in explicit_parameters(runner_cls.from_dir):
        kwargs["gather_generation_logits"] = True  # later releases gate the returned logits on it too
    return kwargs, extra_ids


class PromptTableIds:
    """Token ids and KV-reuse extra ids of one conversation on a prompt-table engine (no torch, no GPU).

    Media rows get fake ids `fake_id_base + row` (row = their prompt-table row) and, all rows of one
    `place()` call, an extra id never handed out before in this process, so no two images share the
    (fake id, extra id) pairs block reuse hashes; text gets extra id 0."""

    _next_extra = 1  # class-wide: engines in one process never hand out the same id twice

    def __init__(self, fake_id_base: int, table_rows: int):
        self.fake_id_base = fake_id_base
        self.table_rows = table_rows
        self.ids: list[int] = []
        self.extra: list[int] = []

    @property
    def rows(self) -> int:
        """Prompt-table rows in use: one past the highest row the kept conversation refers to."""
        fakes = [i for i in self.ids if i >= self.fake_id_base]
        return (max(fakes) - self.fake_id_base + 1) if fakes else 0

    def place(self, ids) -> tuple[list[int], list[int], list[int]]:
        """(new ids, their extra ids, the table rows the media rows go to) for ids with -1 at media rows.
        Changes nothing; `commit` keeps them once the engine accepted the step."""
        media = [k for k, t in enumerate(ids) if t < 0]
        start = self.rows
        if start + len(media) > self.table_rows:
            raise EngineError(f"the conversation holds {start + len(media)} image/video rows but the TensorRT-LLM "
                              f"engine's prompt table takes {self.table_rows}; rebuild with a larger "
                              f"max_multimodal_len or start a new conversation")
        extra_id = PromptTableIds._next_extra if media else 0
        rows = list(range(start, start + len(media)))
        it = iter(rows)
        new_ids = [self.fake_id_base + next(it) if t < 0 else int(t) for t in ids]
        return new_ids, [extra_id if t < 0 else 0 for t in ids], rows

    def commit(self, new_ids: list[int], new_extra: list[int]) -> None:
        self.ids += new_ids
        self.extra += new_extra
        if any(new_extra):
            PromptTableIds._next_extra += 1

    def truncate(self, n: int) -> None:
        del self.ids[n:]
        del self.extra[n:]

    def reset(self) -> None:
        self.truncate(0)


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
        from vila_edge.nvidia_versions import installed_versions, trtllm_version_error

        reason = trtllm_version_error(*installed_versions())
        if reason is not None:
            raise EngineError(reason)
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
        self.max_context = runtime_context_limit(build, max_context)
        self.embed_table = np.load(embed_tokens, mmap_mode="r")
        self.hidden_size = int(self.embed_table.shape[1])
        hidden = int(pre.get("hidden_size", self.hidden_size))
        if hidden != self.hidden_size:
            raise EngineError(f"{embed_tokens}: width {self.hidden_size} != TensorRT-LLM engine hidden size {hidden}")
        kwargs, self._extra_ids = runner_options(ModelRunnerCpp, free_gpu_memory_fraction, build)
        self.runner = ModelRunnerCpp.from_dir(str(engine_dir), **kwargs)
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(pre.get("dtype", "float16"), torch.float16)
        self._table = torch.zeros((max(1, self.table_rows), self.hidden_size), dtype=dtype, device="cuda")
        self._conv = PromptTableIds(self.fake_id_base, self.table_rows)  # the conversation as the engine sees it
        self.engine_dir = engine_dir

    def embed(self, ids) -> np.ndarray:
        ids = np.asarray(list(ids), dtype=np.int64)
        return np.asarray(self.embed_table[ids], dtype=np.float32)

    def reset(self) -> None:
        super().reset()
        self._conv.reset()

    def truncate(self, n: int) -> None:
        super().truncate(n)
        self._conv.truncate(n)

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        return self.forward_ids([-1] * int(embeds.shape[0]), embeds)

    def forward_ids(self, ids: Sequence[int], embeds: np.ndarray) -> np.ndarray:
        torch = self._torch
        n = int(embeds.shape[0])
        if len(ids) != n:
            raise EngineError(f"forward_ids: {len(ids)} ids for {n} embedding rows")
        self.check_room(n)
        new_ids, new_extra, rows = self._conv.place(ids)
        if rows:
            media = [k for k, t in enumerate(ids) if t < 0]
            x = torch.from_numpy(np.ascontiguousarray(embeds[media], dtype=np.float32))
            self._table[rows[0]:rows[-1] + 1] = x.to(self._table.device, self._table.dtype)
        kwargs = {}
        if self._extra_ids:
            kwargs["input_token_extra_ids"] = [self._conv.extra + new_extra]
        seq = torch.tensor(self._conv.ids + new_ids, dtype=torch.int32)
        try:
            out = self.runner.generate(batch_input_ids=[seq], prompt_table=self._table[None],
                                       max_new_tokens=1, end_id=-1, pad_id=0, streaming=False, return_dict=True,
                                       output_generation_logits=True, temperature=1.0, top_k=1, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"{self.engine_dir}: TensorRT-LLM generate failed on a {len(seq)}-position "
                              f"conversation ({exc})") from None
        logits = out.get("generation_logits") if isinstance(out, dict) else None
        if logits is None:
            raise EngineError(f"{self.engine_dir}: no generation logits returned; rebuild the engine with "
                              f"--gather_generation_logits")
        self._conv.commit(new_ids, new_extra)
        self.length += n
        return logits[0, 0, 0].float().cpu().numpy()

    def describe(self) -> dict:
        reuse = "paged, prefix block reuse with per-image extra ids" if self._extra_ids else \
            "paged, no block reuse (this TensorRT-LLM has no input_token_extra_ids)"
        return {"backend": self.name, "engine": str(self.engine_dir), "max_context": self.max_context,
                "prompt_table_rows": self.table_rows, "kv_cache": reuse}

    def close(self) -> None:
        runner = getattr(self, "runner", None)
        # the Executor is `runner.session` in 0.12 / 0.13 (model_runner_cpp.py `self.session = executor`)
        for attr in ("session", "executor"):
            executor = getattr(runner, attr, None)
            if executor is not None and hasattr(executor, "shutdown"):
                try:
                    executor.shutdown()
                except Exception:  # noqa: BLE001
                    pass
                return
