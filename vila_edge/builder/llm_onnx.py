"""Build the ONNX Runtime language-model decoder with onnxruntime-genai's model builder.

The decoder takes ``inputs_embeds`` (the runtime splices image features into the text
embeddings), runs int4 ``MatMulNBits`` (from our AWQ checkpoint) with the KV cache as
past/present tensors, and returns logits. The text embedding table is stored next to it as
``embed_tokens.npy``. onnxruntime-genai's own generator cannot drive an ``inputs_embeds``
decoder; the runtime drives it with a plain ``onnxruntime.InferenceSession``.

Precisions: ``int4`` (quant ``awq`` | ``rtn`` = our quantizer then the builder's AWQ loader,
``builder`` = the builder's own symmetric RTN), ``int8`` / ``fp32`` / ``fp16`` from the float
weights. A folder that is already AWQ-quantized (AutoAWQ, or a TinyChat ``*v2.pt``) is used as is.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

PRECISIONS = ("int4", "int8", "fp8", "fp16", "fp32")
INT4_QUANT = ("awq", "rtn", "builder")
LM_HEAD_PRECISIONS = ("int8", "int4", "float")
DECODER_FILENAME = "model.onnx"
EMBED_FILENAME = "embed_tokens.npy"
LM_HEAD_FILENAME = "lm_head_int4.safetensors"


class LLMBuildError(RuntimeError):
    """The model builder failed; the message carries the tail of its log."""


def default_threads() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; pass the checkpoint's llm/ folder")
    return json.loads(path.read_text())


def _embedding_and_head(folder: Path, config: dict):
    """(embedding weight, lm_head weight) as float32 torch tensors from a float or AWQ folder."""
    import torch
    from safetensors import safe_open

    from vila_edge.builder.awq_formats import find_tinychat_v2_file, is_awq_checkpoint, read_tinychat_v2

    wanted = {"model.embed_tokens.weight", "lm_head.weight"}
    found = {}
    if find_tinychat_v2_file(folder) is not None and not is_awq_checkpoint(folder):
        floats, _ = read_tinychat_v2(find_tinychat_v2_file(folder))
        found = {k: v for k, v in floats.items() if k in wanted}
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder}: no *.safetensors weights")
        for file in files:
            if file.name == LM_HEAD_FILENAME:
                continue
            with safe_open(str(file), framework="pt") as handle:
                for name in wanted & set(handle.keys()):
                    found[name] = handle.get_tensor(name)
    if "model.embed_tokens.weight" not in found:
        raise ValueError(f"{folder}: no model.embed_tokens.weight in the weights")
    embed = found["model.embed_tokens.weight"]
    head = found.get("lm_head.weight")
    if head is None:
        if not config.get("tie_word_embeddings", False):
            raise ValueError(f"{folder}: no lm_head.weight and tie_word_embeddings is false")
        head = embed
    return embed, head.to(torch.float32)


def _stage_with_int4_head(awq_dir: Path, staging: Path, group_size: int, config: dict) -> dict:
    """Builder input = the AWQ folder (symlinked) + an int4 lm_head written in the same AWQ format.

    The builder's AWQ loader reads every ``*.safetensors`` of the folder, so the extra file
    ``lm_head.{qweight,qzeros,scales}`` turns the head into a MatMulNBits with our own RTN
    codes (which the PyTorch reference can reproduce), instead of the builder's RTN.
    """
    from safetensors.torch import save_file

    from vila_edge.builder.awq import quantize_tensor
    from vila_edge.builder.awq_formats import QuantizedLinear, awq_gemm_tensors

    staging.mkdir(parents=True, exist_ok=True)
    for path in awq_dir.iterdir():
        if path.is_file():
            os.symlink(path.resolve(), staging / path.name)
    _, head = _embedding_and_head(awq_dir, config)
    codes, scales, zeros = quantize_tensor(head, 4, group_size)
    tensors = {f"lm_head.{k}": v for k, v in awq_gemm_tensors(QuantizedLinear(codes, scales, zeros, group_size)).items()}
    save_file(tensors, str(staging / LM_HEAD_FILENAME))
    return {"quant": "rtn-int4", "group_size": group_size}


def int4_lm_head_weight(head, group_size: int):
    """The float32 lm_head weight that the int4 decoder computes with (for PyTorch references)."""
    from vila_edge.builder.awq import pseudo_quantize

    return pseudo_quantize(head.float(), 4, group_size)


def reference_model(awq_or_float_dir: Path | str, info: dict, decoder_dir: Path | str | None = None):
    """PyTorch model computing what the built decoder computes (the parity oracle).

    ``awq_or_float_dir``: the AWQ checkpoint the decoder was built from (``info["awq_dir"]``
    when it was kept) or the float folder for fp32 builds. ``decoder_dir`` is needed only when
    the builder quantized the head itself (its codes are then read back from the graph).
    """
    import torch

    from vila_edge.builder.awq_formats import is_awq_checkpoint, load_dequantized_model

    folder = Path(awq_or_float_dir)
    if is_awq_checkpoint(folder):
        model = load_dequantized_model(folder)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa").eval()
        if str(info.get("quant", "")).startswith(("builder-", "fp8-")):
            # the builder quantized the float weights itself: its codes exist only in the graph
            if decoder_dir is None:
                raise ValueError("the builder quantized this decoder: pass decoder_dir to read its weights back")
            graph = {k: torch.from_numpy(v) for k, v in dequantized_weights(decoder_dir).items()}
            if getattr(model.config, "tie_word_embeddings", False):
                model.lm_head.weight = torch.nn.Parameter(graph.pop("lm_head.weight"))
                model.config.tie_word_embeddings = False
            unknown = set(graph) - set(model.state_dict())
            if unknown:
                raise ValueError(f"{decoder_dir}: graph weights the model does not have: {sorted(unknown)}")
            model.load_state_dict(graph, strict=False)
            if (info.get("fp8") or {}).get("activations") == "dynamic":
                from vila_edge.builder.fp8_qdq import quantize_linear_inputs

                # the decoder layers' linears see FP8 inputs; the lm_head's stay float
                quantize_linear_inputs(model, info["fp8"]["format"], include=lambda name: ".layers." in f".{name}")
            return model
    head = info.get("lm_head", {})
    if head.get("quant", "").startswith("builder-"):
        if decoder_dir is None:
            raise ValueError("the builder quantized this decoder's lm_head: pass decoder_dir to read it back")
        weight = torch.from_numpy(dequantized_weights(decoder_dir)["lm_head.weight"])
        model.lm_head.weight = torch.nn.Parameter(weight)
        model.config.tie_word_embeddings = False
    elif head.get("quant") == "rtn-int4":
        weight = int4_lm_head_weight(model.get_output_embeddings().weight.data, head["group_size"])
        if getattr(model.config, "tie_word_embeddings", False):
            # untie: the decoder's head is int4 while the runtime's embedding table stays float
            model.lm_head.weight = torch.nn.Parameter(weight)
            model.config.tie_word_embeddings = False
        else:
            model.get_output_embeddings().weight.data = weight
    return model


def matmulnbits_parts(node, initializers) -> dict:
    """The quantized pieces of one MatMulNBits node: ``codes`` uint8 [N, blocks * block] (unpacked),
    ``zeros`` float32 [N, blocks] (integer-valued when the graph stores uint8 zero points), ``scales``
    float32 [N, blocks], and the node's ``K``, ``N``, ``block`` and ``bits``."""
    import onnx
    from onnx import numpy_helper

    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, block, bits = attrs["K"], attrs["N"], attrs["block_size"], attrs["bits"]
    if bits not in (4, 8):
        raise NotImplementedError(f"{node.name}: {bits}-bit MatMulNBits is not unpacked here (4 and 8 only)")
    packed = numpy_helper.to_array(initializers[node.input[1]]).reshape(n, -1)
    scales = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float32).reshape(n, -1)
    blocks = scales.shape[1]

    def unpack(values: np.ndarray) -> np.ndarray:  # uint8 rows -> codes, low nibble first for 4-bit
        if bits == 8:
            return values
        return np.stack([values & 0x0F, values >> 4], axis=-1).reshape(values.shape[0], -1)

    codes = unpack(packed)[:, :blocks * block]
    if len(node.input) > 3 and node.input[3]:
        zp = numpy_helper.to_array(initializers[node.input[3]])
        if zp.dtype == np.uint8:
            zp = unpack(zp.reshape(n, -1))[:, :blocks]
        zeros = zp.reshape(n, blocks).astype(np.float32)
    else:
        zeros = np.full((n, blocks), 2 ** (bits - 1), np.float32)  # symmetric: implicit zero point 8 / 128
    return {"codes": codes, "zeros": zeros, "scales": scales, "K": k, "N": n, "block": block, "bits": bits}


