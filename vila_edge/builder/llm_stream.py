"""The int4 ONNX Runtime decoder, built in bounded memory: one layer read, quantized and written at a time.

Sources: a float HF folder (quantized here, RTN or AWQ, by ``awq_stream``), an AutoAWQ GEMM folder
or a TinyChat ``*v2.pt`` (their codes are repacked as they are). Weights are read from memory-mapped
files (``tensor_stream``), each layer goes straight into ``model.onnx.data`` (``decoder_onnx``), the
embedding table into ``embed_tokens.npy`` and the lm_head is quantized ~64 MiB of rows at a time.
Peak memory: one layer in float32 (+ AWQ's calibration activations), not the model.

Why we write the graph instead of driving onnxruntime-genai's builder layer by layer: the builder
loads the whole checkpoint (its AWQ loader reads every tensor, then repacks all of them) and builds
the whole graph in memory before saving, so a per-layer drive would mean re-implementing its loader
and saver around private internals that change between releases (0.18 moved them to onnx_ir). The
decoder it makes for Llama / Qwen2 is ~15 node types; ``decoder_onnx`` writes the same nodes, names
and attributes, so ONNX Runtime runs the same kernels (same speed) and ``tests/test_llm_builder.py``
checks that every initializer equals the builder's bit for bit. Its int8 lm_head uses ONNX Runtime's
own block quantizer (``quantize_matmul_8bits``), as the builder does.

Float parameters of an int4 decoder (norms with AWQ's folded scales, biases, the embedding table and
the head before quantization) pass through float16, the AutoAWQ checkpoint format that the PyTorch
oracle (``llm_onnx.reference_model``) reads; ``awq_dir`` writes that checkpoint alongside, in shards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from vila_edge.builder.awq import LINEAR_NAMES, AWQSettings
from vila_edge.builder.awq_formats import (
    AwqCheckpointWriter,
    QuantizedLinear,
    group_size_from_name,
    quantized_linear_from_awq_gemm,
    tinychat_v2_linear,
)
from vila_edge.builder.awq_stream import (
    EMBED,
    NORM_NAMES,
    QuantizedLayer,
    calibration_for,
    checkpoint_tail,
    head_name,
    model_skeleton,
    quantize_layers,
    summarize,
)
from vila_edge.builder.decoder_onnx import DecoderSpec, DecoderWriter, write_genai_config
from vila_edge.builder.fp8_qdq import FloatLinear
from vila_edge.builder.tensor_stream import SafetensorsReader, TorchFileReader
from vila_edge.heap import large_blocks_from_mmap

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")


def build_int4_decoder(
    llm_dir: Path | str, out_dir: Path | str, *, source: str, quant: str = "awq", group_size: int = 128,
    lm_head: str = "int8", accuracy_level: int = 4, prune_lm_head: bool = True, threads: int = 1,
    awq_dir: Path | str | None = None, calib_path: Path | str | None = None, settings: AWQSettings | None = None,
    progress: bool = True, filename: str = "model.onnx", embed_filename: str = "embed_tokens.npy",
    pt_file: Path | None = None, kv_dtype: str = "float32", attention: str = "gqa",
) -> dict:
    """Write ``filename`` (+ ``.data``), ``genai_config.json`` and the embedding table into ``out_dir``.

    ``source``: ``"float"`` (quantized here with ``quant`` = ``awq`` | ``rtn`` and ``settings``),
    ``"autoawq"`` or ``"tinychat-v2"`` (``pt_file``). Returns the build facts for decoder_info.json:
    quant, group_size, lm_head, awq statistics and awq_dir.
    """
    from transformers import AutoConfig

    llm_dir, out_dir = Path(llm_dir), Path(out_dir)
    large_blocks_from_mmap()
    config = AutoConfig.from_pretrained(str(llm_dir)).to_dict()  # with the model type's defaults filled in
    spec = DecoderSpec.from_config(config, accuracy_level=accuracy_level, prune_lm_head=prune_lm_head,
                                   kv_dtype=kv_dtype, attention=attention)
    started = time.perf_counter()
    reader = SafetensorsReader(llm_dir) if source != "tinychat-v2" else TorchFileReader(pt_file)
    facts: dict = {}
    try:
        if source == "float":
            settings = settings or AWQSettings(group_size=group_size, method=quant)
            calib = calibration_for(llm_dir, settings, calib_path) if settings.method == "awq" else None
            layers = quantize_layers(model_skeleton(llm_dir), reader, settings, calib, progress=progress)
            facts["quant"] = settings.method
        elif source == "autoawq":
            quant_config = config.get("quantization_config") or {}
            group_size = int(quant_config.get("group_size", group_size))
            layers = _prequantized_layers(reader, spec.num_layers, _autoawq_linear(reader, group_size))
            facts["quant"] = "prequantized-autoawq"
        elif source == "tinychat-v2":
            group_size = group_size_from_name(pt_file.name)
            layers = _prequantized_layers(reader, spec.num_layers, _tinychat_linear(reader, group_size, pt_file))
            facts["quant"] = "prequantized-tinychat-v2"
        else:
            raise ValueError(f"source must be 'float', 'autoawq' or 'tinychat-v2', got {source!r}")
        facts["group_size"] = group_size
        checkpoint = None
        if awq_dir is not None and source != "autoawq":
            checkpoint = AwqCheckpointWriter(awq_dir, config, group_size=group_size, num_shards=spec.num_layers + 1,
                                             tokenizer_dir=llm_dir)
            facts["awq_dir"] = str(awq_dir)
        layer_stats = _write_layers(DecoderWriter(out_dir, spec, filename), layers, checkpoint, config, reader,
                                    lm_head, group_size, out_dir / embed_filename)
        if source == "float":
            facts["awq_stats"] = summarize(settings, calib, layer_stats, time.perf_counter() - started)
        facts["lm_head"] = _head_facts(lm_head, group_size)
    finally:
        reader.close()
    _finish_decoder_dir(llm_dir, out_dir, spec, config, filename, threads)
    return facts


def _finish_decoder_dir(llm_dir: Path, out_dir: Path, spec, config: dict, filename: str, threads: int) -> None:
    """What every streamed decoder folder ends with: onnxruntime-genai's config and the tokenizer files."""
    write_genai_config(out_dir, spec, special_token_ids(llm_dir, config), filename, threads)
    for name in TOKENIZER_FILES:
        if (llm_dir / name).is_file():
            (out_dir / name).write_bytes((llm_dir / name).read_bytes())


