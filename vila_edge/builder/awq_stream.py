"""Quantize a checkpoint on disk one decoder layer at a time (RTN or AWQ), never loading the model.

The model exists only as a skeleton on torch's ``meta`` device (modules, no storage). Layer ``i``
gets float32 tensors read from the memory-mapped checkpoint (``tensor_stream``), is searched
(AWQ: scales, then clipping, exactly ``awq.awq_layer``), quantized, yielded and then returned to
``meta``. Memory is one layer in float32 plus the calibration activations of one layer (AWQ), on
the search device: ``cuda`` when torch sees one, else the CPU.

The calibration input of layer ``i+1`` is layer ``i``'s float output by default, as llm-awq's
``run_awq`` and AutoAWQ compute it (the output is recorded before the scales are applied);
``AWQSettings.next_inputs="quantized"`` feeds the output of the quantized layer instead.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vila_edge.builder.awq import (
    LINEAR_NAMES,
    AWQSettings,
    _capture_linear_inputs,
    _ChunkedRunner,
    _progress_bar,
    awq_layer,
    awq_search_summary,
    calibration_ids,
    check_group_size,
    decoder_layers,
    load_calibration_text,
    peak_rss_mib,
    quantize_tensor,
    resolve_search_dtype,
    torch_threads,
)
from vila_edge.builder.awq_formats import QuantizedLinear

NORM_NAMES = ("input_layernorm", "post_attention_layernorm")
EMBED = "model.embed_tokens.weight"


@dataclass
class QuantizedLayer:
    index: int
    norms: dict[str, torch.Tensor]  # NORM_NAMES -> float32 (AWQ scales folded in)
    linears: dict[str, QuantizedLinear]  # LINEAR_NAMES -> codes (bias inside)
    stats: dict = field(default_factory=dict)

    def checkpoint_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedLinear]]:
        """(float tensors, quantized linears) by full HF name, for ``AwqCheckpointWriter.add``."""
        prefix = f"model.layers.{self.index}"
        return ({f"{prefix}.{name}.weight": value for name, value in self.norms.items()},
                {f"{prefix}.{name}": value for name, value in self.linears.items()})


def head_name(reader, config: dict) -> str:
    """The lm_head weight's name: its own, or the embedding's when the two are tied."""
    if "lm_head.weight" in reader:
        return "lm_head.weight"
    if not config.get("tie_word_embeddings", False):
        raise ValueError(f"{reader.folder}: no lm_head.weight and tie_word_embeddings is false")
    return EMBED


def checkpoint_tail(reader, config: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's last shard: final norm, embedding table, and the lm_head when it is not tied."""
    tail = {"model.norm.weight": reader.read("model.norm.weight"), EMBED: reader.read(EMBED)}
    if head_name(reader, config) != EMBED:
        tail["lm_head.weight"] = reader.read("lm_head.weight")
    return tail


def model_skeleton(llm_dir: Path | str) -> nn.Module:
    """The HF causal LM of ``llm_dir`` with every parameter on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(llm_dir))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


def search_device(settings: AWQSettings) -> torch.device:
    return torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def gather_rows(reader, name: str, ids: torch.Tensor) -> torch.Tensor:
    """float32 rows ``ids`` ([...]) of a 2-D table, read ~64 MiB at a time -> [..., cols]."""
    flat = ids.reshape(-1)
    out = torch.empty(flat.numel(), reader.shape(name)[1], dtype=torch.float32)
    for start, chunk in reader.row_chunks(name):
        hit = (flat >= start) & (flat < start + chunk.shape[0])
        out[hit] = chunk[flat[hit] - start].to(torch.float32)
    return out.reshape(*ids.shape, -1)


def calibration_for(llm_dir: Path | str, settings: AWQSettings, calib_path: Path | str | None = None) -> torch.Tensor:
    """[calib_samples, calib_seqlen] token ids of the calibration text (the default corpus when no path)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    return calibration_ids(tokenizer, load_calibration_text(calib_path), settings.calib_samples, settings.calib_seqlen)


