"""Device planner: will this model fit on that device, and how fast will it be?

`plan(model, device, ...)` returns a `Plan`: the memory budget (LLM weights at the chosen precision,
vision engine, KV cache at the maximum context, activations/workspace, runtime overhead) against the
device's usable memory, and predictions (vision latency per tile and prefill from FLOPs / (TFLOPS x
efficiency), int8 MatMuls on CPUs CPU_INT8_MATMUL_SPEEDUP times faster; decode tokens/s from the bandwidth
roofline x efficiency). `check_plan_fits(...)` is the build-time guard: it raises `VilaEdgeError` with one
line naming the knob to turn.

Device profiles are TOML files in `build/profiles/` (or the folder named by $VILA_EDGE_PROFILES);
their figures come from shared docs/targets.md, and the estimates in them say so.

Arithmetic (all sizes in bytes; L layers, h hidden, q = heads x head_dim, kv = kv_heads x head_dim,
i intermediate, V vocab rows):
- LLM linear params  = L x (h(q + 2kv) + q h + 3 h i), stored at `bits` per weight (int4: 4.25 =
  4-bit codes + fp16 scale and zero per 128-group; int8: 8.25; fp8: 8; fp16: 16).
- Embedding / LM head: fp16 models store V x h once (tied) or twice. Quantized models store the LM head
  at `bits`; a tied table is stored quantized once (the builder's GatherBlockQuantized), an untied
  embedding stays fp16 (one row is read per token).
- Qwen2 q/k/v biases and RMSNorm weights: fp16.
- Decode reads per token: all linear + LM head + norms/biases + one embedding row, plus the KV cache
  of the context: 2 x L x kv x 2 bytes per position (x 4 bytes where the runtime keeps fp32 KV: CPU int4 /
  int8 builds, fp32 models). On CPUs a quantized build's LM head is int8 (the ONNX builder's default).
- Vision engine: fp16 weights of the layers that run (select_layer), patch/position embeddings and
  the projector. FLOPs per tile (N = tokens: patches, + 1 class token for CLIP / InternViT):
  2 patches (3p^2)h + layers x (8Nh^2 + 4Nhi + 4N^2 h) + projector rows. The weight MatMuls (8Nh^2 + 4Nhi)
  run CPU_INT8_MATMUL_SPEEDUP faster in the int8 CPU tower; attention (4N^2 h), patch convolution and
  projector stay fp32.
- Prefill: 2 x linear params x prompt + 2 x L x prompt^2 x q (attention) + one LM head row, at the vision
  rate; on CPUs the int4 / int8 LLM's linear MatMuls (MatMulNBits, int8 compute) CPU_INT8_MATMUL_SPEEDUP faster.
- Activations: vision batch of all tiles, per tile N x (2h + max(3h + S, i)) values (S = heads x N
  attention scores when the backend has no fused attention), plus the LLM prefill of the whole max
  context at once: T x (2h + q + 2kv + 2i) values + heads x T x T fp32 scores (unfused) + V fp32
  logits. Values are 2 bytes on GPUs, 4 on CPUs (fp32 compute). Engines keep both arenas: summed.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from vila_edge.config import VilaConfig
from vila_edge.errors import VilaEdgeError
from vila_edge.media.tiling import tiling_scheme
from vila_edge.ps3_config import expected_ps3_tensors, ps3_activation_values, ps3_flops

GIB = 1 << 30
MIB = 1 << 20
PRECISION_BITS = {"fp32": 32.0, "fp16": 16.0, "bf16": 16.0, "fp8": 8.0, "int8": 8.25, "int4": 4.25}
DEFAULT_CONTEXT_FOR_DECODE = 1024  # context at which decode tok/s is quoted (as targets.md's table)
MIN_TEXT_TOKENS = 64  # prompt text + answer room the context must leave beside one image
# int8 weight MatMuls vs fp32 ones, ONNX Runtime (MLAS) on the CPU. Measured in benchmarks/results/vision_cpu.json
# (SigLIP-so400m tower, 2 threads, fp32 and int8 graphs interleaved on one AMD EPYC with AVX-512 VNNI): per tile
# fp32 / int8 = 8.72 / 5.06 s = 1.73x at 448 px, 8.26 / 4.07 s = 2.03x at 384 px. The int8 graph quantizes only the
# MatMuls with a constant weight (quantize_dynamic, MatMulConstBOnly); attention MatMuls and the patch convolution
# stay fp32 (13.5% of the FLOPs at 448 px, 10.1% at 384), so the weight MatMuls alone ran 1.95x (448) and 2.29x
# (384) faster: 2.1 is their mean (vila_edge.bench.planner_check.int8_speedup_from_vision_cpu recomputes both).
# The int4 / int8 LLM's MatMulNBits (accuracy_level 4: int8 activations, int8 dot products) get the same factor.
# Another CPU (AVX2 without VNNI, ARM) will differ: measure before trusting int8 predictions there.
CPU_INT8_MATMUL_SPEEDUP = 2.1


# ---------------------------------------------------------------------------------------------
# Device profiles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str  # "jetson" (unified memory) | "gpu" (discrete: VRAM) | "cpu"
    memory_gib: float
    usable_fraction: float
    bandwidth_gbs: float
    sm: str
    fp16_tflops: float
    fp8: bool
    runtime_overhead_mib: float
    decode_efficiency: float
    vision_efficiency: float
    fused_attention: bool
    fp32_tflops: float = 0.0
    torch_decode_efficiency: float = 0.0  # the PyTorch backend (`plan(..., backend="torch")`); 0: not stated
    torch_vision_efficiency: float = 0.0
    source: str = ""

    @property
    def usable_bytes(self) -> int:
        return int(self.memory_gib * self.usable_fraction * GIB)

    @property
    def compute_tflops(self) -> float:
        """Dense throughput the vision engine runs at: FP16 tensor cores on GPUs, FP32 FMA on CPUs."""
        return self.fp32_tflops if self.kind == "cpu" else self.fp16_tflops

    @property
    def activation_bytes(self) -> int:
        return 4 if self.kind == "cpu" else 2


def profiles_dir() -> Path:
    env = os.environ.get("VILA_EDGE_PROFILES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "build" / "profiles"


def list_profiles() -> list[str]:
    d = profiles_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def load_profile(name_or_path) -> DeviceProfile:
    import tomllib

    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    p = Path(str(name_or_path))
    if not (p.suffix == ".toml" and p.is_file()):
        p = profiles_dir() / f"{name_or_path}.toml"
    if not p.is_file():
        known = ", ".join(list_profiles()) or f"none found in {profiles_dir()}"
        raise VilaEdgeError(f"device {name_or_path!r} is not a known profile (known: {known})")
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise VilaEdgeError(f"{p}: cannot read device profile ({exc})") from None
    fields = {f.name for f in dataclasses.fields(DeviceProfile)}
    unknown = set(data) - fields
    if unknown:
        raise VilaEdgeError(f"{p}: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        return DeviceProfile(**data, source=str(p.name))
    except TypeError as exc:
        raise VilaEdgeError(f"{p}: incomplete device profile ({exc})") from None


def host_profile(bandwidth_gbs: float, fp32_tflops: float, *, memory_gib: float | None = None,
                 name: str = "this-machine", decode_efficiency: float = 0.53,
                 vision_efficiency: float = 1.0) -> DeviceProfile:
    """A CPU profile for the machine the bench runs on, from its measured bandwidth and matmul rate.

    The efficiencies are relative to what was *measured* (a probe, not a datasheet peak), one set for every
    model (real-size benches, benchmarks/results/bench_*_20261204-*.json; `python benchmarks/plan_vs_bench.py`):
    - decode: 0.53 of the read-bandwidth roofline of the bytes the planner counts (int8 LM head and fp32 KV
      on CPUs), fitted on nvila-lite-2b (0.53 at both sizes); vila1.5-3b measured 0.43-0.58, the llama.cpp
      comparisons 0.46-0.58.
    - compute (vision tower, projector, prefill): 1.0 of the fp32 MatMul probe (ONNX Runtime, 1024^3), int8
      MatMuls CPU_INT8_MATMUL_SPEEDUP x that. Fitted on nvila-lite-2b's TTFT at 1920x1080 and 448x448 (best
      fit 1.01, rounded to 1.0); checked on vila1.5-3b. The fp32 tower alone measured 0.77-0.86 of a 1-thread
      probe (bench_nvila-lite-2b_20261127-085434.json): fp32-tower predictions run up to ~25% fast."""
    if memory_gib is None:
        import psutil

        memory_gib = psutil.virtual_memory().total / GIB
    return DeviceProfile(name=name, description="this machine (measured bandwidth and matmul throughput)", kind="cpu",
                         memory_gib=memory_gib, usable_fraction=0.9, bandwidth_gbs=bandwidth_gbs, sm="",
                         fp16_tflops=0.0, fp32_tflops=fp32_tflops, fp8=False, runtime_overhead_mib=400,
                         decode_efficiency=decode_efficiency, vision_efficiency=vision_efficiency,
                         fused_attention=False, source="measured")


# ---------------------------------------------------------------------------------------------
# Model arithmetic
# ---------------------------------------------------------------------------------------------


def llm_linear_params(cfg: VilaConfig) -> int:
    m = cfg.llm
    q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    return m.num_layers * (m.hidden_size * (q + 2 * kv) + q * m.hidden_size + 3 * m.hidden_size * m.intermediate_size)


def llm_small_bytes(cfg: VilaConfig) -> int:
    """fp16 RMSNorm weights (+ Qwen2 q/k/v biases)."""
    m = cfg.llm
    q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    n = (2 * m.num_layers + 1) * m.hidden_size
    if m.family == "qwen2":
        n += m.num_layers * (q + 2 * kv)
    return 2 * n


def llm_weight_bytes(cfg: VilaConfig, precision: str, lm_head_bits: float | None = None) -> dict[str, int]:
    """Resident LLM bytes by piece, and what one decode step reads (`decode_read`). `lm_head_bits`: the head's
    bits when they differ from the body's (quantized builds)."""
    bits = _bits(precision)
    m = cfg.llm
    table = m.vocab_size * m.hidden_size
    linear = math.ceil(llm_linear_params(cfg) * bits / 8)
    small = llm_small_bytes(cfg)
    quantized = precision not in ("fp16", "bf16", "fp32")
    dense = 4 if precision == "fp32" else 2
    if not quantized:
        lm_head = table * dense
        embed = 0 if m.tie_word_embeddings else table * dense
    else:
        lm_head = math.ceil(table * (lm_head_bits or bits) / 8)
        embed = 0 if m.tie_word_embeddings else table * 2
    total = linear + small + lm_head + embed
    row = m.hidden_size * 2
    return {"linear": linear, "lm_head": lm_head, "embed": embed, "small": small, "total": total,
            "decode_read": linear + small + lm_head + row}


