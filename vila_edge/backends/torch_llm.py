"""LLM engine in plain PyTorch (the gpt-fast / TinyChat recipe): int4 weight-only linears, a static KV cache,
a CUDA-graphed decode step.

Weights: `llm/torch.int4.safetensors`, written by the builder from the ONNX decoder's own quantized weights
(`vila_edge.builder.torch_weights`), so this engine and the ONNX Runtime one run the same model.

- int4 linears go through `torch.ops.aten._weight_int4pack_mm` on CUDA (tinygemm: bfloat16 activations and
  scales, so activations are cast to bf16 around it when the model runs in fp16: ~1-2e-2 relative logit error
  on the tiny fixtures, where fp16 gives ~1e-3) and `torch.ops.aten._weight_int4pack_mm_for_cpu` on the CPU
  (float32 activations and float32 scales/zeros: the AWQ zero points are used exactly). The packed layout is
  device-specific, so it is made here at load time from the file's device-neutral nibble-packed codes. Those
  kernels are GEMV-class; prefill-sized calls dequantize the weight and run a dense GEMM (`Int4Linear`).
- fp8 linears (an `--llm-precision fp8` build: the file holds the ONNX graph's FP8 codes and block scales; the file
  name stays torch.int4.safetensors) run W8A8 through `torch._scaled_mm`, or weight-only where it is refused
  (`backends.torch_fp8.Fp8Linear`).
- KV cache: one preallocated [layers, 2, kv_heads, max_context rounded up to 16, head_dim] tensor in the model
  dtype (fp16 on CUDA, fp32 on CPU); new positions are written in place, `truncate(n)` is a rollback without a
  copy.
- Attention: scaled_dot_product_attention. Prefill attends over the cached prefix with an offset causal mask
  (grouped KV heads). The decode step ("static" path) attends over a fixed cache span with a length mask, the
  query heads of each KV group as rows of that KV head (no GQA expansion): spans are 256, 512, ... and the
  cache length (`decode_spans`), a step takes the smallest past its position, so shapes and addresses are fixed per
  span and a step reads at most twice the live cache. On CUDA each span's step is captured once as a CUDA graph
  (all at load) and replayed per token (`decode="cuda-graph"`, the default there: no compiler, a capture takes
  milliseconds), or the full-span step is compiled with torch.compile (`decode="compile"`: inductor, mode
  "reduce-overhead" = CUDA graphs on CUDA; optional on the CPU). `decode="eager"` (the CPU default) slices the
  cache to the cached length instead.
- Kernels per decode step (each a few microseconds even inside a CUDA graph, so their count matters at batch 1):
  fused rms_norm, q and k rotated in one pass from precomputed rotary tables, one additive mask per step.
- Logits: final norm + LM head on the last position only.

Sampling and stop handling are the pipeline's (`vila_edge.runtime` / `vila_edge.generate`): this engine only
returns logits, through the same `LLMEngine` interface as the ONNX Runtime engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vila_edge.backends.base import LLMEngine, embedding_rows
from vila_edge.errors import EngineError

LLM_FILE = "torch.int4.safetensors"
DECODE_MODES = ("eager", "static", "cuda-graph", "compile")
_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


def torch_device(device: str = "auto") -> str:
    """"cpu" or "cuda" for a vila-edge --device value."""
    import torch

    if device == "cpu":
        return "cpu"
    if device in ("cuda", "tensorrt"):
        if not torch.cuda.is_available():
            raise EngineError(f"--device {device}: this PyTorch sees no CUDA GPU (torch {torch.__version__}); "
                              f"use --device cpu")
        return "cuda"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    raise EngineError(f"device {device!r} is not one of: auto, cpu, cuda, tensorrt")


def torch_dtype(name: str | None, device: str):
    import torch

    if name is None:
        name = "float16" if device == "cuda" else "float32"
    if name not in _DTYPES:
        raise EngineError(f"dtype {name!r} is not one of: {', '.join(sorted(set(_DTYPES.values())))}")
    return getattr(torch, _DTYPES[name])


def read_safetensors(path: Path):
    """(tensors, config dict from the metadata) of a torch-backend weights file."""
    from safetensors import safe_open

    if not path.is_file():
        raise EngineError(f"{path}: missing; build the engine directory with `vila-edge build ... --torch-weights` "
                          f"to use the torch backend")
    try:
        with safe_open(str(path), framework="pt") as f:
            config = json.loads((f.metadata() or {}).get("config", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for damaged files
        raise EngineError(f"{path}: cannot read it ({exc}); rebuild the engine directory") from None
    if config.get("format") != 1:
        raise EngineError(f"{path}: unknown torch weights format {config.get('format')!r}; rebuild the engine directory")
    return tensors, config


# ---- linears ---------------------------------------------------------------------------------------------


def _inner_k_tiles(k: int) -> int:
    return next(t for t in (8, 4, 2) if k % (t * 16) == 0)


def unpack_int4_rows(packed_rows):
    """uint8 [N, K/2] (even K index in the high nibble) -> uint8 codes [N, K]."""
    import torch

    return torch.stack([packed_rows >> 4, packed_rows & 0x0F], dim=-1).reshape(packed_rows.shape[0], -1)


class Int4Linear:
    """y = x @ W.T (+ b) with W int4, per group of `group_size` input columns: (q - 8) * scale + zero.

    Calls with at most DENSE_ROWS rows (decode) run the int4 kernel. tinygemm and the CPU int4 kernel are
    GEMV-class: at prefill sizes they are 10-30x slower than a dense GEMM, so with `dense_prefill` (keeps the
    nibble rows and float32 scales/zeros too: +0.5 byte a weight) larger calls dequantize the weight (exact
    float32 arithmetic, then the model dtype) and run F.linear."""

    DENSE_ROWS = 16

    def __init__(self, packed_rows, scales_and_zeros, group_size: int, bias, dtype, device: str,
                 dense_prefill: bool = True):
        import torch

        self.group_size = group_size
        self.out_features = packed_rows.shape[0]
        self.dtype = dtype
        k = packed_rows.shape[1] * 2
        inner = _inner_k_tiles(k)
        packed_rows = packed_rows.to(device).contiguous()
        if device == "cuda":
            # tinygemm takes the nibble-packed rows and tiles them for the tensor cores (on the GPU)
            self.weight = torch.ops.aten._convert_weight_to_int4pack(packed_rows, inner)
            self.sz = scales_and_zeros.to(device=device, dtype=torch.bfloat16).contiguous()
            self.mm = torch.ops.aten._weight_int4pack_mm
            self.kernel_dtype = torch.bfloat16
        else:
            codes = unpack_int4_rows(packed_rows).to(torch.int32).contiguous()
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, inner)
            self.sz = scales_and_zeros.to(dtype).contiguous()
            self.mm = torch.ops.aten._weight_int4pack_mm_for_cpu
            self.kernel_dtype = dtype
        self.rows = packed_rows if dense_prefill else None
        self.sz32 = scales_and_zeros.to(device=device, dtype=torch.float32).contiguous() if dense_prefill else None
        self.bias = None if bias is None else bias.to(device=device, dtype=dtype)

    def dense_weight(self):
        """The weight [N, K] in the model dtype: (q - 8) * scale + zero in float32."""
        codes = unpack_int4_rows(self.rows).float().reshape(self.out_features, -1, self.group_size)
        scale, zero = self.sz32[..., 0].t()[..., None], self.sz32[..., 1].t()[..., None]
        return ((codes - 8) * scale + zero).reshape(self.out_features, -1).to(self.dtype)

    def __call__(self, x):
        import torch.nn.functional as F

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.rows is not None and x2.shape[0] > self.DENSE_ROWS:
            y = F.linear(x2, self.dense_weight())
        else:
            y = self.mm(x2.to(self.kernel_dtype).contiguous(), self.weight, self.group_size, self.sz).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class DenseLinear:
    def __init__(self, weight, bias, dtype, device: str):
        self.weight = weight.to(device=device, dtype=dtype).contiguous()
        self.bias = None if bias is None else bias.to(device=device, dtype=dtype)

    def __call__(self, x):
        import torch.nn.functional as F

        return F.linear(x, self.weight, self.bias)


def dequantize_grouped(codes, zeros, scales, k: int):
    """float32 [N, K] = (code - zero) * scale per group (the MatMulNBits arithmetic)."""
    import torch

    n, groups = scales.shape
    c = codes.to(torch.float32).reshape(n, groups, -1)
    return ((c - zeros.float()[..., None]) * scales.float()[..., None]).reshape(n, -1)[:, :k]


def make_linear(tensors: dict, name: str, meta: dict, dtype, device: str, dense_prefill: bool = True,
                fp8_gemm: str | None = None):
    bias = tensors.get(f"{name}.bias")
    kind = meta["kind"]
    if kind == "fp8":
        from vila_edge.backends.torch_fp8 import Fp8Linear

        return Fp8Linear(tensors[f"{name}.fp8"], tensors[f"{name}.fp8_scales"], meta["format"], bias, dtype, device,
                         activations=meta.get("activations", "dynamic"), gemm=fp8_gemm)
    if kind == "int4":
        return Int4Linear(tensors[f"{name}.int4"], tensors[f"{name}.scales_and_zeros"], int(meta["group_size"]),
                          bias, dtype, device, dense_prefill)
    if kind == "grouped":
        w = dequantize_grouped(tensors[f"{name}.codes"], tensors[f"{name}.zeros"], tensors[f"{name}.scales"],
                               int(meta["in"]))
        return DenseLinear(w, bias, dtype, device)
    if kind == "dense":
        return DenseLinear(tensors[f"{name}.weight"], bias, dtype, device)
    raise EngineError(f"{name}: unknown linear kind {kind!r}; rebuild the engine directory")


# ---- the decoder -------------------------------------------------------------------------------------------


def rms_norm(x, weight, eps: float):
    """transformers' LlamaRMSNorm / Qwen2RMSNorm (normalize in float32) as one fused op where torch has one
    (CUDA: one kernel instead of the eight of the spelled-out formula; a decode step runs 2 per layer). The
    weight multiply happens in float32 before the single rounding to x's dtype (transformers rounds first):
    at most 1 ulp of fp16 apart, identical in float32."""
    import torch.nn.functional as F

    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rotate(x, cos, sin_signed):
    """Rotary embedding (rotate-half layout) of x [..., head_dim]: x * cos + cat(-x2, x1) * sin, with the sign
    of the first half folded into `sin_signed` (so 3 ops: cat, mul, addcmul). cos / sin broadcast over x."""
    import torch

    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), sin_signed)


class TorchDecoder:
    """Llama / Qwen2 decoder over a static KV cache. `forward(x [n, D], start)` -> last-position logits [V]."""

    def __init__(self, tensors: dict, config: dict, *, dtype, device: str, max_context: int,
                 dense_prefill: bool = True, fp8_gemm: str | None = None):
        import torch

        self.cfg = config
        self.dtype, self.device = dtype, device
        self.num_layers = int(config["num_layers"])
        self.heads, self.kv_heads = int(config["num_heads"]), int(config["num_kv_heads"])
        self.head_dim = int(config["head_dim"])
        self.eps = float(config["rms_norm_eps"])
        if config.get("hidden_act", "silu") != "silu":
            raise EngineError(f"hidden_act {config['hidden_act']!r}: the torch backend implements silu (Llama / Qwen2)")
        lin = config["linears"]
        self.layers = []
        for i in range(self.num_layers):
            p = f"layers.{i}."
            self.layers.append({
                "input_norm": tensors[p + "input_norm"].to(device=device, dtype=dtype),
                "post_norm": tensors[p + "post_norm"].to(device=device, dtype=dtype),
                **{name: make_linear(tensors, p + name, lin[p + name], dtype, device, dense_prefill, fp8_gemm)
                   for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")},
            })
        self.norm = tensors["norm"].to(device=device, dtype=dtype)
        self.lm_head = make_linear(tensors, "lm_head", lin["lm_head"], dtype, device, dense_prefill, fp8_gemm)
        self.inv_freq = tensors["rope_inv_freq"].to(device=device, dtype=torch.float32)
        self.rope_scaling = float(config.get("rope_attention_scaling", 1.0))
        self.max_context = max_context
        # cache rows rounded up to 16: every decode span then gives the fused attention kernels an aligned mask
        # (torch pads an unaligned one with a copy per call); the extra rows are never written, always masked
        self.cache_rows = -(-max_context // 16) * 16
        shape = (self.num_layers, 2, self.kv_heads, self.cache_rows, self.head_dim)
        self.cache = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.arange(self.cache_rows, device=device)
        # rotary tables for every position, computed once: a step indexes them (2 ops) instead of recomputing
        # cos / sin (9 ops per step)
        self.cos_table, self.sin_table = self.rope(self.positions)

    def tensors(self, decode_only: bool = False):
        """Every tensor the decoder holds (weights, cache, tables); `decode_only`: the weights and norms a decode
        step reads (not the cache, not the dense-prefill copies)."""
        parts = [self.norm, self.lm_head] + ([] if decode_only else [self.cache, self.positions, self.inv_freq,
                                                                      self.cos_table, self.sin_table])
        for layer in self.layers:
            parts += list(layer.values())
        for p in parts:
            if hasattr(p, "tensors"):  # an Fp8Linear: codes, scales, bias (no extra copies)
                yield from p.tensors()
                continue
            if not hasattr(p, "weight"):  # a norm or a table
                yield p
                continue
            extra = () if decode_only else (getattr(p, "rows", None), getattr(p, "sz32", None))
            yield from (t for t in (p.weight, getattr(p, "sz", None), p.bias, *extra) if t is not None)

    def rope(self, pos):
        """cos, sin [n, head_dim] for integer positions `pos` [n], in float32 then the model dtype (as transformers);
        the sin's first half negated (see `rotate`)."""
        import torch

        freqs = pos.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        sin = emb.sin() * self.rope_scaling
        half = sin.shape[-1] // 2
        sin[:, :half] = -sin[:, :half]
        return (emb.cos() * self.rope_scaling).to(self.dtype), sin.to(self.dtype)

    def _layers(self, x, pos, attend):
        """Run every layer on x [n, D] at positions `pos` [n]; `attend(i, q, k, v)` writes k/v and attends."""
        import torch.nn.functional as F

        n = x.shape[0]
        cos, sin = self.cos_table[pos][:, None], self.sin_table[pos][:, None]  # [n, 1, head_dim]
        q_rows, kv_rows = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for i, layer in enumerate(self.layers):
            qkv = layer["qkv_proj"](rms_norm(x, layer["input_norm"], self.eps))
            # q and k heads rotated in one pass: [n, heads + kv_heads, head_dim]
            qk = rotate(qkv[:, :q_rows + kv_rows].view(n, self.heads + self.kv_heads, self.head_dim), cos, sin)
            q, k = qk[:, :self.heads].transpose(0, 1), qk[:, self.heads:].transpose(0, 1)
            v = qkv[:, q_rows + kv_rows:].view(n, self.kv_heads, self.head_dim).transpose(0, 1)
            a = attend(i, q, k, v)  # [heads, n, head_dim]
            x = x + layer["o_proj"](a.transpose(0, 1).reshape(n, q_rows))
            gate, up = layer["gate_up_proj"](rms_norm(x, layer["post_norm"], self.eps)).chunk(2, dim=-1)
            x = x + layer["down_proj"](F.silu(gate) * up)
        return self.lm_head(rms_norm(x[-1:], self.norm, self.eps))[0]

    def forward(self, x, start: int):
        """n new positions after `start` cached ones: attends over cache[:start + n] (eager, any n)."""
        import torch
        import torch.nn.functional as F

        n = x.shape[0]
        end = start + n
        mask = None if n == 1 else torch.ones(n, end, dtype=torch.bool, device=self.device).tril(diagonal=start)

        def attend(i, q, k, v):
            self.cache[i, 0, :, start:end] = k
            self.cache[i, 1, :, start:end] = v
            keys, values = self.cache[i, 0, :, :end], self.cache[i, 1, :, :end]
            return F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask,
                                                  enable_gqa=True)[0]

        return self._layers(x, self.positions[start:end], attend)

    def decode_static(self, x, pos, span: int | None = None):
        """One position (x [1, D]) at `pos` (a [1] tensor) attending over the first `span` cache rows (default all
        of them; rows past `pos` are masked): fixed shapes for torch.compile / CUDA graphs."""
        import torch
        import torch.nn.functional as F

        span = span or self.cache_rows
        # the additive mask once per step (a boolean one is converted to this inside every layer's SDPA call)
        mask = torch.zeros(1, span, dtype=self.dtype, device=self.device).masked_fill_(
            self.positions[:span] > pos, float("-inf"))
        group = self.heads // self.kv_heads

        def attend(i, q, k, v):
            self.cache[i, 0].index_copy_(1, pos, k)
            self.cache[i, 1].index_copy_(1, pos, v)
            # One query position: the `group` query heads that share a KV head are `group` query rows of that
            # head, so attention runs on the cache as stored (no GQA expansion of the keys and values, and a
            # plain masked SDPA that the fused kernels take).
            a = F.scaled_dot_product_attention(q.reshape(self.kv_heads, group, self.head_dim)[None],
                                               self.cache[i, 0, :, :span][None], self.cache[i, 1, :, :span][None],
                                               attn_mask=mask)
            return a[0].reshape(self.heads, 1, self.head_dim)

        return self._layers(x, pos, attend)