def _unpack_matmulnbits(node, initializers) -> np.ndarray:
    """Float32 weight [N, K] of one MatMulNBits node: (code - zero) * scale per block along K."""
    p = matmulnbits_parts(node, initializers)
    n, blocks, block = p["N"], p["scales"].shape[1], p["block"]
    codes = p["codes"].reshape(n, blocks, block).astype(np.float32)
    return ((codes - p["zeros"][:, :, None]) * p["scales"][:, :, None]).reshape(n, blocks * block)[:, :p["K"]]


def _fp8_weights(nodes, initializers) -> dict[str, np.ndarray]:
    """FP8 QDQ weights (``fp8_qdq``): each weight DequantizeLinear's output name -> the float32 [N, K] it makes."""
    from onnx import TensorProto, numpy_helper

    from vila_edge.builder.fp8_qdq import weight_from_qdq

    formats = {TensorProto.FLOAT8E4M3FN: "e4m3", TensorProto.FLOAT8E5M2: "e5m2"}
    out = {}
    for node in nodes:
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            codes = initializers[node.input[0]]
            if codes.data_type in formats and len(codes.dims) == 2:
                out[node.output[0]] = weight_from_qdq(numpy_helper.to_array(codes),
                                                      numpy_helper.to_array(initializers[node.input[1]]),
                                                      formats[codes.data_type])
    return out