def vision_params(cfg: VilaConfig) -> dict[str, int]:
    """Parameters of the vision engine: the tower's tensors (`vila_edge.towers`) minus the encoder layers
    past the selected one, SigLIP's pooling head and the post-norm (never run), and the projector."""
    from vila_edge.towers import tower_named

    v = cfg.vision
    if v.ps3 is not None:  # VILA-HD: the whole PS3 tower runs (low-res pass to the last block, selection nets)
        return {"tower": sum(math.prod(t) for t in expected_ps3_tensors(v.ps3).values()),
                "projector": projector_params(cfg)}
    tower = 0
    for name, shape in tower_named(v.tower).expected(v).items():
        layer = name.split("layers.")[1].split(".")[0] if "layers." in name else None
        if "post_layernorm" in name or (layer is not None and int(layer) >= v.layers_used):
            continue
        tower += math.prod(shape)
    return {"tower": tower, "projector": projector_params(cfg)}


def projector_params(cfg: VilaConfig) -> int:
    from vila_edge.checkpoint import expected_projector

    return sum(math.prod(s) for s in expected_projector(cfg).values())


def projector_flops_per_row(cfg: VilaConfig) -> int:
    from vila_edge.checkpoint import expected_projector

    return sum(2 * s[0] * s[1] for s in expected_projector(cfg).values() if len(s) == 2)