def decode_spans(max_context: int, smallest: int = 256) -> list[int]:
    """The cache prefixes a static decode step attends over: powers of two from `smallest`, then max_context. A
    step at position p uses the smallest span > p, so it reads at most twice the live cache instead of all of
    max_context (a 1.5B Qwen2 at 32k context: 0.9 GB of cache per token, more than its int4 weights)."""
    spans = []
    s = smallest
    while s < max_context:
        spans.append(s)
        s *= 2
    return spans + [max_context]


class CudaGraphStep:
    """`TorchDecoder.decode_static` captured as CUDA graphs, one per cache span (`decode_spans`: log2(context / 256)
    + 1 of them, all at load: no capture while serving, where another thread may be using the GPU). A call copies
    x / pos into the captured input buffers and replays the graph of its span. Before a capture the step runs
    eagerly on a side stream with the same buffers (allocates workspaces, picks kernels); at load that writes
    position max_context - 1, a row every real step writes before it is read; a span captured later (none is, unless
    a caller passes another span) runs with the call's own inputs, whose replay rewrites the same row. So capturing
    at any time leaves the cached conversation intact."""

    def __init__(self, model: TorchDecoder, warmup: int = 2):
        import torch

        self.model, self.warmup = model, warmup
        hidden = model.layers[0]["input_norm"].shape[0]
        self.x = torch.zeros(1, hidden, dtype=model.dtype, device=model.device)
        self.pos = torch.full((1,), model.max_context - 1, dtype=torch.long, device=model.device)
        self.graphs: dict[int, tuple] = {}  # span -> (graph, output logits)
        for span in decode_spans(model.cache_rows):
            self._capture(span)

    def _capture(self, span: int) -> None:
        import torch

        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.model.decode_static(self.x, self.pos, span)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.model.decode_static(self.x, self.pos, span)
        self.graphs[span] = (graph, out)

    def __call__(self, x, pos, span: int | None = None):
        span = span or self.model.cache_rows
        self.x.copy_(x)
        self.pos.copy_(pos)
        if span not in self.graphs:
            self._capture(span)
        graph, out = self.graphs[span]
        graph.replay()
        return out


