"""LLM engine on plain ONNX Runtime over the builder's decoder (an onnxruntime-genai-built graph that
takes `inputs_embeds`).

Decoder I/O (names from `genai_config.json`, overridable by the manifest's `llm` dict):
  inputs  inputs_embeds [1, n, D], attention_mask [1, total] (int64), past_key_values.{i}.key/value
          [1, kv_heads, past_len, head_dim], optionally position_ids [1, n]
  outputs logits [1, n or 1, V], present.{i}.key/value

KV cache (targets.md, "CPU decode with ONNX Runtime int4"): when the graph attends with
GroupQueryAttention, ONE preallocated buffer per layer and K/V, [1, kv_heads, max_context, head_dim],
is bound with IO binding as both the past input and the present output. GQA then appends the new
positions in place (it reads the valid length from the attention mask), so nothing is reallocated or
copied per token, and rolling back a conversation is just `truncate(n)`. Graphs without GQA fall back
to ONNX Runtime-allocated present tensors (a copy per step; said in `describe()`).

When the graph's LM head is pruned to the last position (logits [1, 1, V], builder option
`prune_lm_head`), the logits buffer is preallocated and bound too. Intra-op spinning stays on.

Long prompts are prefilled PREFILL_CHUNK positions per run (the KV cache carries the rest): a run's
activations (GQA scores, the MLP's intermediate rows) grow with its positions, and ONNX Runtime's CPU arena
keeps its high-water mark for the session's life, so one 1,176-position prefill (a 1920x1080 image on
NVILA) would pin them at their largest; the logits and the cache are the same either way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from vila_edge.backends.base import LLMEngine, embedding_rows
from vila_edge.errors import EngineError

# decoder input of builder graphs: logits of the last k positions (builder.decoder_onnx.add_logits_to_keep;
# 1 in plain runs, k+1 when verifying k drafted tokens); older graphs without it: last position only
LOGITS_TO_KEEP = "logits_to_keep"
# first KV buffer length of a grouped-attention decoder (it doubles as the context grows)
GROUPED_FIRST_CAPACITY = 256
PREFILL_CHUNK = 256  # positions per prefill run (0: the whole prompt in one run)
_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": None}


def default_threads() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001 - psutil missing or unsupported platform
        n = None
    return max(1, n or os.cpu_count() or 1)


def ort_providers(device: str = "auto") -> list:
    """Execution providers for `device` ("cpu", "cuda", "tensorrt", "auto": the best available)."""
    import onnxruntime as ort

    avail = set(ort.get_available_providers())
    if device == "cpu":
        return ["CPUExecutionProvider"]
    want = {
        "cuda": ["CUDAExecutionProvider"],
        "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
        "auto": ["CUDAExecutionProvider"],
    }.get(device)
    if want is None:
        raise EngineError(f"device {device!r} is not one of: auto, cpu, cuda, tensorrt")
    chosen = [p for p in want if p in avail]
    if device in ("cuda", "tensorrt") and not chosen:
        raise EngineError(f"device {device!r} requested but this onnxruntime has only {sorted(avail)}; "
                          f"install onnxruntime-gpu or use --device cpu")
    return chosen + ["CPUExecutionProvider"]


def session_options(threads: int | None = None, *, spinning: bool = True, arena: bool = True):
    """`arena=False`: tensors go back to the system after each run (ONNX Runtime's CPU arena keeps its
    high-water mark for the life of the session)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = arena
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning off costs ~21% decode speed on 2-core machines (targets.md).
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return so


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"{path}: file not found (rebuild the engine directory with `vila-edge build`)") from None
    except ValueError as exc:
        raise EngineError(f"{path}: invalid JSON ({exc})") from None


def _first(d: dict, *keys, default=None):
    for k in keys:
        if isinstance(d, dict) and d.get(k) is not None:
            return d[k]
    return default