def vision_flops_split(cfg: VilaConfig) -> dict[str, int]:
    """FLOPs (multiply-add = 2) of one tile by kind: `weights` (the MatMuls with a constant weight: q/k/v/o and
    the MLP, what the int8 CPU tower quantizes), `attention` (activation x activation MatMuls), `other` (the
    patch convolution; all of PS3, which has no int8 graph) and `projector` (its rows; a graph of its own)."""
    v = cfg.vision
    if v.ps3 is not None:  # one "tile" = one image through PS3's low-res pass and its look-close steps
        total = ps3_flops(v.ps3, v.layers_used, projector_flops_per_row(cfg), cfg.projector.downsample)
        return {"weights": 0, "attention": 0, "other": total, "projector": 0}
    n, h, i = v.sequence_length, v.hidden_size, v.intermediate_size
    proj = cfg.tokens_per_tile * projector_flops_per_row(cfg)
    if v.num_scales > 1:  # multi-scale: the projector sees the concatenated output grid, count it once per tile
        proj = proj // v.num_scales
    return {"weights": v.layers_used * (8 * n * h * h + 4 * n * h * i), "attention": v.layers_used * 4 * n * n * h,
            "other": 2 * v.grid * v.grid * 3 * v.patch_size ** 2 * h, "projector": proj}


