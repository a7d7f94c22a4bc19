"""Engine backends behind two small interfaces (`base.VisionEngine`, `base.LLMEngine`).

| backend        | vision                         | LLM                                   | needs                         |
|----------------|--------------------------------|---------------------------------------|-------------------------------|
| onnxruntime    | `ort_vision.OrtVisionEngine`   | `ort_llm.OrtLLMEngine`                | onnxruntime(-gpu)             |
| tensorrt       | `tensorrt_vision.TensorRTVisionEngine` | -                             | tensorrt, cuda-python         |
| tensorrt-llm   | -                              | `trtllm_llm.TensorRTLLMEngine`        | tensorrt_llm                  |
| torch          | `torch_vision.TorchVisionEngine` | `torch_llm.TorchLLMEngine`          | torch (+ `--torch-weights` build) |

"auto" picks the native NVIDIA engine when the engine directory holds one (vision/*.plan|*.engine,
trtllm/trtllm_info.json) and its package imports, else the torch backend on a CUDA machine whose directory has
the torch weights (vision/torch.fp16.safetensors, llm/torch.int4.safetensors), else ONNX Runtime (with the CUDA / TensorRT execution providers
when onnxruntime-gpu is installed and `device` allows). The NVIDIA backends are imported lazily.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vila_edge.backends import torch_llm, torch_vision  # weight file names only (torch is imported lazily)
from vila_edge.backends.base import ContextOverflow, LLMEngine, VisionEngine
from vila_edge.engine_dir import Manifest
from vila_edge.errors import EngineError

__all__ = ["ContextOverflow", "LLMEngine", "VisionEngine", "make_llm_engine", "make_vision_engine"]


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _trt_vision_files(engine_dir: Path) -> bool:
    v = engine_dir / "vision"
    return any(v.glob("tower*.plan")) or any(v.glob("tower*.engine"))


def _trtllm_dir(engine_dir: Path):
    from vila_edge.backends.trtllm_llm import find_trtllm_engine

    return find_trtllm_engine(engine_dir)


def _torch_cuda(path: Path, device: str) -> bool:
    """The torch backend applies: its weights file is there and PyTorch sees a CUDA GPU."""
    if device == "cpu" or not path.is_file() or not _have("torch"):
        return False
    import torch

    return torch.cuda.is_available()


def make_vision_engine(kind: str, engine_dir, manifest: Manifest, *, device: str = "auto",
                       threads: int | None = None, precision: str | None = None) -> VisionEngine:
    """`precision`: the ONNX Runtime tower's (None: int8 on CPUs when its recorded cosine allows, see
    backends.ort_vision.tower_precision)."""
    engine_dir = Path(engine_dir)
    info = manifest.vision
    if info.get("tower") == "ps3":  # VILA-HD: three ONNX graphs and the numpy patch selection
        if kind not in ("auto", "onnxruntime"):
            raise EngineError(f"PS3 (VILA-HD) vision runs on onnxruntime only, not {kind!r}")
        from vila_edge.backends.ps3_vision import Ps3VisionEngine

        return Ps3VisionEngine(engine_dir / "vision", info, manifest.config, device=device, threads=threads)
    if kind == "auto":
        kind = "tensorrt" if (device != "cpu" and _trt_vision_files(engine_dir) and _have("tensorrt")) else "onnxruntime"
        if kind == "onnxruntime" and _torch_cuda(engine_dir / "vision" / torch_vision.VISION_FILE, device):
            kind = "torch"
    if kind == "onnxruntime":
        from vila_edge.backends.ort_vision import OrtVisionEngine

        return OrtVisionEngine(engine_dir / "vision", info, device=device if device != "auto" else "auto",
                               threads=threads, precision=precision)
    if kind == "tensorrt":
        from vila_edge.backends.tensorrt_vision import TensorRTVisionEngine

        return TensorRTVisionEngine(engine_dir / "vision", info)
    if kind == "torch":
        from vila_edge.backends.torch_vision import TorchVisionEngine

        return TorchVisionEngine(engine_dir / "vision", info, device=device, threads=threads)
    raise EngineError(f"vision backend {kind!r} is not one of: auto, onnxruntime, tensorrt, torch")


def make_llm_engine(kind: str, engine_dir, manifest: Manifest, *, device: str = "auto", threads: int | None = None,
                    max_context: int | None = None) -> LLMEngine:
    engine_dir = Path(engine_dir)
    info = manifest.llm
    trt = _trtllm_dir(engine_dir)
    if kind == "auto":
        kind = "tensorrt-llm" if (device != "cpu" and trt is not None and _have("tensorrt_llm")) else "onnxruntime"
        if kind == "onnxruntime" and _torch_cuda(engine_dir / "llm" / torch_llm.LLM_FILE, device):
            kind = "torch"
    if kind == "onnxruntime":
        from vila_edge.backends.ort_llm import OrtLLMEngine

        return OrtLLMEngine(engine_dir / "llm", info, device=device, threads=threads, max_context=max_context)
    if kind == "tensorrt-llm":
        from vila_edge.backends.trtllm_llm import TensorRTLLMEngine

        if trt is None:
            raise EngineError(f"{engine_dir}: no TensorRT-LLM engine (trtllm/trtllm_info.json); build it on the "
                              f"NVIDIA target with the builder's TensorRT-LLM stage")
        eng, trt_info = trt
        embed = engine_dir / "llm" / "embed_tokens.npy"
        if not embed.is_file():
            raise EngineError(f"{embed}: missing (the runtime splices text embeddings from it); rebuild the LLM stage")
        return TensorRTLLMEngine(eng, embed, trt_info, max_context=max_context)
    if kind == "torch":
        from vila_edge.backends.torch_llm import TorchLLMEngine

        return TorchLLMEngine(engine_dir / "llm", info, device=device, threads=threads, max_context=max_context)
    raise EngineError(f"LLM backend {kind!r} is not one of: auto, onnxruntime, tensorrt-llm, torch")
