"""Vision tower + projector in plain PyTorch: SigLIP (fused q/k/v, scaled_dot_product_attention) and the
checkpoint's projector, fp16 on CUDA (fp32 on the CPU by default, fp16 when asked), all tiles in one batch.

Weights: `vision/torch.fp16.safetensors` (`vila_edge.builder.torch_weights`): the SigLIP layers the selected
feature uses and the projector, with their geometry in the file's metadata. A `--projector-precision fp8` build
stores the projector's linears as FP8 codes + block scales; they run as `backends.torch_fp8.Fp8Linear` (W8A8
through `torch._scaled_mm`, weight-only where it is refused). On CUDA the S2 / dynamic-S2 merge runs
between tower and projector through `vila_edge.kernels.s2_merge` on the GPU (`merge_on_device`, called by the
pipeline); elsewhere the pipeline merges with its numpy reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vila_edge.backends.base import VisionEngine
from vila_edge.backends.torch_llm import read_safetensors, torch_device, torch_dtype
from vila_edge.errors import EngineError

VISION_FILE = "torch.fp16.safetensors"
_ACTS = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


class SigLIPTower:
    """pixels [B, 3, S, S] -> hidden states after the used layers [B, T, C] (token 0 dropped for "patch")."""

    def __init__(self, tensors: dict, config: dict, dtype, device: str):
        import torch

        def get(name):
            return tensors[f"tower.{name}"].to(device=device, dtype=dtype)

        self.patch = int(config["patch_size"])
        self.heads = int(config["num_heads"])
        self.eps = float(config["layer_norm_eps"])
        self.drop_first = bool(config["drop_first"])
        act = config.get("hidden_act", "gelu_pytorch_tanh")
        if act not in _ACTS:
            raise EngineError(f"SigLIP hidden_act {act!r} is not one of: {', '.join(_ACTS)}")
        self.approximate = _ACTS[act]
        self.conv_w, self.conv_b = get("embeddings.patch_embedding.weight"), get("embeddings.patch_embedding.bias")
        self.pos = get("embeddings.position_embedding.weight")
        self.layers = []
        for i in range(int(config["layers"])):
            p = f"layers.{i}."
            qkv_w = torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            qkv_b = torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            self.layers.append({
                "ln1": (get(p + "layer_norm1.weight"), get(p + "layer_norm1.bias")),
                "qkv": (qkv_w, qkv_b),
                "out": (get(p + "self_attn.out_proj.weight"), get(p + "self_attn.out_proj.bias")),
                "ln2": (get(p + "layer_norm2.weight"), get(p + "layer_norm2.bias")),
                "fc1": (get(p + "mlp.fc1.weight"), get(p + "mlp.fc1.bias")),
                "fc2": (get(p + "mlp.fc2.weight"), get(p + "mlp.fc2.bias")),
            })

    def __call__(self, pixels):
        import torch.nn.functional as F

        x = F.conv2d(pixels, self.conv_w, self.conv_b, stride=self.patch)  # [B, C, g, g]
        x = x.flatten(2).transpose(1, 2) + self.pos[None]
        b, t, c = x.shape
        hd = c // self.heads
        for layer in self.layers:
            h = F.layer_norm(x, (c,), *layer["ln1"], eps=self.eps)
            q, k, v = F.linear(h, *layer["qkv"]).view(b, t, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)
            x = x + F.linear(a, *layer["out"])
            h = F.layer_norm(x, (c,), *layer["ln2"], eps=self.eps)
            x = x + F.linear(F.gelu(F.linear(h, *layer["fc1"]), approximate=self.approximate), *layer["fc2"])
        return x[:, 1:] if self.drop_first else x


def load_projector_module(tensors: dict, config: dict, dtype, device: str, fp8_gemm: str | None = None):
    """The checkpoint's projector (`vila_edge.reference.projector.Projector`: plain torch modules), its linears FP8
    when the file has them (`config["projector_fp8"]`)."""
    from vila_edge.config import ProjectorConfig
    from vila_edge.reference.projector import Projector

    proj = Projector(ProjectorConfig(**config["projector"]))
    state = {k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")}
    fp8 = config.get("projector_fp8")
    if fp8 is None:
        proj.load_state_dict(state, strict=True)
        return proj.to(device=device, dtype=dtype).eval()
    from vila_edge.backends.torch_fp8 import replace_linears

    missing, unexpected = proj.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {f"{name}.weight" for name in fp8["linears"]}:
        raise EngineError(f"FP8 projector tensors do not match its modules (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}); rebuild the engine directory")
    proj = proj.to(device=device, dtype=dtype).eval()
    made = replace_linears(proj, tensors, "projector_fp8.", fp8["format"], dtype, device,
                           activations=fp8.get("activations", "dynamic"), gemm=fp8_gemm)
    if len(made) != len(fp8["linears"]):
        raise EngineError(f"FP8 projector: {len(made)} of {len(fp8['linears'])} linears found; rebuild the engine "
                          f"directory")
    proj.fp8_linears = made
    return proj


class TorchVisionEngine(VisionEngine):
    name = "torch"

    def __init__(self, vision_dir, info: dict | None = None, *, device: str = "auto", dtype: str | None = None,
                 max_batch: int | None = None, threads: int | None = None, fp8_gemm: str | None = None):
        """`fp8_gemm`: for an FP8 projector, "scaled-mm" | "weight-only" | None (see `backends.torch_fp8`)."""
        tensors, config = read_safetensors(Path(vision_dir) / VISION_FILE)
        info = dict(info or {})
        self._setup(tensors, config, device=device, dtype=dtype, threads=threads,
                    max_batch=int(max_batch if max_batch is not None else info.get("max_batch", 0) or 0),
                    fp8_gemm=fp8_gemm)

    @classmethod
    def from_tensors(cls, tensors: dict, config: dict, *, device: str = "auto", dtype: str | None = None,
                     max_batch: int = 0) -> TorchVisionEngine:
        """An engine over in-memory weights in the file's layout (benchmarks build random ones at real sizes)."""
        self = cls.__new__(cls)
        self._setup(tensors, config, device=device, dtype=dtype, threads=None, max_batch=max_batch)
        return self

    def _setup(self, tensors, config, *, device, dtype, threads, max_batch: int, fp8_gemm=None) -> None:
        import torch

        self.device = torch_device(device)
        self.dtype = torch_dtype(dtype, self.device)
        self.on_gpu = self.device == "cuda"
        if threads and self.device == "cpu":
            torch.set_num_threads(int(threads))
        self.config = config
        self.tower = SigLIPTower(tensors, config, self.dtype, self.device)
        self.projector = load_projector_module(tensors, config, self.dtype, self.device, fp8_gemm)
        self.max_batch = max_batch  # 0: every tile in one batch

    def _run(self, fn, x: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        step = self.max_batch or x.shape[0] or 1
        outs = []
        with torch.inference_mode():
            for i in range(0, x.shape[0], step):
                outs.append(fn(x[i:i + step].to(device=self.device, dtype=self.dtype)).float().cpu())
        return torch.cat(outs).numpy()

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise EngineError(f"expected pixels [tiles, 3, S, S], got {list(pixels.shape)}")
        return self._run(self.tower, pixels)

    def project(self, features: np.ndarray) -> np.ndarray:
        return self._run(self.projector, features)

    def merge_on_device(self, pixels: np.ndarray, kernels, merge: dict) -> np.ndarray | None:
        """Tower -> `kernels.s2_merge` (fp16, on the GPU) -> projector, features never leaving the device."""
        import torch

        if not self.on_gpu or self.dtype != torch.float16:
            return None
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device, self.dtype)
            feats = self.tower(x).contiguous()
            shape = kernels.s2_output_shape(channels=feats.shape[-1],
                                            **{k: v for k, v in merge.items() if k != "tile_offsets"})
            merged = torch.empty(shape, dtype=torch.float16, device=self.device)
            kernels.s2_merge(feats, merged, stream=torch.cuda.current_stream().cuda_stream, **merge)
            return self.projector(merged).float().cpu().numpy()

    def describe(self) -> dict:
        fp8 = sorted({lin.describe() for lin in getattr(self.projector, "fp8_linears", [])})
        return {"backend": self.name, "device": self.device, "dtype": str(self.dtype).replace("torch.", ""),
                "s2_merge": "vila_edge.kernels (CUDA)" if self.on_gpu else "numpy (pipeline)",
                **({"projector": fp8[0] if len(fp8) == 1 else fp8} if fp8 else {})}