def vision_flops_per_tile(cfg: VilaConfig) -> int:
    """FLOPs (multiply-add = 2) of one tile through the tower layers that run, plus its projector rows."""
    return sum(vision_flops_split(cfg).values())


def int8_matmul_speedup(dev: DeviceProfile, int8: bool) -> float:
    """How much faster than the fp32 rate the int8 MatMuls run: CPU_INT8_MATMUL_SPEEDUP on CPUs (ONNX Runtime,
    measured), 1 elsewhere (GPU rates are the profile's fp16 tensor-core figure for every precision)."""
    return CPU_INT8_MATMUL_SPEEDUP if int8 and dev.kind == "cpu" else 1.0


def kv_bytes_per_position(cfg: VilaConfig, dev: DeviceProfile, llm_precision: str, kv_dtype: str | None = None) -> int:
    """KV cache bytes per position. ``kv_dtype`` None: what a default build keeps: fp16, but fp32 for fp32 models
    and for int4 / int8 builds for CPUs (their decoders have fp32 I/O and KV; the committed real-size engines
    record llm.kv_dtype float32); "float16" / "float32": as built (`vila-edge build --kv-dtype`)."""
    if kv_dtype is not None:
        return cfg.llm.kv_bytes_per_token_fp16 * (2 if kv_dtype == "float32" else 1)
    wide = llm_precision == "fp32" or (dev.kind == "cpu" and llm_precision in ("int4", "int8"))
    return cfg.llm.kv_bytes_per_token_fp16 * (2 if wide else 1)


def max_image(cfg: VilaConfig, max_tiles: int, single_scale: bool) -> tuple[int, int]:
    """(tiles encoded, LLM positions) of the largest single image the knobs allow."""
    worst = tiling_scheme(cfg.vision).worst_case(cfg, max_tiles, single_scale)
    return worst.n_tiles, worst.positions


def _bits(precision: str) -> float:
    try:
        return PRECISION_BITS[precision]
    except KeyError:
        raise VilaEdgeError(f"precision {precision!r} is not one of: {', '.join(PRECISION_BITS)}") from None


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    model: str
    device: DeviceProfile
    llm_precision: str
    vision_precision: str
    max_context: int
    max_tiles: int
    single_scale: bool
    tiles: int  # tiles of the largest image the knobs allow
    image_positions: int  # its LLM positions
    memory: dict[str, int]  # llm_weights, vision_engine, kv_cache, activations, runtime_overhead, total, usable
    detail: dict[str, int]  # finer pieces behind the memory lines
    predicted: dict[str, float]
    efficiency: dict[str, float]
    problems: list[str] = field(default_factory=list)  # why it does not fit (empty: fits)
    fixes: list[str] = field(default_factory=list)  # knob settings that would make it fit
    bigger_devices: list[str] = field(default_factory=list)  # profiles it fits on when no knob helps
    kv_dtype: str | None = None  # as asked (None: a default build's cache, see kv_bytes_per_position)

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fits"] = self.fits
        return d

    def refusal(self) -> str:
        """One line: what does not fit and which knob to turn."""
        m = self.memory
        what = "; ".join(self.problems)
        fix = " or ".join(self.fixes) if self.fixes else (
            "no knob setting fits: choose a device with more memory"
            + (f" (with --llm-precision int4 it fits on {', '.join(self.bigger_devices)})"
               if self.bigger_devices else ""))
        return (f"{self.model} does not fit {self.device.name}: {what} "
                f"(LLM {self.llm_precision} {m['llm_weights'] / GIB:.2f} GiB, vision {m['vision_engine'] / GIB:.2f}, "
                f"KV@{self.max_context} {m['kv_cache'] / GIB:.2f}, activations {m['activations'] / GIB:.2f}, "
                f"runtime {m['runtime_overhead'] / GIB:.2f}); fix: {fix}")


def _resolve_model(model) -> tuple[str, VilaConfig]:
    """A VilaConfig, Checkpoint, preset name or checkpoint path -> (label, config)."""
    from vila_edge.checkpoint import Checkpoint

    if isinstance(model, VilaConfig):
        return "model", model
    if isinstance(model, Checkpoint):
        return model.name, model.config
    from vila_edge.presets import PRESETS, preset_config

    s = str(model)
    if s in PRESETS and not Path(s).is_dir():
        return s, preset_config(s)
    from vila_edge.checkpoint import load_checkpoint

    ckpt = load_checkpoint(s, validate=False)
    return ckpt.name, ckpt.config