def build_fp8_decoder(
    llm_dir: Path | str, out_dir: Path | str, *, fmt: str, activations: str = "dynamic", lm_head: str = "int8",
    group_size: int = 128, accuracy_level: int = 4, prune_lm_head: bool = True, threads: int = 1,
    filename: str = "model.onnx", embed_filename: str = "embed_tokens.npy", kv_dtype: str = "float32",
    attention: str = "gqa",
) -> dict:
    """The FP8 decoder (``fp8_qdq``: 128x128 weight blocks, ``activations`` ``dynamic`` 1x128 per token or
    ``none``) from a float HF folder, one layer at a time, like ``build_int4_decoder``. The lm_head is
    quantized as in int4 builds (``lm_head``, ``group_size``); norms, biases and the embedding table pass
    through float16 as there. Returns the build facts for decoder_info.json."""
    from transformers import AutoConfig

    llm_dir, out_dir = Path(llm_dir), Path(out_dir)
    large_blocks_from_mmap()
    config = AutoConfig.from_pretrained(str(llm_dir)).to_dict()
    spec = DecoderSpec.from_config(config, accuracy_level=accuracy_level, prune_lm_head=prune_lm_head,
                                   kv_dtype=kv_dtype, attention=attention)
    reader = SafetensorsReader(llm_dir)
    try:
        writer = DecoderWriter(out_dir, spec, filename, fp8=fmt, fp8_activations=activations)
        _write_layers(writer, _float_layers(reader, spec.num_layers), None, config, reader, lm_head, group_size,
                      out_dir / embed_filename)
    finally:
        reader.close()
    _finish_decoder_dir(llm_dir, out_dir, spec, config, filename, threads)
    return {"quant": f"fp8-{fmt}", "group_size": None, "lm_head": _head_facts(lm_head, group_size),
            "fp8": {"format": fmt, "activations": activations, "weight_block": [128, 128],
                    "activation_block": [1, 128] if activations == "dynamic" else None}}


def _float_layers(reader, num_layers: int) -> Iterator[QuantizedLayer]:
    """The float linears and norms of every layer, read one layer at a time (FP8 quantizes them when writing)."""
    for index in range(num_layers):
        prefix = f"model.layers.{index}"
        norms = {name: reader.read(f"{prefix}.{name}.weight").float() for name in NORM_NAMES}
        linears = {}
        for name in LINEAR_NAMES:
            bias = _optional(reader, f"{prefix}.{name}.bias")
            linears[name] = FloatLinear(reader.read(f"{prefix}.{name}.weight").float().numpy(),
                                        None if bias is None else bias.float().numpy())
        yield QuantizedLayer(index, norms, linears)


