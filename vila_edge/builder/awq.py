"""Activation-aware weight quantization (AWQ, Lin et al. 2023, as in mit-han-lab/llm-awq), on CPU.

For every decoder layer, one at a time:
1. run the calibration activations through the float layer, recording the inputs of its linears;
2. for each group of linears sharing an input (q/k/v after the attention norm, o after v when
   shapes allow, gate/up after the MLP norm, down after up) grid-search a per-input-channel scale
   ``s = mean|x| ** ratio`` (20 ratios in [0, 1)) minimising the output error of the block that
   consumes the group, with the group's weights quantized as ``Q(W * s) / s``;
3. fold the scales into the preceding norm / linear (output-preserving in float);
4. search per-group weight clipping (not for q/k, whose error goes through the q.k product);
5. quantize asymmetric ``w_bit`` integers with a zero point per group of ``group_size`` inputs.

The next layer's calibration input is the float layer's output (as llm-awq and AutoAWQ do).
``quantize_model`` works on a loaded model (peak: the model plus one layer's calibration
activations; the layer being quantized is promoted to float32). Checkpoints on disk go through
``awq_stream`` instead (``quantize_checkpoint``, the decoder build): the same searches, bit for bit,
one layer read from disk at a time, on a CUDA GPU when torch sees one.

``method="rtn"`` skips steps 2-4 (plain round-to-nearest with zero points), for comparison.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vila_edge.builder.awq_formats import QuantizedLinear

SUPPORTED_GROUP_SIZES = (32, 64, 128)
SUPPORTED_BITS = (3, 4)
HELDOUT_EVERY = 4  # every 4th pydoc topic (sorted by name) is held out for perplexity

LINEAR_NAMES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


@dataclass
class AWQSettings:
    w_bit: int = 4
    group_size: int = 128
    method: str = "awq"  # "awq" | "rtn"
    n_grid: int = 20  # scale-exponent grid points
    clip_grid: int = 20
    max_shrink: float = 0.5  # clipping tries max|w| * (1 - i/clip_grid) for i < max_shrink * clip_grid
    clip_tokens: int = 512  # calibration tokens used by the clip search
    calib_samples: int = 128
    calib_seqlen: int = 512
    batch_sequences: int = 2  # sequences per forward chunk (bounds attention and MLP temporaries)
    # torch intra-op threads while quantizing (None: leave torch's setting). On a CPU shared with other
    # busy processes, 1 thread can be several times faster: the searches run thousands of small
    # element-wise ops, and each parallel op waits for every worker thread to get a core.
    threads: int | None = None
    # the next layer's calibration input: "float" (the float layer's output, as llm-awq's run_awq and AutoAWQ
    # compute it) or "quantized" (the output of the layer just quantized, so later layers see earlier errors)
    next_inputs: str = "float"
    device: str | None = None  # torch device for the searches (None: "cuda" when torch sees one, else "cpu")
    # dtype of the scale searches' block forwards: "auto" (bfloat16 where the hardware computes it natively:
    # CUDA with bf16, x86 CPUs with AVX512-BF16 or AMX; float32 elsewhere), "bfloat16" or "float32".
    # llm-awq and AutoAWQ search in the model's fp16; the fold, the clip search and the final
    # quantization stay in float32 either way. On 2 Zen 4 cores bf16 halves the nvila-lite-2b search time;
    # SmolLM2 perplexity: benchmarks/results/awq_quality.md.
    search_dtype: str = "auto"


# --------------------------------------------------------------------------------------------
# Calibration text
# --------------------------------------------------------------------------------------------


def default_corpus() -> tuple[str, str]:
    """(calibration text, held-out text) from CPython's ``pydoc_data.topics`` (no download).

    Topics are sorted by name; every ``HELDOUT_EVERY``-th one is held out for perplexity.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    calib = [topics[n] for i, n in enumerate(names) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [topics[n] for i, n in enumerate(names) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return "\n\n".join(calib), "\n\n".join(heldout)


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """1-D token ids of a long text, tokenized paragraph-block-wise (no special tokens)."""
    ids: list[int] = []
    chunks = text.split("\n\n")
    # tokenizing ~50 chunks at a time keeps every call under the tokenizer's length warning
    for start in range(0, len(chunks), 50):
        piece = "\n\n".join(chunks[start:start + 50])
        if start + 50 < len(chunks):
            piece += "\n\n"
        ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def calibration_ids(tokenizer, text: str, n_samples: int, seqlen: int) -> torch.Tensor:
    """[n, seqlen] blocks spread evenly over the tokenized text (deterministic)."""
    ids = tokenize_text(tokenizer, text)
    n_blocks = ids.numel() // seqlen
    if n_blocks == 0:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one block of {seqlen}")
    n = min(n_samples, n_blocks)
    picks = torch.linspace(0, n_blocks - 1, n).round().long()
    blocks = ids[: n_blocks * seqlen].reshape(n_blocks, seqlen)
    return blocks[picks].contiguous()


def load_calibration_text(calib_path: Path | str | None) -> str:
    if calib_path is None:
        return default_corpus()[0]
    path = Path(calib_path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration text file {path} does not exist")
    return path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Quantization primitives
# --------------------------------------------------------------------------------------------


def quantize_tensor(w: torch.Tensor, w_bit: int, group_size: int):
    """Asymmetric per-group quantization of a float weight [out, in].

    Returns (codes uint8 [out, in], scales fp16 [out, groups], zeros uint8 [out, groups]).
    Scales are rounded to fp16 before computing codes, so ``(q - z) * s`` with the stored fp16
    scale is exactly the weight every backend reconstructs.
    """
    out_features, in_features = w.shape
    groups = in_features // group_size
    wg = w.detach().to(torch.float32).reshape(out_features, groups, group_size)
    max_int = 2**w_bit - 1
    w_max = wg.amax(dim=-1)
    w_min = wg.amin(dim=-1)
    scales = ((w_max - w_min).clamp(min=1e-5) / max_int).to(torch.float16)
    s = scales.to(torch.float32)
    zeros = (-torch.round(w_min / s)).clamp(0, max_int)
    codes = (torch.round(wg / s.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, max_int)
    return (
        codes.reshape(out_features, in_features).to(torch.uint8),
        scales,
        zeros.to(torch.uint8),
    )


def pseudo_quantize(w: torch.Tensor, w_bit: int, group_size: int) -> torch.Tensor:
    """Quantize then dequantize (float32) a weight [..., in] with groups along the last dim.

    Same arithmetic as ``QuantizedLinear.dequantize(quantize_tensor(w))`` (bit-identical), done
    with in-place ops because the scale and clip searches call it hundreds of times per layer.
    """
    shape = w.shape
    wg = w.reshape(-1, shape[-1] // group_size, group_size).to(torch.float32, copy=True)
    max_int = 2**w_bit - 1
    w_max = wg.amax(dim=-1, keepdim=True)
    w_min = wg.amin(dim=-1, keepdim=True)
    scales = w_max.sub_(w_min).clamp_(min=1e-5).div_(max_int).half().float()
    zeros = w_min.div_(scales).round_().neg_().clamp_(0, max_int)
    return wg.div_(scales).round_().add_(zeros).clamp_(0, max_int).sub_(zeros).mul_(scales).reshape(shape)


def check_group_size(model: nn.Module, group_size: int, w_bit: int = 4, include_lm_head: bool = False) -> None:
    """Raise ValueError naming the first linear whose shape the group size (or packing) cannot handle."""
    if w_bit not in SUPPORTED_BITS:
        raise ValueError(f"w_bit must be one of {SUPPORTED_BITS}, got {w_bit}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    named = [(f"model.layers.{i}.{n}", layer.get_submodule(n)) for i, layer in enumerate(decoder_layers(model))
             for n in LINEAR_NAMES]
    if include_lm_head:
        named.append(("lm_head", model.get_output_embeddings()))
    all_in = [m.in_features for _, m in named]
    for name, module in named:
        if module.in_features % group_size:
            working = [g for g in SUPPORTED_GROUP_SIZES if all(k % g == 0 for k in all_in)]
            hint = f"group sizes that divide every layer: {working}" if working else "no supported group size divides every layer"
            raise ValueError(
                f"{name}: in_features {module.in_features} is not divisible by group size {group_size}; {hint}"
            )
        if module.out_features % 8:
            raise ValueError(
                f"{name}: out_features {module.out_features} is not a multiple of 8, which 4-bit packing needs"
            )


# --------------------------------------------------------------------------------------------
# Model plumbing (HF Llama / Qwen2 decoder layout)
# --------------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    try:
        return model.model.layers
    except AttributeError:
        raise ValueError(
            f"{type(model).__name__}: expected a HF causal LM with model.layers (Llama/Qwen2 layout)"
        ) from None


def _layer_output(out):
    return out[0] if isinstance(out, tuple) else out


class _ChunkedRunner:
    """Runs a module on [n, L, C] activations a few sequences at a time."""

    def __init__(self, position_embeddings, batch_sequences: int):
        self.position_embeddings = position_embeddings
        self.batch = max(1, batch_sequences)

    def cast(self, dtype: torch.dtype) -> _ChunkedRunner:
        """The same runner with its rotary tables in ``dtype`` (for blocks run in that dtype)."""
        if dtype == self.position_embeddings[0].dtype:
            return self
        return _ChunkedRunner(tuple(t.to(dtype) for t in self.position_embeddings), self.batch)

    def chunks(self, x: torch.Tensor):
        for start in range(0, x.shape[0], self.batch):
            yield x[start:start + self.batch]

    def run(self, fn, x: torch.Tensor) -> torch.Tensor:
        # filled in place: concatenating chunk outputs would hold the result twice at its peak
        out = None
        start = 0
        for chunk in self.chunks(x):
            y = fn(chunk)
            if out is None:
                out = torch.empty((x.shape[0], *y.shape[1:]), dtype=y.dtype, device=y.device)
            out[start:start + y.shape[0]] = y
            start += y.shape[0]
        return out

    def attention(self, attn: nn.Module):
        def fn(h):
            # attention_mask=None -> SDPA's causal path
            return _layer_output(attn(hidden_states=h, position_embeddings=self.position_embeddings,
                                      attention_mask=None))
        return fn

    def decoder_layer(self, layer: nn.Module):
        def fn(h):
            return _layer_output(layer(h, attention_mask=None, position_embeddings=self.position_embeddings))
        return fn


def _mean_squared_error(runner: _ChunkedRunner, fn, x: torch.Tensor, reference: torch.Tensor) -> float:
    total = 0.0
    start = 0
    for chunk in runner.chunks(x):
        out = fn(chunk).float()
        total += torch.nn.functional.mse_loss(out, reference[start:start + chunk.shape[0]].float(),
                                              reduction="sum").item()
        start += chunk.shape[0]
    return total / reference.numel()


SEARCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_search_dtype(settings: AWQSettings, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype of the scale searches for ``settings.search_dtype`` on ``device``."""
    name = settings.search_dtype
    if name == "auto":
        if torch.device(device).type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            cpu = torch.cpu
            native = any(getattr(cpu, probe, lambda: False)()
                         for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        return torch.bfloat16 if native else torch.float32
    if name not in SEARCH_DTYPES:
        raise ValueError(f"AWQ search dtype must be auto, float32 or bfloat16, got {name!r}")
    return SEARCH_DTYPES[name]


@contextlib.contextmanager
def _cast_block(block: nn.Module, dtype: torch.dtype):
    """Run ``block`` in ``dtype`` for a while (the searches also swap its weights): its float32
    parameters are put back afterwards, untouched."""
    saved = [(param, param.data) for param in block.parameters()]
    for param, data in saved:
        param.data = data.to(dtype)  # no copy for float32
    try:
        yield
    finally:
        for param, data in saved:
            param.data = data


# --------------------------------------------------------------------------------------------
# AWQ search
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def search_scale(runner, block: nn.Module, block_fn, linears: list[nn.Linear], x: torch.Tensor,
                 settings: AWQSettings, dtype: torch.dtype = torch.float32):
    """Grid-search s = mean|x|**ratio for ``linears`` (all fed by ``x``, inside ``block``, run by
    ``block_fn``); returns (scales, info). The block's forwards run in ``dtype`` (the reference output
    too, so the loss measures quantization only); scales and quantization are computed in float32."""
    # mean |x| per input channel, without materializing |x|
    x_mean = torch.linalg.vector_norm(x.reshape(-1, x.shape[-1]), ord=1, dim=0) / (x.numel() // x.shape[-1])
    originals = [m.weight.data for m in linears]  # float32; _cast_block puts them back
    x = x.to(dtype)
    best = (math.inf, 0.0, torch.ones_like(x_mean))
    losses = []
    with _cast_block(block, dtype):
        reference = runner.run(block_fn, x)
        for step in range(settings.n_grid):
            ratio = step / settings.n_grid
            scales = x_mean.pow(ratio).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            for module, weight in zip(linears, originals, strict=True):
                module.weight.data = (pseudo_quantize(weight * scales, settings.w_bit, settings.group_size)
                                      / scales).to(dtype)
            loss = _mean_squared_error(runner, block_fn, x, reference)
            losses.append(loss)
            if loss < best[0]:
                best = (loss, ratio, scales.clone())
    return best[2], {"ratio": best[1], "loss": best[0], "rtn_loss": losses[0]}


def sample_tokens(x: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Every k-th token of [..., C] activations so that about ``n_tokens`` remain (llm-awq's sampling)."""
    tokens = x.reshape(-1, x.shape[-1])
    return tokens[:: max(1, tokens.shape[0] // n_tokens)]


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, settings: AWQSettings) -> torch.Tensor:
    """Per-(row, group) clipping threshold minimising the group-wise output error; [out, groups]."""
    out_features, in_features = weight.shape
    gs = settings.group_size
    groups = in_features // gs
    tokens = sample_tokens(x, settings.clip_tokens).reshape(-1, groups, gs)  # [T, G, gs]
    wg = weight.reshape(out_features, groups, gs)
    best_max = torch.empty(out_features, groups, device=weight.device)
    rows_per_batch = 256 if out_features % 256 == 0 else 64
    for start in range(0, out_features, rows_per_batch):
        w = wg[start:start + rows_per_batch]
        org_max = w.abs().amax(dim=-1)  # [n, G]
        reference = torch.einsum("tgs,ngs->ntg", tokens, w)
        batch_best = org_max.clone()
        min_err = torch.full_like(org_max, math.inf)
        for i in range(int(settings.max_shrink * settings.clip_grid)):
            max_val = (org_max * (1 - i / settings.clip_grid)).unsqueeze(-1)
            clipped = torch.maximum(torch.minimum(w, max_val), -max_val)
            quantized = pseudo_quantize(clipped, settings.w_bit, gs)
            diff = torch.einsum("tgs,ngs->ntg", tokens, quantized).sub_(reference)
            err = diff.mul_(diff).mean(dim=1)
            better = err < min_err
            min_err[better] = err[better]
            batch_best[better] = max_val.squeeze(-1)[better]
        best_max[start:start + rows_per_batch] = batch_best
    return best_max


def apply_clip(module: nn.Linear, max_val: torch.Tensor, group_size: int) -> None:
    w = module.weight.data
    wg = w.reshape(w.shape[0], -1, group_size)
    limit = max_val.unsqueeze(-1).to(w.dtype)
    module.weight.data = torch.maximum(torch.minimum(wg, limit), -limit).reshape(w.shape)


def _scale_norm_into_linears(norm: nn.Module, linears, scales: torch.Tensor) -> None:
    norm.weight.data.div_(scales)
    if getattr(norm, "bias", None) is not None:
        norm.bias.data.div_(scales)
    for module in linears:
        module.weight.data.mul_(scales.view(1, -1))


def _scale_linear_into_linear(prev: nn.Linear, nxt: nn.Linear, scales: torch.Tensor) -> None:
    prev.weight.data.div_(scales.view(-1, 1))
    if prev.bias is not None:
        prev.bias.data.div_(scales)
    nxt.weight.data.mul_(scales.view(1, -1))


@torch.no_grad()
def awq_layer(layer: nn.Module, inputs: dict[str, torch.Tensor], runner: _ChunkedRunner, settings: AWQSettings) -> dict:
    """Search and fold scales, then clip, for one decoder layer (float32, in place)."""
    attn, mlp = layer.self_attn, layer.mlp
    info = {}
    x_attn, x_o, x_mlp, x_down = inputs["q"], inputs["o"], inputs["gate"], inputs["down"]

    dtype = resolve_search_dtype(settings, x_attn.device)
    search = runner.cast(dtype)
    s_qkv, info["qkv"] = search_scale(search, attn, search.attention(attn), [attn.q_proj, attn.k_proj, attn.v_proj],
                                      x_attn, settings, dtype)
    # o after v only without GQA: v's output channels must be o's input channels one to one
    scale_o = attn.v_proj.weight.shape == attn.o_proj.weight.shape
    if scale_o:
        s_o, info["o"] = search_scale(search, attn.o_proj, attn.o_proj, [attn.o_proj], x_o, settings, dtype)
    s_mlp, info["gate_up"] = search_scale(search, mlp, mlp, [mlp.gate_proj, mlp.up_proj], x_mlp, settings, dtype)
    s_down, info["down"] = search_scale(search, mlp.down_proj, mlp.down_proj, [mlp.down_proj], x_down, settings,
                                        dtype)

    # the clip search sees only a token sample: scale that sample, not the whole activation tensor
    x_attn, x_o, x_mlp, x_down = (sample_tokens(x, settings.clip_tokens) for x in (x_attn, x_o, x_mlp, x_down))
    _scale_norm_into_linears(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], s_qkv)
    x_attn = x_attn / s_qkv
    if scale_o:
        _scale_linear_into_linear(attn.v_proj, attn.o_proj, s_o)
        x_o = x_o / s_o
    _scale_norm_into_linears(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], s_mlp)
    x_mlp = x_mlp / s_mlp
    _scale_linear_into_linear(mlp.up_proj, mlp.down_proj, s_down)
    x_down = x_down / s_down

    # q/k are not clipped: their error reaches the output through the q.k product
    for module, x in ((attn.v_proj, x_attn), (attn.o_proj, x_o), (mlp.gate_proj, x_mlp),
                      (mlp.up_proj, x_mlp), (mlp.down_proj, x_down)):
        apply_clip(module, search_clip(module.weight.data, x, settings), settings.group_size)
    return info


def _capture_linear_inputs(layer: nn.Module, runner: _ChunkedRunner, hidden: torch.Tensor):
    """Run the layer; return (its output, inputs of q/o/gate/down as [n, L, C])."""
    modules = {"q": layer.self_attn.q_proj, "o": layer.self_attn.o_proj,
               "gate": layer.mlp.gate_proj, "down": layer.mlp.down_proj}
    n, length = hidden.shape[:2]
    # preallocated and filled chunk by chunk (a list + cat would need twice the memory at the end)
    captured = {key: torch.empty(n, length, m.in_features, dtype=torch.float32, device=hidden.device)
                for key, m in modules.items()}
    filled = dict.fromkeys(modules, 0)

    def keep(key, args):
        x = args[0].detach()
        captured[key][filled[key]:filled[key] + x.shape[0]] = x
        filled[key] += x.shape[0]

    hooks = [module.register_forward_hook(lambda _m, args, _out, key=key: keep(key, args))
             for key, module in modules.items()]
    try:
        output = runner.run(runner.decoder_layer(layer), hidden)
    finally:
        for hook in hooks:
            hook.remove()
    return output, captured


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process so far (MiB), where the platform reports it."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def _progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    # stderr, like the build's own step lines: stdout carries results (the engine path, JSON) for scripts.
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled,
                    console=Console(stderr=True))


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """Temporarily set torch's intra-op thread count (restored afterwards)."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def quantize_model(
    model: nn.Module, calib: torch.Tensor | None, settings: AWQSettings, progress: bool = True,
    float32_params: dict[str, torch.Tensor] | None = None, keep_dequantized: bool = True,
) -> tuple[dict[str, QuantizedLinear], dict]:
    """Quantize every decoder linear of a HF causal LM in place (layer by layer).

    On return each linear's weight holds its dequantized value (so ``model`` computes exactly
    what the quantized checkpoint computes) and the norms hold the folded AWQ scales.
    Returns the integer codes by module name and statistics. ``float32_params``, when given, is
    filled with the float32 values of every other parameter of the processed layers (the folded
    norms), before the layer goes back to the model's dtype (bf16 would round them).
    ``keep_dequantized=False`` drops each linear's weight once its codes exist (the model is then
    only good for its other parameters) so that peak memory stays the model plus one layer.
    """
    with torch_threads(settings.threads):
        return _quantize_layers(model, calib, settings, progress, float32_params, keep_dequantized)


def _quantize_layers(model, calib, settings: AWQSettings, progress: bool, float32_params, keep_dequantized: bool):
    if settings.method not in ("awq", "rtn"):
        raise ValueError(f"method must be 'awq' or 'rtn', got {settings.method!r}")
    check_group_size(model, settings.group_size, settings.w_bit)
    layers = decoder_layers(model)
    use_awq = settings.method == "awq"
    if use_awq and calib is None:
        raise ValueError("AWQ needs calibration token ids (calib); use method='rtn' to quantize without them")

    started = time.perf_counter()
    peak_before = peak_rss_mib()
    hidden = runner = None
    if use_awq:
        embed = model.get_input_embeddings()
        hidden = embed(calib).to(torch.float32)
        positions = torch.arange(calib.shape[1]).unsqueeze(0)
        position_embeddings = model.model.rotary_emb(hidden[:1], positions)
        position_embeddings = tuple(t.to(torch.float32) for t in position_embeddings)
        runner = _ChunkedRunner(position_embeddings, settings.batch_sequences)

    quantized: dict[str, QuantizedLinear] = {}
    layer_stats = []
    with _progress_bar(progress) as bar:
        task = bar.add_task(f"{settings.method.upper()} w{settings.w_bit} g{settings.group_size} layers",
                            total=len(layers))
        for index, layer in enumerate(layers):
            layer_started = time.perf_counter()
            original_dtype = next(layer.parameters()).dtype
            layer.to(torch.float32)
            stats = {"layer": index}
            if use_awq:
                next_hidden, inputs = _capture_linear_inputs(layer, runner, hidden)
                stats.update(awq_layer(layer, inputs, runner, settings))
                del inputs
            for name in LINEAR_NAMES:
                module = layer.get_submodule(name)
                codes, scales, zeros = quantize_tensor(module.weight.data, settings.w_bit, settings.group_size)
                qlinear = QuantizedLinear(codes, scales, zeros, settings.group_size, settings.w_bit,
                                          bias=None if module.bias is None else module.bias.data.clone())
                if keep_dequantized:
                    module.weight.data = qlinear.dequantize()
                else:
                    module.weight = nn.Parameter(torch.empty(0, dtype=module.weight.dtype), requires_grad=False)
                quantized[f"model.layers.{index}.{name}"] = qlinear
            if float32_params is not None:
                linear_params = {f"{n}.{p}" for n in LINEAR_NAMES for p in ("weight", "bias")}
                for name, param in layer.named_parameters():
                    if name not in linear_params:
                        float32_params[f"model.layers.{index}.{name}"] = param.detach().clone()
            layer.to(original_dtype)
            if use_awq:
                hidden = next_hidden
            stats["seconds"] = round(time.perf_counter() - layer_started, 3)
            layer_stats.append(stats)
            bar.advance(task)

    summary = {
        "method": settings.method,
        "w_bit": settings.w_bit,
        "group_size": settings.group_size,
        "calib_samples": 0 if calib is None else int(calib.shape[0]),
        "calib_seqlen": 0 if calib is None else int(calib.shape[1]),
        "search_dtype": str(resolve_search_dtype(settings)).removeprefix("torch.") if use_awq else None,
        "seconds": round(time.perf_counter() - started, 2),
        # process peak RSS before quantizing (model loaded) and after: the difference is the
        # quantizer's own footprint (one layer's activations + the integer codes)
        "peak_rss_before_mib": peak_before,
        "peak_rss_after_mib": peak_rss_mib(),
        "layers": layer_stats,
    }
    if use_awq:
        summary.update(awq_search_summary(layer_stats))
    return quantized, summary


def awq_search_summary(layer_stats: list[dict]) -> dict:
    """Mean block error relative to RTN and mean scale exponent per linear group, over the layers."""
    groups = ("qkv", "o", "gate_up", "down")
    reductions = [s[g]["loss"] / s[g]["rtn_loss"] for s in layer_stats for g in groups
                  if g in s and s[g]["rtn_loss"] > 0]
    return {
        "mean_block_error_vs_rtn": round(sum(reductions) / len(reductions), 4) if reductions else None,
        "mean_ratio": {g: round(sum(s[g]["ratio"] for s in layer_stats if g in s) / sum(g in s for s in layer_stats), 3)
                       for g in groups if any(g in s for s in layer_stats)},
    }


def quantize_lm_head(model: nn.Module, group_size: int, w_bit: int = 4) -> QuantizedLinear:
    """Round-to-nearest (with zero points) quantization of the output projection, for int4 heads."""
    head = model.get_output_embeddings()
    if head.in_features % group_size:
        raise ValueError(f"lm_head: in_features {head.in_features} is not divisible by group size {group_size}")
    codes, scales, zeros = quantize_tensor(head.weight.data, w_bit, group_size)
    return QuantizedLinear(codes, scales, zeros, group_size, w_bit,
                           bias=None if head.bias is None else head.bias.data.clone())


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int = 512, max_windows: int | None = None,
               batch: int = 4) -> float:
    """Perplexity over non-overlapping windows of a 1-D token stream (next-token NLL)."""
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: n_windows * seqlen].reshape(n_windows, seqlen)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, n_windows, batch):
        chunk = windows[start:start + batch]
        logits = model(input_ids=chunk).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += chunk[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


# --------------------------------------------------------------------------------------------
# Checkpoint entry point
# --------------------------------------------------------------------------------------------


def load_float_model(llm_dir: Path | str, dtype: torch.dtype | str = "auto"):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # transformers draws its own "Loading weights" bar; the quantizer's per-layer bar is the one users follow
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=dtype, attn_implementation="sdpa")
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    return model.eval(), tokenizer


def quantize_checkpoint(
    llm_dir: Path | str,
    out_dir: Path | str,
    *,
    w_bit: int = 4,
    group_size: int = 128,
    method: str = "awq",
    calib_path: Path | str | None = None,
    calib_samples: int = 128,
    calib_seqlen: int = 512,
    progress: bool = True,
    threads: int | None = None,
    settings: AWQSettings | None = None,
) -> dict:
    """Quantize a HF ``llm/`` folder layer by layer (``awq_stream``) into an AutoAWQ GEMM checkpoint
    in ``out_dir``, one shard per layer: memory is one layer plus the calibration activations.

    ``settings`` overrides the keyword defaults (grid, device, next_inputs...). Returns the statistics
    (also written to ``out_dir/awq_stats.json``).
    """
    from vila_edge.builder.awq_formats import AwqCheckpointWriter
    from vila_edge.builder.awq_stream import (
        calibration_for,
        checkpoint_tail,
        model_skeleton,
        quantize_layers,
        summarize,
    )
    from vila_edge.builder.tensor_stream import SafetensorsReader

    if w_bit != 4:
        raise ValueError(f"checkpoints are written in AutoAWQ's 4-bit format; w_bit={w_bit} is for evaluation only")
    llm_dir = Path(llm_dir)
    settings = settings or AWQSettings(w_bit=w_bit, group_size=group_size, method=method,
                                       calib_samples=calib_samples, calib_seqlen=calib_seqlen, threads=threads)
    started = time.perf_counter()
    skeleton = model_skeleton(llm_dir)
    calib = calibration_for(llm_dir, settings, calib_path) if settings.method == "awq" else None
    config = skeleton.config.to_dict()
    writer = AwqCheckpointWriter(out_dir, config, group_size=settings.group_size,
                                 num_shards=config["num_hidden_layers"] + 1, tokenizer_dir=llm_dir)
    layer_stats = []
    with SafetensorsReader(llm_dir) as reader:
        for layer in quantize_layers(skeleton, reader, settings, calib, progress=progress):
            writer.add(*layer.checkpoint_tensors())
            layer_stats.append(layer.stats)
        writer.add(checkpoint_tail(reader, config), {})
    writer.close()
    stats = summarize(settings, calib, layer_stats, time.perf_counter() - started)
    stats["calib_source"] = "pydoc_data.topics" if calib_path is None else Path(calib_path).name
    (Path(out_dir) / "awq_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