def projector_bytes_per_param(dev: DeviceProfile, vision_precision: str) -> int:
    """fp32 with an fp32 tower, and on CPUs beside the int8 tower (the build writes no int8 projector); else fp16."""
    return 4 if vision_precision == "fp32" or (dev.kind == "cpu" and vision_precision == "int8") else 2


def _budget(cfg: VilaConfig, dev: DeviceProfile, llm_precision: str, vision_precision: str, max_context: int,
            max_tiles: int, single_scale: bool, lm_head_bits: float | None = None, kv_dtype: str | None = None
            ) -> tuple[dict, dict, int, int]:
    m, v = cfg.llm, cfg.vision
    w = llm_weight_bytes(cfg, llm_precision, lm_head_bits)
    vp = vision_params(cfg)
    vbytes = _bits(vision_precision) / 8
    pbytes = projector_bytes_per_param(dev, vision_precision)
    vision_engine = math.ceil(vp["tower"] * vbytes) + pbytes * vp["projector"]
    kvp = kv_bytes_per_position(cfg, dev, llm_precision, kv_dtype)
    kv = kvp * max_context
    tiles, positions = max_image(cfg, max_tiles, single_scale)
    a = dev.activation_bytes
    n, h = v.sequence_length, v.hidden_size
    scores = 0 if dev.fused_attention else v.num_heads * n
    vision_act = tiles * n * (2 * h + max(3 * h + scores, v.intermediate_size)) * a
    if v.ps3 is not None:
        vision_act = ps3_activation_values(v.ps3, v.layers_used, v.num_heads, dev.fused_attention) * a
    q, kvw = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    t = max_context
    llm_act = t * (2 * m.hidden_size + q + 2 * kvw + 2 * m.intermediate_size) * a + m.vocab_size * 4
    if not dev.fused_attention:
        llm_act += m.num_heads * t * t * 4
    overhead = int(dev.runtime_overhead_mib * MIB)
    memory = {"llm_weights": w["total"], "vision_engine": vision_engine, "kv_cache": kv,
              "activations": vision_act + llm_act, "runtime_overhead": overhead}
    memory["total"] = sum(memory.values())
    memory["usable"] = dev.usable_bytes
    detail = {"llm_linear": w["linear"], "llm_lm_head": w["lm_head"], "llm_embed": w["embed"], "llm_small": w["small"],
              "llm_decode_read_per_token": w["decode_read"], "vision_tower": math.ceil(vp["tower"] * vbytes),
              "projector": pbytes * vp["projector"], "vision_activations": vision_act, "llm_activations": llm_act,
              "kv_bytes_per_position": kvp}
    return memory, detail, tiles, positions


def predict(cfg: VilaConfig, dev: DeviceProfile, llm_precision: str, tiles: int, positions: int,
            max_context: int, lm_head_bits: float | None = None, vision_precision: str = "fp32",
            kv_dtype: str | None = None) -> tuple[dict, dict]:
    """Predicted speeds (and the efficiency factors they assume). `positions`: the image's LLM positions (the
    prompt is MIN_TEXT_TOKENS more); `vision_precision`: the tower graph that runs (int8: the CPU int8 tower)."""
    m = cfg.llm
    w = llm_weight_bytes(cfg, llm_precision, lm_head_bits)
    bw = dev.bandwidth_gbs * 1e9
    kvp = kv_bytes_per_position(cfg, dev, llm_precision, kv_dtype)

    def roofline(ctx: int) -> float:
        return bw / (w["decode_read"] + kvp * ctx)

    rate = dev.compute_tflops * 1e12 * dev.vision_efficiency

    def seconds(flops: float) -> float:
        return flops / rate if rate > 0 else float("nan")

    split = vision_flops_split(cfg)
    flops_tile = sum(split.values())
    tower_q = int8_matmul_speedup(dev, vision_precision == "int8")
    tower_s = seconds(split["weights"] / tower_q + split["attention"] + split["other"])
    projector_s = seconds(split["projector"])  # no int8 projector graph: fp32 on CPUs
    tile_s = tower_s + projector_s
    prompt = positions + MIN_TEXT_TOKENS
    q = m.num_heads * m.head_dim
    llm_q = int8_matmul_speedup(dev, llm_precision in ("int4", "int8"))
    linear_flops = 2 * llm_linear_params(cfg) * prompt + 2 * m.vocab_size * m.hidden_size  # + the last LM head row
    attention_flops = 2 * m.num_layers * prompt * prompt * q
    prefill_s = seconds(linear_flops / llm_q + attention_flops)
    ctx1k = min(DEFAULT_CONTEXT_FOR_DECODE, max_context)
    pred = {
        "vision_gflops_per_tile": flops_tile / 1e9,
        "vision_ms_per_tile": 1e3 * tile_s,
        "tower_ms_per_tile": 1e3 * tower_s,
        "projector_ms_per_tile": 1e3 * projector_s,
        "vision_ms_largest_image": 1e3 * tile_s * tiles,
        "prefill_ms_largest_image": 1e3 * prefill_s,
        "ttft_ms_largest_image": 1e3 * (tile_s * tiles + prefill_s),
        "decode_bytes_per_token_ctx1k": w["decode_read"] + kvp * ctx1k,
        "decode_roofline_tok_s_ctx1k": roofline(ctx1k),
        "decode_tok_s_ctx1k": dev.decode_efficiency * roofline(ctx1k),
        "decode_tok_s_max_context": dev.decode_efficiency * roofline(max_context),
    }
    eff = {"decode_efficiency": dev.decode_efficiency, "vision_efficiency": dev.vision_efficiency,
           "compute_tflops": dev.compute_tflops, "bandwidth_gbs": dev.bandwidth_gbs,
           "tower_int8_speedup": tower_q, "prefill_int8_speedup": llm_q}
    return pred, eff