def graph_op_types(model_path: Path) -> set[str]:
    """Op types in the top-level graph (external data is not loaded)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    return {n.op_type for n in m.graph.node}


class OrtLLMEngine(LLMEngine):
    name = "onnxruntime"

    def __init__(self, llm_dir, info: dict | None = None, *, device: str = "cpu", threads: int | None = None,
                 max_context: int | None = None, spinning: bool = True, share_buffer: bool | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, profile_prefix: str | None = None):
        """`profile_prefix`: write ONNX Runtime's per-node profile (JSON) there (`session.end_profiling()`;
        benchmarks/decode_profile.py)."""
        super().__init__()
        self.prefill_chunk = int(prefill_chunk)
        import onnxruntime as ort

        self._ort = ort
        llm_dir = Path(llm_dir)
        info = dict(info or {})
        genai = _read_json(llm_dir / "genai_config.json") if (llm_dir / "genai_config.json").is_file() else {}
        dec = genai.get("model", {}).get("decoder", {})
        gin, gout = dec.get("inputs", {}), dec.get("outputs", {})
        io_in = info.get("inputs") if isinstance(info.get("inputs"), dict) else {}
        io_out = info.get("outputs") if isinstance(info.get("outputs"), dict) else {}

        files = info.get("files") if isinstance(info.get("files"), dict) else {}
        filename = _first(files, "decoder", default=_first(info, "decoder", "filename", default=dec.get("filename")))
        if not filename:
            raise EngineError(f"{llm_dir}: cannot tell the decoder file (no genai_config.json decoder.filename)")
        self.model_path = llm_dir / Path(str(filename)).name
        if not self.model_path.is_file():
            raise EngineError(f"{self.model_path}: decoder file missing; rebuild with `vila-edge build`")
        emb = _first(files, "embed_tokens", default=_first(info, "embed_tokens", default="embed_tokens.npy"))
        emb_path = llm_dir / Path(str(emb)).name
        if not emb_path.is_file():
            raise EngineError(f"{emb_path}: embedding table missing; rebuild with `vila-edge build`")
        self.embed_table = np.load(emb_path, mmap_mode="r")

        self.in_embeds = _first(io_in, "inputs_embeds", default=gin.get("inputs_embeds", "inputs_embeds"))
        self.in_mask = _first(io_in, "attention_mask", default=gin.get("attention_mask", "attention_mask"))
        self.in_pos = _first(io_in, "position_ids", default=gin.get("position_ids", "position_ids"))
        past_k = _first(io_in, "past_key_names", "past_key", default=gin.get("past_key_names", "past_key_values.%d.key"))
        past_v = _first(io_in, "past_value_names", "past_value",
                        default=gin.get("past_value_names", "past_key_values.%d.value"))
        pres_k = _first(io_out, "present_key_names", "present_key",
                        default=gout.get("present_key_names", "present.%d.key"))
        pres_v = _first(io_out, "present_value_names", "present_value",
                        default=gout.get("present_value_names", "present.%d.value"))
        self.out_logits = _first(io_out, "logits", default=gout.get("logits", "logits"))

        self.providers = ort_providers(device)
        self.device = "cuda" if any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
                                    for p in self.providers[:1]) else "cpu"
        so = session_options(threads, spinning=spinning)
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = str(profile_prefix)
        try:
            self.session = ort.InferenceSession(str(self.model_path), sess_options=so, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise EngineError(f"{self.model_path}: onnxruntime cannot load the decoder ({exc})") from None

        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        for name in (self.in_embeds, self.in_mask):
            if name not in inputs:
                raise EngineError(f"{self.model_path}: decoder has no input {name!r} (has {sorted(inputs)})")
        if self.out_logits not in outputs:
            raise EngineError(f"{self.model_path}: decoder has no output {self.out_logits!r}")
        self.has_pos = self.in_pos in inputs

        self.num_layers = int(_first(info, "num_layers", default=dec.get("num_hidden_layers", 0)) or 0)
        if not self.num_layers:
            self.num_layers = sum(1 for n in inputs if n.startswith(past_k.split("%d")[0]))
        self.past_names = [(past_k % i, past_v % i) for i in range(self.num_layers)]
        self.present_names = [(pres_k % i, pres_v % i) for i in range(self.num_layers)]
        for pk, pv in self.past_names:
            if pk not in inputs or pv not in inputs:
                raise EngineError(f"{self.model_path}: decoder has no KV input {pk!r}/{pv!r}")
        kv_in = inputs[self.past_names[0][0]]
        self.kv_dtype = _NP_DTYPES.get(kv_in.type)
        self.io_dtype = _NP_DTYPES.get(inputs[self.in_embeds].type)
        if self.kv_dtype is None or self.io_dtype is None:
            raise EngineError(f"{self.model_path}: unsupported decoder I/O type {kv_in.type} (float32/float16 only)")
        self.num_kv_heads = int(_first(info, "num_kv_heads", default=dec.get("num_key_value_heads", kv_in.shape[1])))
        self.head_dim = int(_first(info, "head_dim", "head_size", default=dec.get("head_size", 0)) or 0)
        if not self.head_dim:
            raise EngineError(f"{llm_dir}: head_dim unknown (genai_config.json decoder.head_size)")
        self.hidden_size = int(self.embed_table.shape[1])
        logits_shape = outputs[self.out_logits].shape
        self.vocab_size = int(logits_shape[-1]) if isinstance(logits_shape[-1], int) else int(self.embed_table.shape[0])
        # builder decoders Slice the last `logits_to_keep` positions (default 1: the last one only)
        self.keep_input = LOGITS_TO_KEEP if LOGITS_TO_KEEP in inputs else None
        self.last_only = len(logits_shape) == 3 and (logits_shape[1] == 1 or self.keep_input is not None)
        self.can_forward_all = self.keep_input is not None or not self.last_only
        ctx = int(_first(info, "max_context", "context_length",
                         default=genai.get("model", {}).get("context_length", 4096)))
        self.max_context = min(ctx, max_context) if max_context else ctx

        ops = graph_op_types(self.model_path)
        gqa = "GroupQueryAttention" in ops
        # grouped attention (builder.decoder_onnx.DecoderWriter._grouped_attention): ScatterND writes the new
        # rows into the bound buffer in place and attention spans the whole buffer (masked past the context),
        # so the buffer grows with the context, doubling, instead of being max_context long from the start
        self.grouped = not gqa and {"ScatterND", "FusedMatMul"} <= ops
        if self.grouped and share_buffer is False:
            raise EngineError(f"{self.model_path}: this decoder (grouped attention) updates its KV cache in place; "
                              "it needs the shared past/present buffers")
        self.share_buffer = (gqa or self.grouped) if share_buffer is None else (share_buffer and (gqa or self.grouped))
        self.capacity = self.max_context
        if self.grouped and self.device == "cpu":
            self.capacity = min(self.max_context, GROUPED_FIRST_CAPACITY)

        self._mask = np.ones((1, self.max_context), dtype=np.int64)
        self._keep_one = np.ones(1, dtype=np.int64)
        self._io = None  # persistent IO binding (shared KV + pruned logits)
        self._logits = np.zeros((1, 1, self.vocab_size), dtype=_NP_DTYPES[outputs[self.out_logits].type] or np.float32)
        self._logits_ort = ort.OrtValue.ortvalue_from_numpy(self._logits) if self.last_only else None
        self._alloc_cache()

    # ---- cache ----------------------------------------------------------------------------------
    def _alloc_cache(self) -> None:
        ort = self._ort
        shape = (1, self.num_kv_heads, self.capacity, self.head_dim)
        self._kv = []  # per layer (key OrtValue, value OrtValue) — the shared past/present buffers
        self._kv_np = []
        self._past = None  # non-shared fallback: per layer (key, value) OrtValues of exact length
        if self.share_buffer:
            for _ in range(self.num_layers):
                if self.device == "cpu":
                    k = np.zeros(shape, dtype=self.kv_dtype)
                    v = np.zeros(shape, dtype=self.kv_dtype)
                    self._kv_np.append((k, v))
                    self._kv.append((ort.OrtValue.ortvalue_from_numpy(k), ort.OrtValue.ortvalue_from_numpy(v)))
                else:
                    self._kv.append(tuple(ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, "cuda", 0)
                                          for _ in range(2)))

    def kv_bytes(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.max_context * self.head_dim * np.dtype(self.kv_dtype).itemsize

    def describe(self) -> dict:
        return {"backend": self.name, "providers": self.providers, "decoder": self.model_path.name,
                "kv_cache": "shared past/present buffer (IO binding)" if self.share_buffer
                else "onnxruntime-allocated present (copy per step)",
                "lm_head": "last position only" if self.last_only else "all positions",
                "prefill_chunk": self.prefill_chunk or "whole prompt",
                "max_context": self.max_context, "kv_dtype": np.dtype(self.kv_dtype).name,
                "attention": "grouped (KV buffer grows with the context)" if self.grouped else "GroupQueryAttention"}

    def _grow(self, needed: int) -> None:
        """Grouped attention: a cache buffer that holds `needed` positions (doubling, at most max_context),
        the cached rows copied over; attention's cost follows the buffer's length."""
        capacity = self.capacity
        while capacity < needed:
            capacity *= 2
        self.capacity = min(capacity, self.max_context)
        old = self._kv_np
        self._alloc_cache()
        for (k, v), (old_k, old_v) in zip(self._kv_np, old, strict=True):
            k[:, :, :self.length] = old_k[:, :, :self.length]
            v[:, :, :self.length] = old_v[:, :, :self.length]
        self._io = None  # the fixed binding points at the old buffers

    def reset(self) -> None:
        super().reset()
        self._past = None

    def truncate(self, n: int) -> None:
        if n == self.length:
            return
        if not self.share_buffer and n != 0:
            raise EngineError("this decoder has no shared KV buffer; it cannot roll back a conversation "
                              "(re-prefill instead)")
        super().truncate(n)
        if n == 0:
            self._past = None

    # ---- compute --------------------------------------------------------------------------------
    def embed(self, ids) -> np.ndarray:
        return embedding_rows(self.embed_table, ids)

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        embeds = self.checked_embeds(embeds)
        n = embeds.shape[0]
        if self.prefill_chunk and n > self.prefill_chunk:  # bounded activations (module doc)
            for start in range(0, n, self.prefill_chunk):
                logits = self.forward(embeds[start:start + self.prefill_chunk])
            return logits
        return self._run(embeds)

    def forward_all(self, ids, embeds: np.ndarray) -> np.ndarray:
        if not self.can_forward_all:
            return super().forward_all(ids, embeds)
        embeds = self.checked_embeds(embeds)
        return self._run(embeds, keep=embeds.shape[0])

    def _run(self, embeds: np.ndarray, keep: int = 1) -> np.ndarray:
        """One decoder run over n positions; logits of the last `keep` (float32 [V] when keep is 1, else
        [keep, V])."""
        n = embeds.shape[0]
        past, total = self.length, self.length + n
        if total > self.capacity:
            self._grow(total)
        fixed = self.share_buffer and self.last_only and keep == 1
        if fixed:  # KV buffers and the logits buffer never move: bound once, only the inputs change
            if self._io is None:
                self._io = self._fixed_binding()
            io = self._io
        else:
            io = self.session.io_binding()
        order: list[str] = []  # output names in binding order (get_outputs() follows it)
        x = np.ascontiguousarray(embeds[None], dtype=self.io_dtype)
        io.bind_cpu_input(self.in_embeds, x)
        mask = self._mask[:, :total]
        io.bind_cpu_input(self.in_mask, mask)
        if self.has_pos:
            pos = np.arange(past, total, dtype=np.int64)[None]
            io.bind_cpu_input(self.in_pos, pos)
        if not fixed:
            if self.share_buffer:
                order += self._bind_shared_cache(io)
            else:
                order += self._bind_copy_cache(io)
            if self.keep_input is not None:
                io.bind_cpu_input(self.keep_input, self._keep_one if keep == 1 else np.array([keep], np.int64))
            if self.last_only and keep == 1:
                io.bind_ortvalue_output(self.out_logits, self._logits_ort)
            else:
                io.bind_output(self.out_logits, "cpu")
            order.append(self.out_logits)
        try:
            self.session.run_with_iobinding(io)
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"{self.model_path.name}: decoder run failed ({exc})") from None
        got = {} if fixed else dict(zip(order, io.get_outputs(), strict=True))
        if not self.share_buffer:
            self._past = [(got[ok], got[ov]) for ok, ov in self.present_names]
        self.length = total
        if self.last_only and keep == 1:
            return self._logits[0, 0].astype(np.float32, copy=True)
        logits = got[self.out_logits].numpy()[0]
        return logits[-1].astype(np.float32, copy=True) if keep == 1 else logits[-keep:].astype(np.float32)

    def _bind_shared_cache(self, io) -> list[str]:
        order = []
        for (pk, pv), (ok, ov), (k, v) in zip(self.past_names, self.present_names, self._kv, strict=True):
            io.bind_ortvalue_input(pk, k)
            io.bind_ortvalue_input(pv, v)
            io.bind_ortvalue_output(ok, k)
            io.bind_ortvalue_output(ov, v)
            order += [ok, ov]
        return order

    def _fixed_binding(self):
        io = self.session.io_binding()
        self._bind_shared_cache(io)
        if self.keep_input is not None:
            io.bind_cpu_input(self.keep_input, self._keep_one)
        io.bind_ortvalue_output(self.out_logits, self._logits_ort)
        return io

    def _bind_copy_cache(self, io) -> list[str]:
        ort = self._ort
        order = []
        self._empty = np.zeros((1, self.num_kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
        for i, ((pk, pv), (ok, ov)) in enumerate(zip(self.past_names, self.present_names, strict=True)):
            if self._past is None:
                k = v = ort.OrtValue.ortvalue_from_numpy(self._empty)
            else:
                k, v = self._past[i]
            io.bind_ortvalue_input(pk, k)
            io.bind_ortvalue_input(pv, v)
            io.bind_output(ok, "cpu" if self.device == "cpu" else "cuda")
            io.bind_output(ov, "cpu" if self.device == "cpu" else "cuda")
            order += [ok, ov]
        return order
