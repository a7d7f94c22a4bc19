"""TensorRT-LLM engine for the VILA language model: W4A16 AWQ (group 128) + a prompt table for
visual features.

The flow is TensorRT-LLM's documented one for VILA (examples/multimodal, reference doc §8.1):
``tensorrt_llm.quantization.quantize_and_export(qformat="int4_awq")`` on the ``llm/`` folder,
then ``tensorrt_llm.build`` with ``max_prompt_embedding_table_size`` = the most visual rows one
engine call may carry (``trtllm-build --max_multimodal_len``). Visual features are passed at run
time as the prompt-tuning table; the prompt holds fake ids ``vocab_size + k`` where they go.

``tensorrt_llm`` only exists on NVIDIA targets, so it is imported lazily; everything up to the
import (lengths, build arguments, the offline calibration set) is plain Python, tested anywhere.

Versions (decided at run time from the installed packages; README "TensorRT / TensorRT-LLM versions"):
- TensorRT-LLM needs TensorRT 10: JetPack 6.0 (TensorRT 8.6) is refused with one line.
- Jetson (v0.12.0-jetson, JetPack 6.1/6.2): that release's own recipe (README4Jetson.md at
  v0.12.0-jetson: `convert_checkpoint.py --use_weight_only --weight_only_precision int4`), i.e.
  W4A16 weight-only int4 through `<Model>.from_hugging_face(quant_config=W4A16)`, no ModelOpt.
- x86 0.12 ... 1.x: ModelOpt AWQ (`quantize_and_export`), keyword names checked against the installed
  signature (`call_with_signature`).
- Releases without the TensorRT engine backend (docs/source/legacy/tensorrt-backend-removal.md) are
  refused: no `tensorrt_llm.builder.BuildConfig` / `tensorrt_llm.runtime.ModelRunnerCpp`.
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vila_edge.nvidia_versions import (  # noqa: F401  (re-exported for the builder's callers)
    ENGINE_BACKEND_REMOVED,
    MIN_TRT_FOR_TRTLLM,
    MIN_TRTLLM,
    installed_versions,
    parse_version,
    trtllm_version_error,
)

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





def trtllm_capability_error() -> str | None:
    """The installed tensorrt_llm lacks the engine APIs vila-edge drives (whatever its version says)."""
    import importlib

    for module, name in (("tensorrt_llm.builder", "BuildConfig"), ("tensorrt_llm.builder", "build"),
                         ("tensorrt_llm.runtime", "ModelRunnerCpp")):
        try:
            getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return (f"this tensorrt_llm has no {module}.{name} (the TensorRT engine backend was removed upstream); "
                    "install tensorrt-llm < 1.3 or use the ONNX Runtime int4 decoder")
    return None


def call_with_signature(function, kwargs: dict, *, aliases: dict[str, str] | None = None, what: str = ""):
    """Call a TensorRT-LLM function with the keywords its installed version takes: names it lacks are
    dropped, renamed ones mapped (`aliases`: ours -> theirs), and a required one we cannot fill is one
    clear error instead of a TypeError deep inside."""
    chosen, missing = signature_arguments(inspect.signature(function), kwargs, aliases=aliases)
    if missing:
        name = what or getattr(function, "__qualname__", str(function))
        raise TrtLlmUnavailable(f"{name} of this TensorRT-LLM needs {', '.join(missing)}, which vila-edge does not "
                                "fill; see README 'TensorRT / TensorRT-LLM versions' for the supported releases")
    return function(**chosen)


def signature_arguments(signature: inspect.Signature, kwargs: dict, *,
                        aliases: dict[str, str] | None = None) -> tuple[dict, list[str]]:
    """(the keywords to pass, required parameters left unfilled) for one upstream signature."""
    parameters = signature.parameters
    renamed = dict(kwargs)
    for ours, theirs in (aliases or {}).items():
        if ours in renamed and ours not in parameters and theirs in parameters:
            renamed[theirs] = renamed.pop(ours)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return renamed, []
    chosen = {k: v for k, v in renamed.items() if k in parameters}
    missing = [name for name, p in parameters.items()
               if p.default is inspect.Parameter.empty and name not in chosen
               and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return chosen, missing


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
    quant_route: str = "modelopt_awq"  # | "weight_only_int4" (the v0.12.0-jetson recipe)
    notes: list[str] = field(default_factory=list)

    def quantize_kwargs(self, output_dir: Path, calib_dir: Path, model_dir: Path | str | None = None) -> dict:
        """Arguments of ``quantize_and_export`` (tensorrt_llm/quantization/quantize_by_modelopt.py), our
        names; `call_with_signature` maps them onto the installed signature (`model_dir` is `model_name`
        in some releases, `tp_size`/`pp_size`/`cp_size` come and go)."""
        return {
            "model_dir": str(model_dir or self.llm_dir),
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
        """``BuildConfig.from_dict`` input. tensorrt_llm/builder.py (0.11/0.12 era) pops the first six
        keys without defaults (a missing ``opt_num_tokens`` is a KeyError); later releases default
        them. ``opt_num_tokens`` None is trtllm-build's own default (the builder derives it)."""
        return {
            "max_input_len": self.max_input_len,
            "max_seq_len": self.max_seq_len,
            "max_batch_size": self.max_batch_size,
            "max_beam_width": 1,
            "max_num_tokens": self.max_num_tokens,
            "opt_num_tokens": None,
            "max_prompt_embedding_table_size": self.max_multimodal_len,
            "strongly_typed": True,
            # the runtime samples itself (masking, stop strings, repetition penalty like every backend), so
            # the engine must return the logits of each generated position (backends/trtllm_llm.py)
            "gather_generation_logits": True,
            # KV-cache block reuse (the backend re-sends the conversation every step) needs paged context
            # FMHA (docs/source/kv_cache_reuse.md, 0.12: `trtllm-build --use_paged_context_fmha enable`);
            # the gemm plugin in the model dtype as README4Jetson.md (`--gemm_plugin float16`).
            # UNVERIFIED: paged context FMHA on Orin (sm_87) has not been run here.
            "plugin_config": {"gemm_plugin": self.dtype, "use_paged_context_fmha": True},
        }

    def trtllm_build_command(self, checkpoint_dir: str, output_dir: str) -> list[str]:
        """The ``trtllm-build`` command line equivalent to `build_config()` (for logs and manual
        reproduction): the same keys, so what is logged is what the API build does."""
        command = ["trtllm-build", "--checkpoint_dir", checkpoint_dir, "--output_dir", output_dir]
        config = self.build_config()
        plugins = config.pop("plugin_config")
        for key, value in config.items():
            if value is True:
                command.append(f"--{key}")
            elif value not in (None, False):
                command += [f"--{key}", str(value)]
        for key, value in plugins.items():
            command += [f"--{key}", "enable" if value is True else str(value)]
        return command

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
    jetson: bool | None = None,
) -> TrtLlmPlan:
    """Decide the engine's lengths from the family's visual token counts.

    ``tokens_per_image``: visual rows one image (or tile / video frame) puts into the prompt,
    e.g. 196 for VILA1.5-3b; ``max_images``: images/tiles/frames one request may hold.
    ``max_multimodal_len = max_batch_size * tokens_per_image * max_images`` (examples/multimodal);
    the prompt must still fit ``MIN_TEXT_TOKENS`` of text and ``max_output_len`` answer tokens.

    The backend sends the whole conversation so far as the input of every step (one new token each),
    so the engine's ``max_input_len`` is the context minus the one generated position, the same limit
    the runtime enforces (``backends.trtllm_llm.runtime_context_limit``); a build capped at
    context - max_output_len made every long chat fail mid-answer.
    ``jetson``: the quantization route (None: this machine).
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
    max_input_len = context_length - 1
    if visual_per_request + MIN_TEXT_TOKENS + max_output_len > context_length:
        raise ValueError(
            f"{max_images} x {tokens_per_image} visual tokens + {MIN_TEXT_TOKENS} text tokens + {max_output_len} "
            f"output tokens do not fit the {context_length}-token context; lower max_images / tiles or max_output_len"
        )
    if jetson is None:
        from vila_edge.builder.tensorrt import is_jetson

        jetson = is_jetson()
    return TrtLlmPlan(
        llm_dir=str(llm_dir),
        architecture=architecture,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        dtype=dtype,
        # Jetson: v0.12.0-jetson's recipe is weight-only int4 (per channel, no calibration), not ModelOpt AWQ
        quant_algo="W4A16" if jetson else "W4A16_AWQ",
        qformat="int4_wo" if jetson else "int4_awq",
        quant_route="weight_only_int4" if jetson else "modelopt_awq",
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


def neutral_model_dir(llm_dir: Path, staging: Path) -> Path:
    """`llm_dir` under a path without "vila" in it (a symlink in `staging` when needed).

    TensorRT-LLM's ModelOpt loader (tensorrt_llm/quantization/quantize_by_modelopt.py: `get_model`:
    `if "vila" in ckpt_path: model = _get_vila_model(ckpt_path)`, and `get_tokenizer` appends "/llm")
    switches to VILA-repo imports on the path alone; our llm/ folder is a plain HF Llama/Qwen2."""
    llm_dir = Path(llm_dir).resolve()
    if "vila" not in str(llm_dir).lower():
        return llm_dir
    if "vila" in str(staging).lower():
        raise TrtLlmUnavailable(f"{staging}: the TensorRT-LLM staging path contains 'vila', which TensorRT-LLM's "
                                "loader treats as a VILA repo checkout; set TMPDIR to a folder without it")
    link = staging / "llm"
    link.symlink_to(llm_dir, target_is_directory=True)
    return link


def _modelopt_awq_model(plan: TrtLlmPlan, model_dir: Path, out_dir: Path, calib_path: Path | None):
    """x86 route: ModelOpt AWQ into a TensorRT-LLM checkpoint, then the model class loads it."""
    try:  # the defining module; the `tensorrt_llm.quantization` re-export is not in every release
        from tensorrt_llm.quantization.quantize_by_modelopt import quantize_and_export
    except ImportError:
        from tensorrt_llm.quantization import quantize_and_export
    from tensorrt_llm.models import MODEL_MAP, PretrainedConfig

    checkpoint_dir = out_dir / "trtllm_checkpoint"
    calib_dir = write_calibration_dataset(out_dir / "calibration", plan.calib_size, calib_path)
    try:
        call_with_signature(quantize_and_export, plan.quantize_kwargs(checkpoint_dir, calib_dir, model_dir),
                            aliases={"model_dir": "model_name"}, what="quantize_and_export")
    finally:
        shutil.rmtree(calib_dir, ignore_errors=True)
    model_config = PretrainedConfig.from_json_file(str(checkpoint_dir / "config.json"))
    return MODEL_MAP[model_config.architecture].from_checkpoint(str(checkpoint_dir), config=model_config)


def _weight_only_int4_model(plan: TrtLlmPlan, model_dir: Path):
    """Jetson route (README4Jetson.md at v0.12.0-jetson: convert_checkpoint.py --use_weight_only
    --weight_only_precision int4, which calls `<Model>.from_hugging_face(..., quant_config=W4A16)`).
    UNVERIFIED: `from_hugging_face(hf_model_dir, dtype=, quant_config=)` read from the 0.12-era
    examples/llama/convert_checkpoint.py, not run on a Jetson."""
    from tensorrt_llm.models import LLaMAForCausalLM, QWenForCausalLM
    from tensorrt_llm.models.modeling_utils import QuantConfig
    from tensorrt_llm.quantization import QuantAlgo

    model_cls = {"LlamaForCausalLM": LLaMAForCausalLM, "Qwen2ForCausalLM": QWenForCausalLM}[plan.architecture]
    return model_cls.from_hugging_face(str(model_dir), dtype=plan.dtype, quant_config=QuantConfig(quant_algo=QuantAlgo.W4A16))


def build_trtllm_engine(plan: TrtLlmPlan, out_dir: Path | str, *, calib_path: Path | None = None,
                        keep_checkpoint: bool = False, log=print) -> dict:
    """Quantize (W4A16) and build the LLM engine into ``out_dir`` (needs tensorrt_llm + a GPU)."""
    reason = trtllm_import_error()
    if reason is not None:
        raise TrtLlmUnavailable(
            f"{reason}. TensorRT-LLM engines are built on the NVIDIA target (pip install tensorrt-llm on x86 "
            "from NVIDIA's index; JetPack builds on Jetson); use the ONNX Runtime int4 decoder elsewhere."
        )
    trtllm, trt = installed_versions()
    reason = trtllm_version_error(trtllm, trt) or trtllm_capability_error()
    if reason is not None:
        raise TrtLlmUnavailable(reason)
    from tensorrt_llm.builder import BuildConfig, build  # `from tensorrt_llm import build` is not in every release

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log("TensorRT-LLM build (equivalent command): " + " ".join(plan.trtllm_build_command("<checkpoint>", str(out_dir / "llm"))))
    staging = Path(tempfile.mkdtemp(prefix="ve-trtllm-"))
    try:
        model_dir = neutral_model_dir(Path(plan.llm_dir), staging)
        if plan.quant_route == "weight_only_int4":
            model = _weight_only_int4_model(plan, model_dir)
        else:
            model = _modelopt_awq_model(plan, model_dir, out_dir, calib_path)
        engine = build(model, BuildConfig.from_dict(plan.build_config()))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    engine_dir = out_dir / "llm"
    engine.save(str(engine_dir))
    if not keep_checkpoint:
        shutil.rmtree(out_dir / "trtllm_checkpoint", ignore_errors=True)
    info = {"engine_dir": "llm", "plan": plan.to_json(), "versions": {"tensorrt_llm": trtllm, "tensorrt": trt},
            "prompt_table": {"max_rows": plan.max_multimodal_len, "fake_id_base": plan.vocab_size,
                             "hidden": plan.hidden_size}}
    (out_dir / "trtllm_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