def plan(model, device, *, max_context: int | None = None, max_tiles: int | None = None,
         llm_precision: str = "int4", vision_precision: str | None = None, single_scale: bool = False,
         suggest: bool = True, backend: str = "native", lm_head_bits: float | None = None,
         kv_dtype: str | None = None) -> Plan:
    """Memory budget and speed predictions for `model` (preset name, checkpoint path, Checkpoint or
    VilaConfig) on `device` (profile name, TOML path or DeviceProfile). Defaults: the checkpoint's own
    max length and max tiles; vision weights fp16 on GPUs, fp32 on CPUs (what `vila-edge build` exports;
    `vision_precision="int8"` plans the `--int8-vision` tower, which the runtime picks on CPUs when built).
    `lm_head_bits`: the LM head's bits when a quantized build's differ from the body's; default int8 on CPUs
    (the ONNX builder's default head), the body's bits on GPUs.
    `backend`: "native" (the profile's engines: TensorRT / TensorRT-LLM, ONNX Runtime on CPUs) or "torch" (the
    PyTorch backend: the profile's torch_* efficiencies; the default build's 8-bit LM head runs dequantized
    to fp16 there, so it is counted at 16 bits). `kv_dtype`: the KV cache as built (`--kv-dtype`: float16 |
    float32); None: a default build's (kv_bytes_per_position)."""
    if kv_dtype not in (None, "float16", "float32"):
        raise VilaEdgeError(f"kv dtype {kv_dtype!r} is not one of: float16, float32")
    label, cfg = _resolve_model(model)
    dev = load_profile(device)
    head_bits = lm_head_bits
    if head_bits is None and dev.kind == "cpu" and llm_precision in ("int4", "int8"):
        head_bits = PRECISION_BITS["int8"]
    if backend == "torch":
        if not (dev.torch_decode_efficiency > 0 and dev.torch_vision_efficiency > 0):
            raise VilaEdgeError(f"device profile {dev.name} states no torch backend efficiencies "
                                f"(torch_decode_efficiency / torch_vision_efficiency)")
        dev = dataclasses.replace(dev, decode_efficiency=dev.torch_decode_efficiency,
                                  vision_efficiency=dev.torch_vision_efficiency)
        head_bits = 16 if llm_precision in ("int4", "int8") else None
    elif backend != "native":
        raise VilaEdgeError(f"backend {backend!r} is not one of: native, torch")
    vision_precision = vision_precision or ("fp32" if dev.kind == "cpu" else "fp16")
    _bits(llm_precision)
    if vision_precision not in ("fp16", "bf16", "fp32", "fp8", "int8"):
        raise VilaEdgeError(f"vision precision {vision_precision!r} is not one of: fp16, fp32, fp8, int8")
    if llm_precision == "fp8" and dev.kind == "cpu":
        # the fp8 CPU build exists (ONNX QDQ), but ONNX Runtime runs its products in fp32: no speed to plan for
        raise VilaEdgeError(f"--llm-precision fp8 is not planned for {dev.name} (CPU): its ONNX QDQ decoder computes in "
                            "fp32 (accuracy, not speed); plan int4, int8 or fp16, or build fp8 without --device")
    max_context = int(max_context or cfg.llm.max_length)
    max_tiles = int(max_tiles or cfg.vision.max_tiles)
    if max_context < 1 or max_tiles < 1:
        raise VilaEdgeError("--max-context and --max-tiles must be positive")
    memory, detail, tiles, positions = _budget(cfg, dev, llm_precision, vision_precision, max_context, max_tiles,
                                               single_scale, head_bits, kv_dtype)
    pred, eff = predict(cfg, dev, llm_precision, tiles, positions, max_context, head_bits, vision_precision, kv_dtype)
    eff["backend"] = backend
    p = Plan(model=label, device=dev, llm_precision=llm_precision, vision_precision=vision_precision,
             max_context=max_context, max_tiles=max_tiles, single_scale=single_scale, tiles=tiles,
             image_positions=positions, memory=memory, detail=detail, predicted=pred, efficiency=eff,
             kv_dtype=kv_dtype)
    p.problems = _problems(p)
    if p.problems and suggest:
        p.fixes = _fixes(cfg, label, dev, p)
        if not p.fixes:
            p.bigger_devices = _bigger_devices(cfg, p)
    return p