def special_token_ids(llm_dir: Path, config: dict) -> dict:
    """bos / eos / pad ids as onnxruntime-genai's builder resolves them: the config first, then the tokenizer;
    the tokenizer's end-of-turn token joins eos; bos defaults to 1, pad to the first eos."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    except (OSError, ValueError):
        tokenizer = None

    def resolve(key: str):
        value = config.get(key)
        return value if value is not None or tokenizer is None else getattr(tokenizer, key, None)

    bos, eos, pad = resolve("bos_token_id"), resolve("eos_token_id"), resolve("pad_token_id")
    if eos is None:
        raise ValueError(f"{llm_dir}: no eos_token_id in config.json nor in the tokenizer")
    ids = list(eos) if isinstance(eos, list) else [eos]
    turn_end = None
    if tokenizer is not None and getattr(tokenizer, "eos_token", None) is not None:
        turn_end = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    return {"bos_token_id": 1 if bos is None else bos,
            "eos_token_id": eos if turn_end is None or turn_end in ids else [turn_end, *ids],
            "pad_token_id": ids[0] if pad is None else pad}


def _write_layers(writer: DecoderWriter, layers: Iterator[QuantizedLayer], checkpoint, config: dict, reader,
                  lm_head: str, group_size: int, embed_path: Path) -> list[dict]:
    stats = []
    try:
        for layer in layers:
            norms = {name: _through_fp16(value) for name, value in layer.norms.items()}
            linears = {name: _bias_through_fp16(ql) for name, ql in layer.linears.items()}
            writer.add_layer(layer.index, {k: v.numpy() for k, v in norms.items()}, linears)
            if checkpoint is not None:
                checkpoint.add(*QuantizedLayer(layer.index, norms, linears).checkpoint_tensors())
            stats.append(layer.stats)
        final_norm = _through_fp16(reader.read("model.norm.weight").float())
        write_embedding_table(reader, embed_path)
        head_rows = ((start, _through_fp16(rows))
                     for start, rows in reader.row_chunks(head_name(reader, config), torch.float32))
        writer.finish(final_norm.numpy(), head_rows, lm_head, group_size)
    finally:
        writer.close()
    if checkpoint is not None:
        checkpoint.add(checkpoint_tail(reader, config), {})
        checkpoint.close()
    return stats


def _head_facts(lm_head: str, group_size: int) -> dict:
    if lm_head == "float":
        return {"quant": "float"}
    if lm_head == "int8":  # the same bytes the model builder's int8 head has (ONNX Runtime's quantizer)
        return {"quant": "builder-rtn-int8-symmetric", "group_size": group_size}
    return {"quant": "rtn-int4", "group_size": group_size}


def _through_fp16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.float16).to(torch.float32)


def _bias_through_fp16(layer: QuantizedLinear | FloatLinear) -> QuantizedLinear | FloatLinear:
    if layer.bias is None:
        return layer
    if isinstance(layer, FloatLinear):
        return FloatLinear(layer.weight, layer.bias.astype(np.float16).astype(np.float32))
    return QuantizedLinear(layer.q, layer.scales, layer.zeros, layer.group_size, layer.bits, _through_fp16(layer.bias))


def write_embedding_table(reader, path: Path) -> None:
    """embed_tokens.npy as float16 (float32 tables too: the int4 decoder's oracle holds float16), in row chunks."""
    rows, cols = reader.shape(EMBED)
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": np.dtype(np.float16).str, "fortran_order": False,
                                                      "shape": (rows, cols)})
        for _, chunk in reader.row_chunks(EMBED):
            handle.write(chunk.to(torch.float16).numpy().tobytes())


# ---- pre-quantized checkpoints ------------------------------------------------------------------------


def _prequantized_layers(reader, num_layers: int, linear) -> Iterator[QuantizedLayer]:
    for index in range(num_layers):
        prefix = f"model.layers.{index}"
        norms = {name: reader.read(f"{prefix}.{name}.weight").float() for name in NORM_NAMES}
        yield QuantizedLayer(index, norms, {name: linear(f"{prefix}.{name}") for name in LINEAR_NAMES})


def _optional(reader, name: str) -> torch.Tensor | None:
    return reader.read(name) if name in reader else None


def _autoawq_linear(reader, group_size: int):
    def read(prefix: str) -> QuantizedLinear:
        if f"{prefix}.qweight" not in reader:
            raise ValueError(f"{reader.folder}: AutoAWQ checkpoint has no {prefix}.qweight")
        return quantized_linear_from_awq_gemm(reader.read(f"{prefix}.qweight"), reader.read(f"{prefix}.qzeros"),
                                              reader.read(f"{prefix}.scales"), group_size,
                                              bias=_optional(reader, f"{prefix}.bias"))
    return read


def _tinychat_linear(reader, group_size: int, pt_file: Path):
    def read(prefix: str) -> QuantizedLinear:
        return tinychat_v2_linear(reader.read(f"{prefix}.qweight"), reader.read(f"{prefix}.scales"),
                                  reader.read(f"{prefix}.scaled_zeros"), group_size,
                                  bias=_optional(reader, f"{prefix}.bias"), where=f"{pt_file}: {prefix}")
    return read
