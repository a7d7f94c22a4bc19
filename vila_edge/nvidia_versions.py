"""Which TensorRT / TensorRT-LLM this machine has, and whether vila-edge can use them.

Shared by the builders (builder/tensorrt.py, builder/trtllm.py) and the runtime backends, so the runtime never
imports the builder. The version table in README ("TensorRT / TensorRT-LLM versions") follows these switches.
"""

from __future__ import annotations

import re

MIN_TRTLLM = (0, 12, 0)  # the oldest release checked against upstream (v0.12.0 / v0.12.0-jetson)
MIN_TRT_FOR_TRTLLM = 10  # TensorRT-LLM 0.12+ is built on TensorRT 10 (JetPack 6.1 per README4Jetson.md)
# UNVERIFIED: the first release without the TensorRT engine backend. The migration guide
# (docs/source/legacy/tensorrt-backend-removal.md) names no version; third-party notes say 1.3.0rc23.
# `trtllm_capability_error` also checks for the APIs themselves, whatever the number says.
ENGINE_BACKEND_REMOVED = (1, 3, 0)


def parse_version(text: str | None) -> tuple[int, int, int]:
    """(major, minor, patch) of "0.12.0", "0.12.0-jetson", "1.0.0rc4", "10.3.0.30"; (0, 0, 0) if unknown."""
    parts = [int(p) for p in re.findall(r"\d+", str(text or "").split("-")[0].split("rc")[0])[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def trt_major(version: str | None) -> int | None:
    """Major version of a TensorRT version string ("10.3.0.30" -> 10), None when unknown."""
    head = str(version or "").split(".")[0]
    return int(head) if head.isdigit() else None


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def installed_versions() -> tuple[str | None, str | None]:
    """(tensorrt_llm.__version__, tensorrt.__version__) of this machine, None where absent."""
    try:
        import tensorrt_llm
    except Exception:  # noqa: BLE001 - absent, or a broken CUDA install raising at import
        return None, tensorrt_version()
    return str(getattr(tensorrt_llm, "__version__", "")) or None, tensorrt_version()


def trtllm_version_error(trtllm: str | None, trt: str | None) -> str | None:
    """Why this TensorRT-LLM / TensorRT pair cannot build or run vila-edge's LLM engine, else None."""
    major = trt_major(trt)
    if major is not None and major < MIN_TRT_FOR_TRTLLM:
        return (f"TensorRT-LLM needs TensorRT {MIN_TRT_FOR_TRTLLM}+, this machine has TensorRT {trt} (JetPack 6.0); "
                "upgrade to JetPack 6.1 / 6.2 or use the ONNX Runtime int4 decoder (llm_backend='onnxruntime')")
    version = parse_version(trtllm)
    if version < MIN_TRTLLM:
        return (f"TensorRT-LLM {trtllm} is older than {'.'.join(map(str, MIN_TRTLLM))}, the oldest release vila-edge "
                "is checked against; install 0.12 (Jetson: v0.12.0-jetson) or newer")
    if version >= ENGINE_BACKEND_REMOVED:
        return (f"TensorRT-LLM {trtllm} has no TensorRT engine backend (removed upstream: "
                "docs/source/legacy/tensorrt-backend-removal.md); install tensorrt-llm < 1.3, "
                "or use the ONNX Runtime int4 decoder (llm_backend='onnxruntime')")
    return None