def _problems(p: Plan) -> list[str]:
    out = []
    if p.memory["total"] > p.memory["usable"]:
        out.append(f"needs {p.memory['total'] / GIB:.2f} GiB, {p.memory['usable'] / GIB:.2f} GiB usable")
    if p.image_positions + MIN_TEXT_TOKENS > p.max_context:
        out.append(f"one image at {p.tiles} tiles takes {p.image_positions} positions, more than max context "
                   f"{p.max_context} minus {MIN_TEXT_TOKENS} for text")
    return out


def _fixes(cfg: VilaConfig, label: str, dev: DeviceProfile, p: Plan) -> list[str]:
    """Knob settings that make the plan fit: single knobs first; else the cheapest combination."""
    scheme = tiling_scheme(cfg.vision)
    s2 = scheme.multi_scale and not p.single_scale
    fewer_tiles = range(0) if p.single_scale else scheme.smaller_max_tiles(p.max_tiles)
    tiled = len(fewer_tiles) > 0

    def fits(**kw) -> bool:
        args = dict(max_context=p.max_context, max_tiles=p.max_tiles, llm_precision=p.llm_precision,
                    vision_precision=p.vision_precision, single_scale=p.single_scale, kv_dtype=p.kv_dtype)
        args.update(kw)
        return plan(cfg, dev, suggest=False, **args).fits

    def best_context(**kw) -> int | None:
        """Largest max context (multiple of 256) that fits with the other knobs as given."""
        lo, hi = 0, p.max_context // 256
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(max_context=mid * 256, **kw):
                lo = mid
            else:
                hi = mid - 1
        return lo * 256 if lo and lo * 256 < p.max_context else None

    def best_tiles(**kw) -> int | None:
        for t in fewer_tiles:
            if fits(max_tiles=t, **kw):
                return t
        return None

    def flags(kw: dict) -> str:
        parts = []
        if "llm_precision" in kw:
            parts.append(f"--llm-precision {kw['llm_precision']}")
        if kw.get("single_scale"):
            parts.append("--single-scale (instead of S2)")
        if "max_tiles" in kw:
            parts.append(f"--max-tiles {kw['max_tiles']}")
        if "max_context" in kw:
            parts.append(f"--max-context {kw['max_context']}")
        return " ".join(parts)

    cands: list[dict] = []
    if p.llm_precision != "int4":
        cands.append({"llm_precision": "int4"})
    if s2:
        cands.append({"single_scale": True})
    singles = [flags(kw) for kw in cands if fits(**kw)]
    if tiled and (t := best_tiles()) is not None:
        singles.append(flags({"max_tiles": t}))
    if (c := best_context()) is not None:
        singles.append(flags({"max_context": c}))
    if singles:
        return singles
    # combine: int4, then single-scale, then the largest context, then fewer tiles with the largest context
    kw: dict = {}
    for step in cands:
        kw.update(step)
        if fits(**kw):
            return [flags(kw)]
    c = best_context(**kw)
    if c is not None:
        return [flags({**kw, "max_context": c})]
    if tiled and not kw.get("single_scale"):
        for t in fewer_tiles:
            if fits(max_tiles=t, **kw):
                return [flags({**kw, "max_tiles": t})]
            c = best_context(max_tiles=t, **kw)
            if c is not None:
                return [flags({**kw, "max_tiles": t, "max_context": c})]
    return []