def dequantized_weights(decoder_dir: Path | str) -> dict[str, np.ndarray]:
    """HF-named float32 weights that the built decoder computes with, read back from its graph.

    Linears (MatMulNBits dequantized, or float MatMul), q/k/v biases, and the RMSNorm weights (which
    hold AWQ's folded scales, so they differ from the source checkpoint's). The fused ``qkv_proj``
    is split with the head counts in ``genai_config.json``. The embedding table is the decoder's
    ``embed_tokens.npy``.
    """
    import onnx
    from onnx import numpy_helper

    decoder_dir = Path(decoder_dir)
    genai = json.loads((decoder_dir / "genai_config.json").read_text())["model"]["decoder"]
    q_rows = genai["num_attention_heads"] * genai["head_size"]
    kv_rows = genai["num_key_value_heads"] * genai["head_size"]
    num_layers = genai["num_hidden_layers"]
    model = onnx.load(str(decoder_dir / genai.get("filename", DECODER_FILENAME)), load_external_data=True)
    initializers = {i.name: i for i in model.graph.initializer}

    def hf_prefix(parts: list[str]) -> str:  # ['', 'model', 'layers.3', 'attn', 'o_proj', ...]
        block = "self_attn" if parts[3] == "attn" else "mlp"
        return f"model.{parts[2]}.{block}.{parts[4]}"

    def put(prefix: str, suffix: str, value: np.ndarray, axis_split: bool):
        if prefix.endswith("qkv_proj"):
            base = prefix[: -len("qkv_proj")]
            pieces = (value[:q_rows], value[q_rows:q_rows + kv_rows], value[q_rows + kv_rows:])
            for name, piece in zip(("q_proj", "k_proj", "v_proj"), pieces, strict=True):
                out[f"{base}{name}.{suffix}"] = piece
        elif prefix.endswith("gate_up_proj") and axis_split:
            base = prefix[: -len("gate_up_proj")]
            half = value.shape[0] // 2
            out[f"{base}gate_proj.{suffix}"], out[f"{base}up_proj.{suffix}"] = value[:half], value[half:]
        else:
            out[f"{prefix}.{suffix}"] = value

    out: dict[str, np.ndarray] = {}
    fp8_weights = _fp8_weights(model.graph.node, initializers)  # DequantizeLinear output -> float32 [N, K]
    for node in model.graph.node:
        parts = node.name.split("/")
        if node.op_type == "MatMulNBits" or (node.op_type == "MatMul" and (node.input[1] in initializers
                                                                           or node.input[1] in fp8_weights)):
            if node.op_type == "MatMulNBits":
                weight = _unpack_matmulnbits(node, initializers)
            elif node.input[1] in fp8_weights:
                weight = fp8_weights[node.input[1]]
            else:
                weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32).T
            if len(parts) > 1 and parts[1] == "lm_head":
                out["lm_head.weight"] = weight
            elif len(parts) > 4 and parts[1] == "model" and parts[2].startswith("layers."):
                put(hf_prefix(parts), "weight", weight, axis_split=True)
        elif node.op_type == "Add" and len(parts) > 4 and parts[1] == "model" and parts[2].startswith("layers."):
            bias = next((i for i in node.input if i in initializers), None)
            if bias is not None:
                put(hf_prefix(parts), "bias", numpy_helper.to_array(initializers[bias]).astype(np.float32), True)
    for name, init in initializers.items():
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            out[name] = numpy_helper.to_array(init).astype(np.float32)
        elif name == f"model.layers.{num_layers}.final_norm_layernorm.weight":
            out["model.norm.weight"] = numpy_helper.to_array(init).astype(np.float32)
    return out


