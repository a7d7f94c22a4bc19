"""TensorRT-LLM engine for the VILA language model: W4A16 AWQ (group 128) + a prompt table for
visual features.

The flow is TensorRT-LLM's documented one for VILA (examples/multimodal, reference doc §8.1):
``tensorrt_llm.quantization.quantize_and_export(qformat="int4_awq")`` on the ``llm/`` folder,
then ``tensorrt_llm.build`` with ``max_prompt_embedding_table_size`` = the most visual rows one
engine call may carry (``trtllm-build --max_multimodal_len``). Visual features are passed at run
time as the prompt-tuning table; the prompt holds fake ids ``vocab_size + k`` where they go.

``tensorrt_llm`` only exists on NVIDIA targets, so it is imported lazily; everything up to the
import (lengths, build arguments, the offline calibration set) is plain Python, tested anywhere.
"""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
MIN_TEXT_TOKENS = 64  # room for the conversation template and a question next to the images


class TrtLlmUnavailable(RuntimeError):
    """tensorrt_llm cannot be imported here; the message says why."""


def trtllm_import_error() -> str | None:
    """None when ``tensorrt_llm`` imports, else the reason (for skips and clear errors)."""
    try:
        import tensorrt_llm  # noqa: F401
    except Exception as error:  # ImportError, or CUDA/driver errors raised at import
        return f"tensorrt_llm is not importable: {type(error).__name__}: {error}"
    return None


@dataclass
class TrtLlmPlan:
    """Everything the TensorRT-LLM build needs, decided before importing tensorrt_llm."""

    llm_dir: str
    architecture: str
    vocab_size: int
    hidden_size: int
    dtype: str
    quant_algo: str
    qformat: str
    group_size: int
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    max_multimodal_len: int  # == max_prompt_embedding_table_size
    tokens_per_image: int
    max_images: int
    calib_size: int
    calib_max_seq_length: int
    notes: list[str] = field(default_factory=list)

    def quantize_kwargs(self, output_dir: Path, calib_dir: Path) -> dict:
        """Arguments of ``tensorrt_llm.quantization.quantize_and_export`` (examples/quantization/quantize.py)."""
        return {
            "model_dir": self.llm_dir,
            "device": "cuda",
            "calib_dataset": str(calib_dir),
            "dtype": self.dtype,
            "qformat": self.qformat,
            "kv_cache_dtype": None,
            "calib_size": self.calib_size,
            "batch_size": 1,
            "calib_max_seq_length": self.calib_max_seq_length,
            "awq_block_size": self.group_size,
            "output_dir": str(output_dir),
            "tp_size": 1,
            "pp_size": 1,
            "cp_size": 1,
            "seed": 1234,
            "tokenizer_max_seq_length": self.max_seq_len,
        }

    def build_config(self) -> dict:
        """``BuildConfig.from_dict`` input (the ``trtllm-build`` flags of examples/multimodal)."""
        return {
            "max_input_len": self.max_input_len,
            "max_seq_len": self.max_seq_len,
            "max_batch_size": self.max_batch_size,
            "max_beam_width": 1,
            "max_num_tokens": self.max_num_tokens,
            "max_prompt_embedding_table_size": self.max_multimodal_len,
            "strongly_typed": True,
            # the runtime samples itself (masking, stop strings, repetition penalty like every backend), so
            # the engine must return the logits of each generated position (backends/trtllm_llm.py)
            "gather_generation_logits": True,
        }

    def trtllm_build_command(self, checkpoint_dir: str, output_dir: str) -> list[str]:
        """The equivalent ``trtllm-build`` command line (for logs and manual reproduction)."""
        return [
            "trtllm-build", "--checkpoint_dir", checkpoint_dir, "--output_dir", output_dir,
            "--gemm_plugin", "auto", "--max_batch_size", str(self.max_batch_size),
            "--max_input_len", str(self.max_input_len), "--max_seq_len", str(self.max_seq_len),
            "--max_num_tokens", str(self.max_num_tokens), "--max_multimodal_len", str(self.max_multimodal_len),
            "--gather_generation_logits",
        ]

    def to_json(self) -> dict:
        return asdict(self)


def context_length_of(llm_config: dict) -> int:
    """The usable context of a VILA ``llm/config.json`` (doc §5.6: model_max_length, else positions)."""
    for key in ("model_max_length", "tokenizer_model_max_length", "max_sequence_length", "max_position_embeddings"):
        value = llm_config.get(key)
        if isinstance(value, int) and 0 < value < 10**7:
            return value
    raise ValueError("llm/config.json has none of model_max_length / max_position_embeddings")