@torch.no_grad()
def quantize_layers(skeleton: nn.Module, reader, settings: AWQSettings, calib: torch.Tensor | None = None,
                    progress: bool = True) -> Iterator[QuantizedLayer]:
    """Yield every decoder layer of ``skeleton`` quantized, reading its weights from ``reader``.

    ``reader``: a ``tensor_stream`` reader over the float checkpoint (HF names). ``calib``: token ids
    [n, L] for AWQ (None for RTN). Each layer's statistics include its seconds and the process peak RSS.
    """
    if settings.method not in ("awq", "rtn"):
        raise ValueError(f"method must be 'awq' or 'rtn', got {settings.method!r}")
    if settings.next_inputs not in ("float", "quantized"):
        raise ValueError(f"next_inputs must be 'float' or 'quantized', got {settings.next_inputs!r}")
    check_group_size(skeleton, settings.group_size, settings.w_bit)
    use_awq = settings.method == "awq"
    if use_awq and calib is None:
        raise ValueError("AWQ needs calibration token ids (calib); use method='rtn' to quantize without them")
    device = search_device(settings)
    hidden = runner = None
    if use_awq:
        hidden = gather_rows(reader, EMBED, calib).to(device)
        rotary = type(skeleton.model.rotary_emb)(config=skeleton.config).to(device)
        positions = torch.arange(calib.shape[1], device=device).unsqueeze(0)
        position_embeddings = tuple(t.to(torch.float32) for t in rotary(hidden[:1], positions))
        runner = _ChunkedRunner(position_embeddings, settings.batch_sequences)
    layers = decoder_layers(skeleton)
    with _progress_bar(progress) as bar:
        task = bar.add_task(f"{settings.method.upper()} w{settings.w_bit} g{settings.group_size} layers ({device.type})",
                            total=len(layers))
        for index, layer in enumerate(layers):
            started = time.perf_counter()
            with torch_threads(settings.threads):
                _load_layer(layer, reader, f"model.layers.{index}.", device)
                stats: dict = {"layer": index}
                if use_awq:
                    next_hidden, inputs = _capture_linear_inputs(layer, runner, hidden)
                    stats.update(awq_layer(layer, inputs, runner, settings))
                    del inputs
                linears = {name: _quantize_linear(layer.get_submodule(name), settings) for name in LINEAR_NAMES}
                if use_awq and settings.next_inputs == "quantized":
                    for name, qlinear in linears.items():
                        layer.get_submodule(name).weight.data = qlinear.dequantize().to(device)
                    next_hidden = runner.run(runner.decoder_layer(layer), hidden)
                norms = {name: layer.get_submodule(name).weight.data.to("cpu", torch.float32, copy=True)
                         for name in NORM_NAMES}
                layer.to("meta")  # frees this layer's storage
            if use_awq:
                hidden = next_hidden
            stats["seconds"] = round(time.perf_counter() - started, 3)
            stats["peak_rss_mib"] = peak_rss_mib()
            bar.advance(task)
            yield QuantizedLayer(index, norms, linears, stats)


def _load_layer(layer: nn.Module, reader, prefix: str, device: torch.device) -> None:
    names = list(layer.state_dict())
    state = {name: reader.read(prefix + name).to(device=device, dtype=torch.float32) for name in names}
    layer.load_state_dict(state, strict=True, assign=True)


def _quantize_linear(module: nn.Linear, settings: AWQSettings) -> QuantizedLinear:
    codes, scales, zeros = quantize_tensor(module.weight.data, settings.w_bit, settings.group_size)
    return QuantizedLinear(codes.cpu(), scales.cpu(), zeros.cpu(), settings.group_size, settings.w_bit,
                           bias=None if module.bias is None else module.bias.data.to("cpu", copy=True))


def summarize(settings: AWQSettings, calib: torch.Tensor | None, layer_stats: list[dict], seconds: float) -> dict:
    """The statistics ``awq.quantize_model`` reports, from the streamed layers' stats."""
    summary = {
        "method": settings.method, "w_bit": settings.w_bit, "group_size": settings.group_size,
        "calib_samples": 0 if calib is None else int(calib.shape[0]),
        "calib_seqlen": 0 if calib is None else int(calib.shape[1]),
        "n_grid": settings.n_grid, "next_inputs": settings.next_inputs, "device": search_device(settings).type,
        "search_dtype": (str(resolve_search_dtype(settings, search_device(settings))).removeprefix("torch.")
                         if settings.method == "awq" else None),
        "seconds": round(seconds, 2), "peak_rss_after_mib": peak_rss_mib(), "layers": layer_stats,
    }
    if settings.method == "awq":
        summary.update(awq_search_summary(layer_stats))
    return summary