def _run_builder(builder_input: Path, out_dir: Path, precision: str, extra: dict[str, str], cache_dir: Path,
                 log_path: Path) -> None:
    """Run the onnxruntime-genai builder in-process. Its own output (a line per layer and per tensor on
    stdout, tqdm on stderr, the quantizer's INFO log: hundreds of lines) goes to `log_path`; the caller's
    step progress is what users see, and a failure quotes the log's tail."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    args = [f"{k}={v}" for k, v in extra.items()]
    log = io.StringIO()
    quiet = contextlib.ExitStack()
    quiet.enter_context(contextlib.redirect_stdout(log))
    quiet.enter_context(contextlib.redirect_stderr(log))
    quiet.enter_context(_logger_level("onnxruntime.quantization", logging.WARNING))
    quiet.enter_context(_logger_level("onnxruntime.quantization.matmul_nbits_quantizer", logging.WARNING))
    try:
        with quiet:
            options = parse_extra_options(None, str(builder_input), str(out_dir), precision, "cpu", str(cache_dir), args)
            create_model(None, str(builder_input), str(out_dir), precision, "cpu", str(cache_dir), **options)
    except Exception as error:
        tail = "\n".join(log.getvalue().splitlines()[-20:])
        raise LLMBuildError(
            f"onnxruntime-genai builder failed on {builder_input} (precision {precision}): {error}\n{tail}"
        ) from error
    finally:
        log_path.write_text(log.getvalue())


@contextlib.contextmanager
def _logger_level(name: str, level: int):
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _describe_onnx(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    levels = sorted({a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"})
    blocks = sorted({a.i for n in nbits for a in n.attribute if a.name == "block_size"})
    bits = sorted({a.i for n in nbits for a in n.attribute if a.name == "bits"})
    head_nodes = [n.name for n in model.graph.node if "lm_head" in n.name and n.op_type in ("MatMul", "MatMulNBits")]
    io_type = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    return {
        "inputs": inputs,
        "outputs": outputs,
        "matmulnbits": {"count": len(nbits), "accuracy_levels": levels, "block_sizes": blocks, "bits": bits},
        "lm_head_op": head_nodes,
        "io_dtype": onnx.helper.tensor_dtype_to_np_dtype(io_type.get("inputs_embeds", 1)).name,
        "attention": "gqa" if any(n.op_type == "GroupQueryAttention" for n in model.graph.node) else (
            "grouped" if any(n.op_type == "ScatterND" for n in model.graph.node) else "other"),
        "kv_dtype": onnx.helper.tensor_dtype_to_np_dtype(
            next((t for name, t in io_type.items() if name.startswith("past_key_values.")), 1)).name,
    }


def build_llm_onnx(
    llm_dir: Path,
    out_dir: Path,
    *,
    precision: str = "int4",
    quant: str = "awq",
    group_size: int = 128,
    calib_path: Path | None = None,
    threads: int | None = None,
    accuracy_level: int = 4,
    progress: bool = True,
    lm_head: str = "int8",
    prune_lm_head: bool = True,
    awq_dir: Path | None = None,
    calib_samples: int = 128,
    calib_seqlen: int = 512,
    quantize_threads: int | None = None,
    writer: str = "stream",
    awq_grid: int = 20,
    awq_settings=None,
    fp8_format: str = "e4m3",
    fp8_activations: str = "dynamic",
    kv_dtype: str = "float32",
    attention: str = "gqa",
) -> dict:
    """Build the inputs_embeds decoder + embedding table into ``out_dir``; return its description.

    ``lm_head``: precision of the output projection in int4/int8 builds: ``"int8"`` (default; the
    builder's symmetric RTN, block ``group_size``: on SmolLM2 an int4 g64 head alone costs +2.7
    perplexity, int8 +0.02, see benchmarks/results/awq_quality.md), ``"int4"`` (our asymmetric RTN, the
    smallest decoder) or ``"float"``. ``prune_lm_head``: compute logits for the last position only (prefill cost; the runtime
    needs no other). ``awq_dir``: keep the AutoAWQ checkpoint made from a float ``llm_dir`` there
    (it is needed to rebuild the PyTorch reference; otherwise it is temporary). ``quantize_threads``:
    torch threads for the AWQ/RTN quantizer (None: torch's setting; see ``AWQSettings.threads``),
    independent of ``threads``, the decoder's ONNX Runtime intra-op threads.

    ``writer``: ``"stream"`` (default) builds int4 decoders from our quantizer or a pre-quantized folder
    one layer at a time (``llm_stream``: bounded memory, the same graph); ``"genai"`` runs
    onnxruntime-genai's builder on the whole model, which is also what fp32 / fp16 / int8 and
    ``quant="builder"`` always use. ``awq_grid``: scale-search grid points. ``awq_settings``: an
    ``AWQSettings`` overriding all the quantizer's options (device, next_inputs...) for streamed builds.

    ``precision="fp8"``: the layers' linears as FP8 QDQ (``fp8_qdq``), ``fp8_format`` ``e4m3`` | ``e5m2``,
    ``fp8_activations`` ``dynamic`` (per-token 1x128 scales, W8A8) | ``none`` (weight-only); always streamed
    from a float folder; the lm_head as ``lm_head`` says.
    """
    llm_dir, out_dir = Path(llm_dir), Path(out_dir)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int4" and quant not in INT4_QUANT:
        raise ValueError(f"quant must be one of {INT4_QUANT} for int4, got {quant!r}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0..4 (4 = int8 activations on CPU), got {accuracy_level}")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128, got {group_size}")
    if lm_head not in LM_HEAD_PRECISIONS:
        raise ValueError(f"lm_head must be one of {LM_HEAD_PRECISIONS}, got {lm_head!r}")
    if writer not in ("stream", "genai"):
        raise ValueError(f"writer must be 'stream' or 'genai', got {writer!r}")
    from vila_edge.builder.decoder_onnx import ATTENTIONS, KV_DTYPES

    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if attention == "grouped" and kv_dtype != "float32":
        raise ValueError("attention='grouped' needs kv_dtype='float32' (its MatMuls read the cache as it is)")
    from vila_edge.builder.awq import AWQSettings
    from vila_edge.builder.awq_formats import find_tinychat_v2_file, is_awq_checkpoint

    _read_config(llm_dir)  # fail early, naming the folder, when it is not an HF model folder
    prequantized = is_awq_checkpoint(llm_dir) or find_tinychat_v2_file(llm_dir) is not None
    if precision == "fp8":
        from vila_edge.builder.fp8_qdq import ACTIVATION_MODES, FP8_LINEAR_FORMATS

        if fp8_format not in FP8_LINEAR_FORMATS:
            raise ValueError(f"fp8_format must be one of {FP8_LINEAR_FORMATS}, got {fp8_format!r}")
        if fp8_activations not in ACTIVATION_MODES:
            raise ValueError(f"fp8_activations must be one of {ACTIVATION_MODES}, got {fp8_activations!r}")
    if prequantized and precision != "int4":
        raise ValueError(f"{llm_dir} holds AWQ int4 weights; build it with precision='int4' (got {precision!r})")
    streamed = precision == "fp8" or (writer == "stream" and precision == "int4"
                                      and (prequantized or quant in ("awq", "rtn")))
    if kv_dtype != "float32" and not streamed:
        raise ValueError(f"kv_dtype={kv_dtype!r} needs our decoder writer (int4 AWQ/RTN or fp8, writer='stream'); "
                         f"onnxruntime-genai's CPU builds keep an fp32 cache")
    if attention != "gqa" and not streamed:
        raise ValueError(f"attention={attention!r} needs our decoder writer (int4 AWQ/RTN or fp8, writer='stream'); "
                         f"onnxruntime-genai's builder writes GroupQueryAttention")
    threads = threads or default_threads()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".llm-build-", dir=out_dir))
    info: dict = {"precision": precision, "group_size": group_size if precision in ("int4", "int8") else None}
    try:
        if precision == "fp8":
            embed_dtype, awq_stats = _build_fp8(llm_dir, out_dir, info, fmt=fp8_format, activations=fp8_activations,
                                                lm_head=lm_head, group_size=group_size, accuracy_level=accuracy_level,
                                                prune_lm_head=prune_lm_head, threads=threads, kv_dtype=kv_dtype,
                                                attention=attention)
        elif streamed:
            embed_dtype, awq_stats = _build_streamed(
                llm_dir, out_dir, info, quant=quant, group_size=group_size, lm_head=lm_head,
                accuracy_level=accuracy_level, prune_lm_head=prune_lm_head, threads=threads, awq_dir=awq_dir,
                calib_path=calib_path, kv_dtype=kv_dtype, attention=attention, progress=progress,
                settings=awq_settings or AWQSettings(
                    w_bit=4, group_size=group_size, method=quant, calib_samples=calib_samples,
                    calib_seqlen=calib_seqlen, threads=quantize_threads, n_grid=awq_grid))
        else:
            embed_dtype, awq_stats = _build_with_genai(
                llm_dir, out_dir, staging, info, precision=precision, quant=quant, group_size=group_size,
                lm_head=lm_head, accuracy_level=accuracy_level, prune_lm_head=prune_lm_head, awq_dir=awq_dir,
                calib_path=calib_path, calib_samples=calib_samples, calib_seqlen=calib_seqlen, progress=progress,
                quantize_threads=quantize_threads, prequantized=prequantized)

        from vila_edge.builder.decoder_onnx import add_logits_to_keep

        # speculative decoding reads the logits of the k+1 positions it verifies (default: the last one)
        logits_to_keep = bool(prune_lm_head) and add_logits_to_keep(out_dir / DECODER_FILENAME)
        genai_path = out_dir / "genai_config.json"
        genai = json.loads(genai_path.read_text())
        session = genai["model"]["decoder"].setdefault("session_options", {})
        session["intra_op_num_threads"] = int(threads)
        genai_path.write_text(json.dumps(genai, indent=4) + "\n")
        if awq_stats is not None:
            (out_dir / "awq_stats.json").write_text(json.dumps(awq_stats, indent=2) + "\n")

        decoder = genai["model"]["decoder"]
        described = _describe_onnx(out_dir / DECODER_FILENAME)
        info.update({
            "files": {
                "decoder": DECODER_FILENAME,
                "decoder_data": DECODER_FILENAME + ".data" if (out_dir / (DECODER_FILENAME + ".data")).exists() else None,
                "embed_tokens": EMBED_FILENAME,
                "genai_config": "genai_config.json",
            },
            "inputs": {
                "inputs_embeds": "inputs_embeds",
                "attention_mask": "attention_mask" if "attention_mask" in described["inputs"] else None,
                # None: GroupQueryAttention derives positions from the attention_mask lengths
                "position_ids": "position_ids" if "position_ids" in described["inputs"] else None,
                "past_key": decoder["inputs"].get("past_key_names"),
                "past_value": decoder["inputs"].get("past_value_names"),
            },
            "outputs": {
                "logits": decoder["outputs"].get("logits", "logits"),
                "present_key": decoder["outputs"].get("present_key_names"),
                "present_value": decoder["outputs"].get("present_value_names"),
            },
            "logits_last_position_only": bool(prune_lm_head),
            "logits_to_keep_input": "logits_to_keep" if logits_to_keep else None,
            "past_present_share_buffer": bool(genai["search"].get("past_present_share_buffer", False)),
            "context_length": int(genai["model"]["context_length"]),
            "num_layers": int(decoder["num_hidden_layers"]),
            "num_heads": int(decoder["num_attention_heads"]),
            "num_kv_heads": int(decoder["num_key_value_heads"]),
            "head_dim": int(decoder["head_size"]),
            "hidden": int(decoder["hidden_size"]),
            "vocab_size": int(genai["model"]["vocab_size"]),
            "embed_dtype": embed_dtype,
            "io_dtype": described["io_dtype"],
            "kv_dtype": described["kv_dtype"],
            "attention": described["attention"],
            "threads": int(threads),
            "accuracy_level": accuracy_level,
            "matmulnbits": described["matmulnbits"],
            "eos_token_id": genai["model"].get("eos_token_id"),
            "bos_token_id": genai["model"].get("bos_token_id"),
            "awq": None if awq_stats is None else {k: v for k, v in awq_stats.items() if k != "layers"},
        })
        if precision in ("int4", "int8") and described["matmulnbits"]["count"] == 0:
            raise LLMBuildError(f"{out_dir / DECODER_FILENAME}: no MatMulNBits nodes in a {precision} build")
        (out_dir / "decoder_info.json").write_text(json.dumps(info, indent=2) + "\n")
        return info
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _build_streamed(llm_dir: Path, out_dir: Path, info: dict, *, settings, awq_dir, **options) -> tuple[str, dict | None]:
    """int4 decoder written layer by layer (``llm_stream``); fills ``info``; returns (embed dtype, AWQ stats)."""
    from vila_edge.builder.awq_formats import find_tinychat_v2_file, is_awq_checkpoint
    from vila_edge.builder.llm_stream import build_int4_decoder

    pt_file = None
    if is_awq_checkpoint(llm_dir):
        source = "autoawq"
        info["awq_dir"] = str(llm_dir)
    elif find_tinychat_v2_file(llm_dir) is not None:
        source, pt_file = "tinychat-v2", find_tinychat_v2_file(llm_dir)
    else:
        source = "float"
    facts = build_int4_decoder(llm_dir, out_dir, source=source, awq_dir=awq_dir, settings=settings, pt_file=pt_file,
                               filename=DECODER_FILENAME, embed_filename=EMBED_FILENAME, **options)
    info.update({k: facts[k] for k in ("quant", "group_size", "lm_head")})
    if "awq_dir" in facts:
        info["awq_dir"] = facts["awq_dir"]
    return str(np.load(out_dir / EMBED_FILENAME, mmap_mode="r").dtype), facts.get("awq_stats")


def _build_fp8(llm_dir: Path, out_dir: Path, info: dict, **options) -> tuple[str, None]:
    """FP8 QDQ decoder written layer by layer (``llm_stream.build_fp8_decoder``); fills ``info``."""
    from vila_edge.builder.llm_stream import build_fp8_decoder

    facts = build_fp8_decoder(llm_dir, out_dir, filename=DECODER_FILENAME, embed_filename=EMBED_FILENAME, **options)
    info.update(facts)
    return str(np.load(out_dir / EMBED_FILENAME, mmap_mode="r").dtype), None


def _build_with_genai(llm_dir: Path, out_dir: Path, staging: Path, info: dict, *, precision: str, quant: str,
                      group_size: int, lm_head: str, accuracy_level: int, prune_lm_head: bool, awq_dir, calib_path,
                      calib_samples: int, calib_seqlen: int, progress: bool, quantize_threads, prequantized: bool
                      ) -> tuple[str, dict | None]:
    """The whole model through onnxruntime-genai's builder; fills ``info``; returns (embed dtype, AWQ stats)."""
    from vila_edge.builder.awq import quantize_checkpoint
    from vila_edge.builder.awq_formats import find_tinychat_v2_file, is_awq_checkpoint, tinychat_v2_to_awq_checkpoint

    builder_input = llm_dir
    source_for_embed = llm_dir
    awq_stats = None
    if precision == "int4" and (prequantized or quant in ("awq", "rtn")):
        if is_awq_checkpoint(llm_dir):
            awq_source = llm_dir
            info["quant"] = "prequantized-autoawq"
        elif prequantized:
            awq_source = Path(awq_dir) if awq_dir else staging / "awq"
            tinychat_v2_to_awq_checkpoint(find_tinychat_v2_file(llm_dir), llm_dir, awq_source)
            info["quant"] = "prequantized-tinychat-v2"
        else:
            awq_source = Path(awq_dir) if awq_dir else staging / "awq"
            awq_stats = quantize_checkpoint(
                llm_dir, awq_source, w_bit=4, group_size=group_size, method=quant, calib_path=calib_path,
                calib_samples=calib_samples, calib_seqlen=calib_seqlen, progress=progress,
                threads=quantize_threads,
            )
            info["quant"] = quant
        awq_config = _read_config(awq_source)
        ckpt_group = int(awq_config["quantization_config"].get("group_size", group_size))
        info["group_size"] = ckpt_group
        source_for_embed = awq_source
        if awq_dir or awq_source == llm_dir:
            info["awq_dir"] = str(awq_source)
        vocab = int(awq_config["vocab_size"])
        hidden = int(awq_config["hidden_size"])
        builder_input = awq_source
        if lm_head == "int4" and vocab % 8 == 0 and hidden % ckpt_group == 0:
            builder_input = staging / "builder_input"
            info["lm_head"] = _stage_with_int4_head(awq_source, builder_input, ckpt_group, awq_config)
        elif lm_head == "int4":
            # AWQ packing needs vocab % 8 == 0: let the builder quantize the head (symmetric RTN)
            info["lm_head"] = {"quant": "builder-rtn-int4-symmetric", "group_size": ckpt_group,
                               "reason": f"vocab {vocab} / hidden {hidden} do not fit AWQ int4 packing"}
    elif precision == "int4":
        info["quant"] = "builder-rtn-int4-symmetric"
    else:
        info["quant"] = "none" if precision in ("fp16", "fp32") else "builder-rtn-int8-symmetric"
    if "lm_head" not in info:
        if precision in ("fp16", "fp32") or lm_head == "float":
            info["lm_head"] = {"quant": "float"}
        else:
            bits = 8 if lm_head == "int8" or precision == "int8" else 4
            info["lm_head"] = {"quant": f"builder-rtn-int{bits}-symmetric", "group_size": info["group_size"]}

    extra = {
        "exclude_embeds": "true",
        # the table lives outside the graph (embed_tokens.npy); sharing it with the head would add
        # Gather to the quantized op types, which int8 cannot quantize
        "shared_embeddings": "false",
        "prune_lm_head": "true" if prune_lm_head else "false",
        "filename": DECODER_FILENAME,
        "hf_token": "false",
        # current names and the deprecated int4_* aliases (older builders read only those)
        "accuracy_level": str(accuracy_level),
        "int4_accuracy_level": str(accuracy_level),
        "block_size": str(info["group_size"] or 32),
        "int4_block_size": str(info["group_size"] or 32),
    }
    if precision in ("int4", "int8") and info["lm_head"]["quant"] == "float":
        extra["nodes_to_exclude"] = "/lm_head/MatMul"
    elif precision == "int4" and info["lm_head"]["quant"] == "builder-rtn-int8-symmetric":
        extra["matmul_mixed_precision"] = "last_matmul:int8"
    _run_builder(builder_input, out_dir, precision, extra, staging / "cache", staging / "builder.log")

    # text embedding table for the runtime, from the same weights the decoder was built from
    embed, _ = _embedding_and_head(source_for_embed, _read_config(source_for_embed))
    embed_np = _embedding_array(embed)
    np.save(out_dir / EMBED_FILENAME, embed_np)
    return str(embed_np.dtype), awq_stats


def _embedding_array(embed) -> np.ndarray:
    """The table as numpy: float32 stays float32; fp16 and bf16 become float16 (2 bytes a value)."""
    import torch

    if embed.dtype == torch.float32:
        return embed.numpy()
    return embed.to(torch.float16).numpy()