def plan_trtllm_build(
    llm_dir: Path | str,
    *,
    tokens_per_image: int,
    max_images: int = 1,
    context_length: int | None = None,
    max_output_len: int = 512,
    max_batch_size: int = 1,
    group_size: int = 128,
    dtype: str = "float16",
    calib_size: int = 32,
    calib_max_seq_length: int = 512,
) -> TrtLlmPlan:
    """Decide the engine's lengths from the family's visual token counts.

    ``tokens_per_image``: visual rows one image (or tile / video frame) puts into the prompt,
    e.g. 196 for VILA1.5-3b; ``max_images``: images/tiles/frames one request may hold.
    ``max_multimodal_len = max_batch_size * tokens_per_image * max_images`` (examples/multimodal);
    the prompt must still fit ``MIN_TEXT_TOKENS`` of text next to them.
    """
    llm_dir = Path(llm_dir)
    config_path = llm_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{llm_dir}: no config.json; pass the checkpoint's llm/ folder")
    config = json.loads(config_path.read_text())
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{config_path}: architecture {architecture} is not one of {SUPPORTED_ARCHITECTURES}")
    if tokens_per_image <= 0 or max_images <= 0 or max_batch_size <= 0:
        raise ValueError("tokens_per_image, max_images and max_batch_size must be positive")
    if group_size not in (64, 128):
        raise ValueError(f"TensorRT-LLM int4_awq supports group sizes 64 and 128, got {group_size}")
    hidden = int(config["hidden_size"])
    intermediate = int(config.get("intermediate_size", hidden))
    if hidden % group_size or intermediate % group_size:
        raise ValueError(
            f"{config_path}: hidden {hidden} / intermediate {intermediate} not divisible by AWQ group size {group_size}"
        )
    notes = []
    model_context = context_length_of(config)
    if context_length is None:
        context_length = model_context
    elif context_length > model_context:
        notes.append(f"context_length {context_length} exceeds the model's {model_context}; RoPE may degrade")
    visual_per_request = tokens_per_image * max_images
    if max_output_len >= context_length:
        raise ValueError(f"max_output_len {max_output_len} leaves no room for input in a {context_length}-token context")
    max_input_len = context_length - max_output_len
    if visual_per_request + MIN_TEXT_TOKENS > max_input_len:
        raise ValueError(
            f"{max_images} x {tokens_per_image} visual tokens + {MIN_TEXT_TOKENS} text tokens do not fit "
            f"max_input_len {max_input_len} (context {context_length} - output {max_output_len}); "
            "lower max_images / tiles or max_output_len"
        )
    return TrtLlmPlan(
        llm_dir=str(llm_dir),
        architecture=architecture,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        dtype=dtype,
        quant_algo="W4A16_AWQ",
        qformat="int4_awq",
        group_size=group_size,
        max_batch_size=max_batch_size,
        max_input_len=max_input_len,
        max_seq_len=context_length,
        # one pass over every prompt of a full batch, so prefill never needs chunking
        max_num_tokens=max_batch_size * max_input_len,
        max_multimodal_len=max_batch_size * visual_per_request,
        tokens_per_image=tokens_per_image,
        max_images=max_images,
        calib_size=calib_size,
        calib_max_seq_length=calib_max_seq_length,
        notes=notes,
    )


def write_calibration_dataset(folder: Path, n_samples: int, calib_path: Path | None = None) -> Path:
    """Offline calibration set in the layout TensorRT-LLM accepts for a local directory:
    a ``train`` split with a ``text`` column (``train.jsonl``)."""
    from vila_edge.builder.awq import load_calibration_text

    text = load_calibration_text(calib_path)
    paragraphs = [p for p in text.split("\n\n") if len(p) > 200]
    if not paragraphs:
        raise ValueError("calibration text has no paragraph longer than 200 characters")
    # spread the samples over the whole text (deterministic), ~2000 characters each
    samples = []
    step = max(1, len(paragraphs) // n_samples)
    for start in range(0, len(paragraphs), step):
        samples.append("\n\n".join(paragraphs[start:start + 4])[:4000])
        if len(samples) == n_samples:
            break
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps({"text": sample}) + "\n")
    return folder


def _call_with_supported(function, kwargs: dict):
    """Call a TensorRT-LLM function with the subset of kwargs its installed version accepts."""
    parameters = inspect.signature(function).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return function(**kwargs)
    return function(**{k: v for k, v in kwargs.items() if k in parameters})


def build_trtllm_engine(plan: TrtLlmPlan, out_dir: Path | str, *, calib_path: Path | None = None,
                        keep_checkpoint: bool = False) -> dict:
    """Quantize (W4A16 AWQ) and build the LLM engine into ``out_dir`` (needs tensorrt_llm + a GPU)."""
    reason = trtllm_import_error()
    if reason is not None:
        raise TrtLlmUnavailable(
            f"{reason}. TensorRT-LLM engines are built on the NVIDIA target (pip install tensorrt-llm on x86 "
            "from NVIDIA's index; JetPack builds on Jetson); use the ONNX Runtime int4 decoder elsewhere."
        )
    from tensorrt_llm import build as trt_build
    from tensorrt_llm.builder import BuildConfig
    from tensorrt_llm.models import MODEL_MAP, PretrainedConfig
    from tensorrt_llm.quantization import quantize_and_export

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = out_dir / "trtllm_checkpoint"
    calib_dir = write_calibration_dataset(out_dir / "calibration", plan.calib_size, calib_path)
    _call_with_supported(quantize_and_export, plan.quantize_kwargs(checkpoint_dir, calib_dir))

    model_config = PretrainedConfig.from_json_file(str(checkpoint_dir / "config.json"))
    model_cls = MODEL_MAP[model_config.architecture]
    model = model_cls.from_checkpoint(str(checkpoint_dir), config=model_config)
    build_config = BuildConfig.from_dict(plan.build_config())
    engine = trt_build(model, build_config)
    engine_dir = out_dir / "llm"
    engine.save(str(engine_dir))
    if not keep_checkpoint:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    shutil.rmtree(calib_dir, ignore_errors=True)
    info = {"engine_dir": "llm", "plan": plan.to_json(),
            "prompt_table": {"max_rows": plan.max_multimodal_len, "fake_id_base": plan.vocab_size,
                             "hidden": plan.hidden_size}}
    (out_dir / "trtllm_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