class TorchLLMEngine(LLMEngine):
    """`LLMEngine` over `TorchDecoder`. `decode`: how one-token steps run, one of DECODE_MODES (default
    "cuda-graph" on CUDA, "eager" on the CPU); "static" is the fixed-shape step without graph or compiler
    (what the other two run). `dense_prefill`: see `Int4Linear` (off: less memory, slower prefill). `fp8_gemm`: for
    the fp8 linears of an `--llm-precision fp8` build, "scaled-mm" | "weight-only" | None (W8A8 through
    `torch._scaled_mm` where it runs, else weight-only; see `backends.torch_fp8`)."""

    name = "torch"

    def __init__(self, llm_dir, info: dict | None = None, *, device: str = "auto", dtype: str | None = None,
                 max_context: int | None = None, threads: int | None = None, decode: str | None = None,
                 dense_prefill: bool = True, fp8_gemm: str | None = None):
        llm_dir = Path(llm_dir)
        info = dict(info or {})
        tensors, config = read_safetensors(llm_dir / LLM_FILE)
        files = info.get("files") if isinstance(info.get("files"), dict) else {}
        emb_path = llm_dir / Path(str(files.get("embed_tokens") or "embed_tokens.npy")).name
        if not emb_path.is_file():
            raise EngineError(f"{emb_path}: embedding table missing; rebuild with `vila-edge build`")
        ctx = int(info.get("context_length") or info.get("max_context") or 4096)
        self._setup(tensors, config, np.load(emb_path, mmap_mode="r"), device=device, dtype=dtype,
                    max_context=min(ctx, max_context) if max_context else ctx, threads=threads, decode=decode,
                    dense_prefill=dense_prefill, fp8_gemm=fp8_gemm)

    @classmethod
    def from_tensors(cls, tensors: dict, config: dict, embed_table: np.ndarray, *, max_context: int,
                     device: str = "auto", dtype: str | None = None, decode: str | None = None,
                     dense_prefill: bool = True, fp8_gemm: str | None = None) -> TorchLLMEngine:
        """An engine over in-memory weights in the file's layout (benchmarks build random ones at real sizes)."""
        self = cls.__new__(cls)
        self._setup(tensors, config, embed_table, device=device, dtype=dtype, max_context=max_context, threads=None,
                    decode=decode, dense_prefill=dense_prefill, fp8_gemm=fp8_gemm)
        return self

    def _setup(self, tensors, config, embed_table, *, device, dtype, max_context, threads, decode,
               dense_prefill, fp8_gemm=None) -> None:
        import torch

        LLMEngine.__init__(self)
        self.device = torch_device(device)
        self.dtype = torch_dtype(dtype, self.device)
        if threads and self.device == "cpu":
            torch.set_num_threads(int(threads))
        self.embed_table = embed_table
        self.max_context = int(max_context)
        self.hidden_size = int(config["hidden_size"])
        self.vocab_size = int(config["vocab_size"])
        self.config = config
        self.dense_prefill = dense_prefill
        self.model = TorchDecoder(tensors, config, dtype=self.dtype, device=self.device, max_context=self.max_context,
                                  dense_prefill=dense_prefill, fp8_gemm=fp8_gemm)
        self.decode_mode = decode or ("cuda-graph" if self.device == "cuda" else "eager")
        if self.decode_mode not in DECODE_MODES:
            raise EngineError(f"decode {self.decode_mode!r} is not one of: {', '.join(DECODE_MODES)}")
        if self.decode_mode == "cuda-graph" and self.device != "cuda":
            raise EngineError("decode 'cuda-graph' needs the CUDA device")
        self.static_decode = self.decode_mode != "eager"
        self._decode = self.model.decode_static
        if self.decode_mode == "compile":
            for t in self.model.tensors():  # fixed addresses: CUDA graphs neither copy nor re-record them
                torch._dynamo.mark_static_address(t)
            mode = "reduce-overhead" if self.device == "cuda" else None
            self._decode = torch.compile(self.model.decode_static, mode=mode, fullgraph=True)
        elif self.decode_mode == "cuda-graph":
            try:
                self._decode = CudaGraphStep(self.model)
            except RuntimeError as exc:  # a kernel that cannot be captured on this GPU / torch build
                if decode is not None:
                    raise EngineError(f"decode 'cuda-graph': capturing the decode step failed ({exc})") from None
                self.decode_mode = f"static (CUDA graph capture failed: {str(exc)[:120]})"
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._spans = decode_spans(self.model.cache_rows)

    def describe(self) -> dict:
        kinds = sorted({m["kind"] for m in self.config["linears"].values()})
        fp8 = sorted({lin.describe() for layer in self.model.layers for lin in layer.values() if hasattr(lin, "gemm")})
        return {"backend": self.name, "device": self.device, "dtype": str(self.dtype).replace("torch.", ""),
                "linears": kinds, **({"fp8": fp8[0] if len(fp8) == 1 else fp8} if fp8 else {}),
                "int4_kernel": "_weight_int4pack_mm" + ("_for_cpu" if self.device == "cpu" else ""),
                "decode": self.decode_mode,
                "prefill": "dequantized dense GEMM" if self.dense_prefill else "int4 kernel",
                "kv_cache": f"static {self.kv_bytes() / (1 << 20):.1f} MiB", "lm_head": "last position only",
                "max_context": self.max_context}

    def _span(self) -> tuple[int, ...]:
        """The cache span of the next decode step as call arguments: none for torch.compile (one span, one
        compiled graph), else the smallest of `decode_spans` past the current position."""
        if self.decode_mode == "compile":
            return ()
        return (next(s for s in self._spans if s > self.length),)

    def kv_bytes(self) -> int:
        return self.model.cache.numel() * self.model.cache.element_size()

    def embed(self, ids) -> np.ndarray:
        return embedding_rows(self.embed_table, ids)

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        import torch

        embeds = self.checked_embeds(embeds)
        n = embeds.shape[0]
        x = torch.from_numpy(np.ascontiguousarray(embeds, dtype=np.float32)).to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            if n == 1 and self.static_decode:
                self._pos.fill_(self.length)
                logits = self._decode(x, self._pos, *self._span())
            else:
                logits = self.model.forward(x, self.length)
            out = logits.float().cpu().numpy()
        self.length += n
        return out