def _bigger_devices(cfg: VilaConfig, p: Plan) -> list[str]:
    """Known profiles on which this model fits at int4 with the same context and tiles."""
    out = []
    for name in list_profiles():
        try:
            q = plan(cfg, name, max_context=p.max_context, max_tiles=p.max_tiles, llm_precision="int4",
                     single_scale=p.single_scale, suggest=False)
        except VilaEdgeError:
            continue
        if q.fits:
            out.append((q.device.memory_gib * q.device.usable_fraction, name))
    return [n for _, n in sorted(out)[:3]]


def check_plan_fits(ckpt_or_config, device, max_context: int | None = None, max_tiles: int | None = None, *,
                    llm_precision: str = "int4", vision_precision: str | None = None, single_scale: bool = False) -> Plan:
    """Build-time guard (`vila-edge build --device`): the Plan if it fits, else VilaEdgeError naming the knob."""
    p = plan(ckpt_or_config, device, max_context=max_context, max_tiles=max_tiles, llm_precision=llm_precision,
             vision_precision=vision_precision, single_scale=single_scale)
    if not p.fits:
        raise VilaEdgeError(p.refusal())
    return p


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------


def print_plan(p: Plan, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    d, m, pr = p.device, p.memory, p.predicted
    t = Table(title=f"{p.model} on {d.name}: {d.description}", show_header=True)
    t.add_column("memory")
    t.add_column("GiB", justify="right")
    t.add_column("how", style="dim")
    t.add_row("LLM weights", f"{m['llm_weights'] / GIB:.2f}",
              f"{p.llm_precision} ({PRECISION_BITS[p.llm_precision]} bits/weight linear"
              f"{', tied table once' if p.detail['llm_embed'] == 0 else ', fp16 embedding table'})")
    t.add_row("vision engine", f"{m['vision_engine'] / GIB:.2f}",
              f"{p.vision_precision} tower + "
              f"{'fp32' if projector_bytes_per_param(d, p.vision_precision) == 4 else 'fp16'} projector")
    t.add_row("KV cache", f"{m['kv_cache'] / GIB:.2f}",
              f"{p.detail['kv_bytes_per_position']} B/position x max context {p.max_context}")
    t.add_row("activations / workspace", f"{m['activations'] / GIB:.2f}",
              f"vision {p.tiles} tiles batched {p.detail['vision_activations'] / GIB:.2f} + LLM prefill "
              f"{p.detail['llm_activations'] / GIB:.2f}")
    t.add_row("runtime overhead", f"{m['runtime_overhead'] / GIB:.2f}", "CUDA/ORT libraries, context, process")
    t.add_row("[bold]total[/bold]", f"[bold]{m['total'] / GIB:.2f}[/bold]",
              f"usable {m['usable'] / GIB:.2f} GiB = {d.memory_gib:g} GiB x {d.usable_fraction:g}")
    con.print(t)
    s = Table(title="predicted", show_header=True)
    s.add_column("figure")
    s.add_column("value", justify="right")
    s.add_column("assumes", style="dim")
    tfl = f"{d.compute_tflops:g} TFLOPS x {d.vision_efficiency:g}"
    tq, lq = p.efficiency["tower_int8_speedup"], p.efficiency["prefill_int8_speedup"]
    s.add_row("vision per tile", f"{pr['vision_ms_per_tile']:.1f} ms", f"{pr['vision_gflops_per_tile']:.0f} GFLOP / ({tfl})"
              + (f", weight MatMuls int8 x {tq:g}" if tq != 1 else ""))
    s.add_row(f"vision, largest image ({p.tiles} tiles)", f"{pr['vision_ms_largest_image']:.0f} ms", "")
    s.add_row(f"prefill, {p.image_positions} + {MIN_TEXT_TOKENS} positions", f"{pr['prefill_ms_largest_image']:.0f} ms",
              tfl + (f", linear MatMuls int8 x {lq:g}" if lq != 1 else ""))
    s.add_row("decode @ 1k context", f"{pr['decode_tok_s_ctx1k']:.1f} tok/s",
              f"roofline {pr['decode_roofline_tok_s_ctx1k']:.1f} = {d.bandwidth_gbs:g} GB/s / "
              f"{pr['decode_bytes_per_token_ctx1k'] / 1e9:.3f} GB, x {d.decode_efficiency:g}")
    s.add_row(f"decode @ {p.max_context} context", f"{pr['decode_tok_s_max_context']:.1f} tok/s", "")
    con.print(s)
    if p.fits:
        con.print(f"[green]fits[/green]: {(m['usable'] - m['total']) / GIB:.2f} GiB to spare")
    else:
        con.print(f"[red]does not fit[/red]: {p.refusal()}")
