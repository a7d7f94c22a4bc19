"""ONE command that checks and measures the PyTorch backend on an NVIDIA GPU (< 6 minutes on an H100 / H200):

    python benchmarks/gpu_check.py              # on the GPU machine; writes benchmarks/results/gpu_<card>.json
    python benchmarks/gpu_check.py --dry-run    # on any CPU: the same code end to end, small geometry, no kernels

Sections (each isolated: a failure is recorded and the next one runs):

1. fixtures: the tiny checkpoint of every family -> the real builder with --torch-weights -> the torch backend on
   the device against the PyTorch reference (fp32, CPU) running the decoder's dequantized int4 weights: relative
   error of the first logits, greedy agreement over 32 tokens, fp16 vision cosine, and the whole pipeline
   (S2 / dynamic-S2 merged by vila_edge.kernels on the GPU) against the reference's prompt embeddings.
   On the GPU the int4 kernel (tinygemm) takes bf16 activations and scales, so the logit tolerance is 3e-2
   there (1e-3 on the CPU, as in CI) and the greedy agreement is reported, not required.
2. kernels: benchmarks/gpu_kernels.py --quick (S2 merge vs device copy bandwidth, FP8 GEMMs), its table copied.
3. geometry, per preset (nvila-lite-2b, vila1.5-3b): random int4 weights at the real layer sizes, built in memory
   in the torch-weights layout (no checkpoint, no ONNX: minutes saved), every linear int4 (LM head included,
   the `lm_head="int4"` build). The peer is transformers fp16 eager (sdpa) with the very same dequantized
   weights on the same GPU; it is also the parity reference. Measured: vision ms/tile (SigLIP + projector fp16,
   tiles of a 1280x720 image in one batch), TTFT (vision + prefill of media + 32 text positions), decode tok/s
   at batch 1 (128 greedy tokens, CUDA-graph step), the bytes one decode step reads (weights + the static KV
   cache span the step attends over: here all of max_context = prompt + 144) and the share of the HBM roofline
   (against the measured device-to-device copy bandwidth and against the datasheet figure when the card is
   known). Then where a step's time goes: "decode step" (the captured graph replayed 50x back to back vs the
   generate loop's time per token: the difference is host work per token), "decode kernels" (kernels per step
   and the top ones by time, torch.profiler over 3 replays), and "decode step bf16 model" (the same weights
   with bf16 as the model dtype: no casts around the bf16-only int4 kernel; its logit error vs transformers).
   `planner` in the JSON: the efficiencies the planner's GPU profiles can take from this run.
4. fp8: the torch backend's FP8 linears (backends/torch_fp8.py: W8A8 through torch._scaled_mm with the 1x128
   activation / 128x128 weight block scales; weight-only where _scaled_mm is refused, e.g. no FP8 tensor cores).
   Parity: the nvila-lite fixture built with --llm-precision fp8 --projector-precision fp8 --torch-weights (e4m3 and
   e5m2), the LLM on the GPU (fp32 model: limit 1e-3 and the same 32 greedy tokens; fp16 model: 0.25, see
   FP8_FP16_LOGIT_TOL) and the projector against the same files on the CPU (in the GPU's mode: W8A8, or weight-only
   where the GPU refuses _scaled_mm); tests/test_fp8_torch.py holds that CPU path to ONNX Runtime's FP8 graphs.
   Speed: the first preset's random int4 weights re-quantized to FP8 e4m3 (every linear, head included), decode
   tok/s against the int4 engine on the same weights and prompt, and first logits against the CPU path (reported).
   On a CPU (dry run) the parity rows are skipped with the reason and the speed row runs at toy size (it checks the
   script).

Goals (issue 15): decode >= 3x transformers fp16 eager, >= 50% of the roofline at nvila-lite-2b; S2 merge >= 80%
of copy bandwidth (section 2). Exit status 1 when a parity check fails, 0 otherwise (speed goals are reported).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_kernels import Report as KernelReport  # noqa: E402
from gpu_kernels import log  # noqa: E402

FAMILIES = ("vila1.5", "vila1.5-s2", "nvila", "nvila-lite")
PRESETS = ("nvila-lite-2b", "vila1.5-3b")
PROMPT = "Describe the image."
GREEDY = 32
NEW_TOKENS = 128
TEXT_TOKENS = 32
GPU_LOGIT_TOL = 3e-2  # tinygemm: bf16 activations and scales
CPU_LOGIT_TOL = 1e-3
# FP8 on the GPU vs the CPU path (fp32), same codes: an fp32 model differs by fp32 summation order (and an activation
# on an FP8 rounding boundary moving a step). An fp16 model rounds the activations to fp16 before quantizing them, which
# moves some of them by one FP8 step: 6.7e-2 (e4m3) and 9.9e-2 (e5m2) on the nvila-lite fixture with the fp16 model on
# the CPU (its weight-only FP8 and int4 engines: 2e-3), so that limit only catches a broken layout (errors of order 1)
FP8_FP32_LOGIT_TOL = 1e-3
FP8_FP16_LOGIT_TOL = 0.25
VISION_COSINE = 0.999
# datasheet HBM bandwidth (GB/s) and dense fp16 tensor TFLOPS, matched on the device name
CARDS = (("H200", 4800, 989), ("H100 NVL", 3900, 835), ("H100 PCIe", 2000, 756), ("H100", 3350, 989),
         ("A100-SXM4-80GB", 2039, 312), ("A100", 1555, 312), ("L40S", 864, 362), ("RTX 4090", 1008, 165))


class Report(KernelReport):
    """gpu_kernels' report (sections isolated, one row per case) that also counts parity failures."""

    def __init__(self) -> None:
        super().__init__()
        self.parity_failures = 0

    def row(self, section: str, case: str, result: str, ok: bool | None, parity: bool = False) -> None:
        super().row(section, case, result, ok)
        if parity and ok is False:
            self.parity_failures += 1


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    f = np.isfinite(want)
    return float(np.abs(got[f] - want[f]).max() / np.abs(want[f]).max())


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())


def _image(w=300, h=150, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _median_s(fn, runs: int, sync) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- 1. fixtures: the real builder, parity against the reference ------------------------------------------------


def _masked_greedy(first: np.ndarray, step, cfg, steps: int) -> list[int]:
    import torch

    from vila_edge.reference.model import mask_untrained

    def pick(logits: np.ndarray) -> int:
        return int(np.argmax(mask_untrained(torch.from_numpy(logits), cfg).numpy()))

    tokens = [pick(first)]
    for _ in range(steps - 1):
        tokens.append(pick(step(tokens[-1])))
    return tokens


def fixtures(rep: Report, device: str, work: Path, families) -> list[dict]:
    import torch

    import vila_edge
    from vila_edge.backends.torch_llm import TorchLLMEngine
    from vila_edge.backends.torch_vision import TorchVisionEngine
    from vila_edge.builder.build import BuildOptions, build
    from vila_edge.builder.llm_onnx import dequantized_weights
    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.media.tiling import preprocess_image
    from vila_edge.prompt import Message, render, tokenize, user_content
    from vila_edge.reference.model import ReferenceVILA, mask_untrained
    from vila_edge.testing import make_tiny_checkpoint

    tol = GPU_LOGIT_TOL if device == "cuda" else CPU_LOGIT_TOL
    out = []
    for family in families:
        ckpt_dir = make_tiny_checkpoint(family, work / f"ckpt-{family}", seed=0, overwrite=True)
        engine_dir = build(ckpt_dir, work / f"engine-{family}", progress=False, force=True,
                           options=BuildOptions(llm_quant="rtn", torch_weights=True)).path
        ref = ReferenceVILA(load_checkpoint(ckpt_dir))
        ref.load_llm_weights(dequantized_weights(engine_dir / "llm"))
        cfg, tok, img = ref.cfg, ref.ckpt.tokenizer, _image()
        items = ref.image_items(preprocess_image(img, cfg.vision, single=True))
        content = user_content(cfg, PROMPT, n_images=1, n_tiles=len(items))
        ids = tokenize(cfg, tok, render(cfg.llm.chat_format, [Message("user", content)], tok), first=True)
        emb = ref.inputs_embeds(ids, items)

        manifest = json.loads((engine_dir / "manifest.json").read_text())
        llm = TorchLLMEngine(engine_dir / "llm", manifest["llm"], device=device, max_context=512)
        first = llm.forward(emb.numpy())
        want = mask_untrained(ref.logits(emb)[-1], cfg).numpy()
        err = _rel_err(mask_untrained(torch.from_numpy(first), cfg).numpy(), want)
        got_tokens = _masked_greedy(first, lambda t, llm=llm: llm.forward(llm.embed([t])), cfg, GREEDY)
        want_tokens = ref.greedy(emb, GREEDY)  # stops on the stop tokens: compared over its length
        agree = next((i for i, (a, b) in enumerate(zip(got_tokens, want_tokens, strict=False)) if a != b),
                     min(len(got_tokens), len(want_tokens)))
        rep.row("fixtures", f"{family} LLM logits", f"relative error {err:.2e} (limit {tol:g}), "
                f"{llm.describe()['decode']} decode", err <= tol, parity=True)
        rep.row("fixtures", f"{family} greedy", f"first {agree} of {len(want_tokens)} reference tokens agree",
                agree == len(want_tokens) if device == "cpu" else None, parity=True)

        size = cfg.vision.image_size
        pixels = np.random.default_rng(0).uniform(-1, 1, (3, 3, size, size)).astype(np.float32)
        vision = TorchVisionEngine(engine_dir / "vision", manifest["vision"], device=device, dtype="float16")
        cos = _cosine_min(vision.encode(pixels), ref.encode_tiles(pixels).numpy())
        rep.row("fixtures", f"{family} vision fp16", f"cosine min {cos:.6f} vs fp32 reference", cos >= VISION_COSINE,
                parity=True)

        pipe = vila_edge.load(engine_dir, device=device, vision_backend="torch", llm_backend="torch")
        pipe_emb = pipe.prompt_embeds(PROMPT, [img])
        pcos = _cosine_min(pipe_emb, emb.numpy())
        merge = pipe.describe()["merge"]
        rep.row("fixtures", f"{family} pipeline embeds", f"cosine min {pcos:.6f} ({merge} merge)",
                pcos >= VISION_COSINE, parity=True)
        out.append({"family": family, "logits_rel_err": err, "greedy_agree": agree, "greedy_len": len(want_tokens),
                    "vision_fp16_cosine_min": cos, "pipeline_embeds_cosine_min": pcos, "merge": merge,
                    "llm": llm.describe(), "vision": vision.describe()})
    return out


# ---- 2. kernels -------------------------------------------------------------------------------------------------


def kernels(rep: Report, results_dir: Path, timeout: int) -> dict:
    import torch
    from gpu_kernels import card_slug

    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_kernels.py"), "--quick", "--results-dir", str(results_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    path = results_dir / f"gpu_kernels_{card_slug(torch.cuda.get_device_name(0))}.json"
    if not path.is_file():
        raise RuntimeError(f"gpu_kernels.py wrote no JSON (exit {proc.returncode}): {proc.stderr[-400:]}")
    table = json.loads(path.read_text())["table"]
    for r in table:
        if r["section"].startswith("s2"):
            rep.row("kernels", r["case"], r["result"], {"PASS": True, "FAIL": False}.get(r["verdict"]))
    return {"json": path.name, "exit": proc.returncode, "fails": sum(r["verdict"] == "FAIL" for r in table),
            "table": table}


# ---- 3. geometry: random int4 weights at real sizes, vs transformers fp16 eager ------------------------------------


def _shrunk(preset):
    """The preset at toy size (dry run on a CPU): same families, layer kinds and tiling, tiny widths."""
    llm = {**preset.llm, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2 if preset.llm["model_type"] == "qwen2" else 4,
           "vocab_size": 1024}
    vision = {**preset.vision, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
              "num_attention_heads": 2}
    top = {**preset.top, "hidden_size": 256, "mm_hidden_size": 64}
    return dataclasses.replace(preset, llm=llm, vision=vision, top=top)


def _random_int4(n: int, k: int, group: int, gen, device: str) -> dict:
    """Codes, integer zero points and fp16-valued scales (|w| ~ 0.02, like trained projections)."""
    import torch

    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device, generator=gen)
    zeros = torch.randint(0, 16, (n, k // group), device=device, generator=gen).float()
    scales = (torch.rand(n, k // group, device=device, generator=gen) * 4e-3 + 2e-3).half().float()
    return {"codes": codes, "zeros": zeros, "scales": scales}


def random_llm(raw: dict, device: str, group: int = 128, seed: int = 0):
    """(tensors + config in the torch-weights layout, fp16 embedding table, HF state dict of the same dequantized
    weights in float32: the transformers model casts them to its own dtype)."""
    import torch

    from vila_edge.backends.torch_llm import dequantize_grouped
    from vila_edge.builder.torch_weights import llm_config, rope_tables

    gen = torch.Generator(device=device).manual_seed(seed)
    h, inter, layers = raw["hidden_size"], raw["intermediate_size"], raw["num_hidden_layers"]
    heads, kv = raw["num_attention_heads"], raw["num_key_value_heads"]
    hd, vocab = h // heads, raw["vocab_size"]
    qwen = raw["model_type"] == "qwen2"
    tensors, linears, hf = {}, {}, {}

    def linear(name: str, n: int, k: int, hf_names: list[tuple[str, int]]):
        q = _random_int4(n, k, group, gen, device)
        tensors[f"{name}.int4"] = (q["codes"][:, 0::2] << 4) | q["codes"][:, 1::2]
        tensors[f"{name}.scales_and_zeros"] = torch.stack([q["scales"], (8 - q["zeros"]) * q["scales"]], -1
                                                          ).transpose(0, 1).contiguous()
        linears[name] = {"kind": "int4", "in": k, "out": n, "group_size": group, "bits": 4}
        w = dequantize_grouped(q["codes"], q["zeros"], q["scales"], k)  # float32: exact
        row = 0
        for hf_name, rows in hf_names:
            hf[hf_name] = w[row:row + rows]
            row += rows

    for i in range(layers):
        p, m = f"layers.{i}.", f"model.layers.{i}."
        linear(p + "qkv_proj", (heads + 2 * kv) * hd, h, [(m + "self_attn.q_proj.weight", heads * hd),
                                                         (m + "self_attn.k_proj.weight", kv * hd),
                                                         (m + "self_attn.v_proj.weight", kv * hd)])
        if qwen:
            bias = torch.randn((heads + 2 * kv) * hd, device=device, generator=gen) * 0.02
            tensors[p + "qkv_proj.bias"] = bias
            for j, (name, rows) in enumerate((("q", heads * hd), ("k", kv * hd), ("v", kv * hd))):
                start = (0, heads * hd, (heads + kv) * hd)[j]
                hf[m + f"self_attn.{name}_proj.bias"] = bias[start:start + rows]
        linear(p + "o_proj", h, heads * hd, [(m + "self_attn.o_proj.weight", h)])
        linear(p + "gate_up_proj", 2 * inter, h, [(m + "mlp.gate_proj.weight", inter), (m + "mlp.up_proj.weight", inter)])
        linear(p + "down_proj", h, inter, [(m + "mlp.down_proj.weight", h)])
        for ours, theirs in (("input_norm", "input_layernorm"), ("post_norm", "post_attention_layernorm")):
            tensors[p + ours] = 1 + 0.1 * torch.rand(h, device=device, generator=gen)
            hf[m + theirs + ".weight"] = tensors[p + ours]
    tensors["norm"] = 1 + 0.1 * torch.rand(h, device=device, generator=gen)
    hf["model.norm.weight"] = tensors["norm"]
    linear("lm_head", vocab, h, [("lm_head.weight", vocab)])
    inv_freq, scaling = rope_tables(raw)
    tensors["rope_inv_freq"] = torch.from_numpy(inv_freq)
    embed = (torch.randn(vocab, h, device=device, generator=gen) * 0.02).half()
    hf["model.embed_tokens.weight"] = embed
    config = llm_config(raw, linears, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hd,
                        rope_attention_scaling=scaling, source="random")
    return tensors, config, embed.cpu().numpy(), hf


def hf_model(raw: dict, state: dict, device: str, dtype):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {**raw, "tie_word_embeddings": False}  # the random int4 head is its own tensor
    model_type = raw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "architectures"})
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"transformers model weights: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()


def _roofline_bandwidth(device: str) -> dict:
    """Measured device copy bandwidth (bytes read + written) and the datasheet figure when known."""
    import torch

    if device != "cuda":
        return {"measured_gbs": None, "datasheet_gbs": None, "fp16_tflops": None}
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    t = _median_s(lambda: b.copy_(a), 10, torch.cuda.synchronize)
    name = torch.cuda.get_device_name(0)
    card = next((c for c in CARDS if c[0].lower() in name.lower()), None)
    return {"measured_gbs": 2 * (1 << 30) / t / 1e9, "datasheet_gbs": card[1] if card else None,
            "fp16_tflops": card[2] if card else None}


def geometry(rep: Report, device: str, preset_name: str, dry: bool, new_tokens: int, runs: int, bw: dict) -> dict:
    import torch

    from vila_edge.backends.torch_llm import TorchLLMEngine
    from vila_edge.backends.torch_vision import TorchVisionEngine
    from vila_edge.media.tiling import preprocess_image
    from vila_edge.plan import vision_flops_per_tile
    from vila_edge.presets import get_preset

    preset = get_preset(preset_name)
    if dry:
        preset = _shrunk(preset)
    cfg = preset.config()
    sync = _sync(device)
    dtype = torch.float16 if device == "cuda" else torch.float32
    tol = GPU_LOGIT_TOL if device == "cuda" else CPU_LOGIT_TOL

    # vision: the tiles of a 1280x720 image in one batch
    vt, vc = random_vision(preset, cfg, device)
    vision = TorchVisionEngine.from_tensors(vt, vc, device=device, dtype="float16" if device == "cuda" else None)
    pixels = preprocess_image(_image(1280, 720), cfg.vision, single=True).pixels
    tiles = pixels.shape[0]
    vision.project(vision.encode(pixels))  # warm-up
    t_vision = _median_s(lambda: vision.project(vision.encode(pixels)), runs, sync)
    media = vision.project(vision.encode(pixels))
    positions = media.shape[0] * media.shape[1] + TEXT_TOKENS
    flops_tile = vision_flops_per_tile(cfg)

    # LLM: ours and transformers on the same dequantized weights
    tensors, config, table, hf_state = random_llm(preset.llm, device)
    max_context = positions + new_tokens + 16
    ours = TorchLLMEngine.from_tensors(tensors, config, table, max_context=max_context, device=device,
                                       dtype="float16" if device == "cuda" else None)
    weight_bytes = sum(t.numel() * t.element_size() for t in ours.model.tensors(decode_only=True))
    model = hf_model(preset.llm, hf_state, device, dtype)
    del hf_state
    rng = np.random.default_rng(0)
    prompt = np.asarray(table[rng.integers(0, table.shape[0], positions)], np.float32)
    prompt_t = torch.from_numpy(prompt).to(device, dtype)[None]

    def ours_prefill():
        ours.reset()
        return ours.forward(prompt)

    def ours_decode() -> float:
        """Seconds of `new_tokens` greedy steps after a prefill (the prefill not counted)."""
        logits = ours_prefill()
        sync()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            logits = ours.forward(ours.embed([int(np.argmax(logits))]))
        return time.perf_counter() - t0

    @torch.inference_mode()
    def hf_prefill():
        return model(inputs_embeds=prompt_t, use_cache=True)

    @torch.inference_mode()
    def hf_decode() -> float:
        out = hf_prefill()
        cache, nxt = out.past_key_values, out.logits[0, -1].argmax()
        sync()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=nxt.view(1, 1), past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[0, -1].argmax()
        sync()
        return time.perf_counter() - t0

    # parity: first logits and greedy agreement
    first = ours_prefill()
    want = hf_prefill().logits[0, -1].float().cpu().numpy()
    err = _rel_err(first, want)
    rep.row(preset_name, "logits vs transformers", f"relative error {err:.2e} (limit {tol:g})", err <= tol, parity=True)

    # speed
    ours_decode()  # warm-up (the CUDA graph is captured at load)
    t_prefill = _median_s(ours_prefill, runs, sync)
    t_ours = statistics.median(ours_decode() for _ in range(runs))
    hf_decode()
    t_hf_prefill = _median_s(hf_prefill, runs, sync)
    t_hf = statistics.median(hf_decode() for _ in range(max(1, runs - 1)))
    tok_s, tok_s_hf = new_tokens / t_ours, new_tokens / t_hf
    kv_bytes = ours.kv_bytes()
    step_bytes = weight_bytes + kv_bytes
    out = {
        "preset": preset_name, "dry_run_geometry": dry, "tiles": tiles, "positions": positions,
        "vision_ms_per_tile": 1e3 * t_vision / tiles, "vision_tflops": flops_tile * tiles / t_vision / 1e12,
        "prefill_ms": 1e3 * t_prefill, "ttft_ms": 1e3 * (t_vision + t_prefill),
        "transformers_prefill_ms": 1e3 * t_hf_prefill, "transformers_ttft_ms": 1e3 * (t_vision + t_hf_prefill),
        "decode_tok_s": tok_s, "transformers_fp16_eager_decode_tok_s": tok_s_hf, "decode_speedup": tok_s / tok_s_hf,
        "decode_bytes_per_token": step_bytes, "weight_bytes": weight_bytes, "kv_bytes_read_per_token": kv_bytes,
        "logits_rel_err_vs_transformers": err, "llm": ours.describe(), "new_tokens": new_tokens,
    }
    rep.row(preset_name, "vision", f"{out['vision_ms_per_tile']:.2f} ms/tile ({tiles} tiles), "
            f"{out['vision_tflops']:.1f} TFLOPS", None)
    rep.row(preset_name, "TTFT", f"{out['ttft_ms']:.1f} ms ({positions} positions) vs transformers "
            f"{out['transformers_ttft_ms']:.1f} ms", None)
    rep.row(preset_name, "decode", f"{tok_s:.1f} tok/s ({out['llm']['decode']}) vs transformers fp16 eager "
            f"{tok_s_hf:.1f} = {out['decode_speedup']:.2f}x (goal 3x)",
            out["decode_speedup"] >= 3 if device == "cuda" else None)
    for key in ("measured_gbs", "datasheet_gbs"):
        if bw.get(key):
            share = tok_s * step_bytes / (bw[key] * 1e9)
            out[f"roofline_share_{key.split('_')[0]}"] = share
            goal = share >= 0.5 if (key == "datasheet_gbs" and preset_name == "nvila-lite-2b") else None
            rep.row(preset_name, f"roofline ({key.split('_')[0]} {bw[key]:.0f} GB/s)",
                    f"{share:.1%} ({step_bytes / 1e9:.3f} GB/token)", goal)
    if bw.get("fp16_tflops"):
        out["vision_efficiency"] = out["vision_tflops"] / bw["fp16_tflops"]
    try:  # diagnostics: a failure here must not lose the measurements above
        out["decode_profile"] = decode_profile(rep, preset_name, ours, device, 1e6 / tok_s, step_bytes, bw)
        out["bf16_model_dtype"] = bf16_step(rep, preset_name, tensors, config, table, prompt, want, max_context,
                                            device, step_bytes, bw)
    except Exception as e:  # noqa: BLE001
        rep.row(preset_name, "decode profile", f"ERROR {type(e).__name__}: {str(e)[:160]}", None)
    return out


def bf16_step(rep: Report, preset_name: str, tensors: dict, config: dict, table, prompt, want, max_context: int,
              device: str, step_bytes: int, bw: dict) -> dict:
    """Experiment: the same int4 weights with bf16 as the model dtype. tinygemm computes in bf16, so an fp16 model
    casts activations to bf16 and back around every int4 linear (2 extra kernels x 4 linears x layers per step);
    a bf16 model has none. Reports its first-logit error against transformers fp16 and its decode step."""
    from vila_edge.backends.torch_llm import TorchLLMEngine

    eng = TorchLLMEngine.from_tensors(tensors, config, table, max_context=max_context, device=device,
                                      dtype="bfloat16")
    err = _rel_err(eng.forward(prompt), want)
    prof = decode_profile(None, preset_name, eng, device, None, step_bytes, bw)
    rep.row(preset_name, "decode step bf16 model", f"{prof['step_us']:.0f} us/step ({prof['timed']}), "
            f"{prof['kernels_per_step']:.0f} {'kernels' if device == 'cuda' else 'aten ops'}/step; first logits "
            f"vs transformers fp16: relative error {err:.2e}", None)
    return {**prof, "logits_rel_err_vs_transformers": err}


def _kernel_table(prof, steps: int, device: str) -> tuple[float, list]:
    """(device kernels per step, top kernels by total time: (name, calls per step, us per step)) of a profile of
    `steps` decode steps; on the CPU the aten operators stand in for kernels (what the dry run can count)."""
    import torch

    want = torch.autograd.DeviceType.CUDA if device == "cuda" else torch.autograd.DeviceType.CPU
    rows: dict[str, list] = {}
    for e in prof.events():
        if e.device_type != want or (device == "cpu" and not e.name.startswith("aten::")):
            continue
        row = rows.setdefault(e.name, [0, 0.0])
        row[0] += 1
        row[1] += e.device_time_total if device == "cuda" else e.self_cpu_time_total  # us
    total = sum(r[0] for r in rows.values())
    top = sorted(rows.items(), key=lambda kv: -kv[1][1])[:8]
    return total / steps, [(name[:60], n / steps, us / steps) for name, (n, us) in top]


def decode_profile(rep: Report | None, preset_name: str, engine, device: str, loop_us: float | None,
                   step_bytes: int, bw: dict, steps: int = 3, replays: int | None = None) -> dict:
    """Where one decode step's time goes (issue 15): the captured step replayed back to back (device time of the
    step alone, no host loop) against the generate loop's time per token (host embed lookup, H2D copy, graph
    replay, logits D2H + sync, Python), the kernels one step launches (count and the top ones by time:
    torch.profiler over `steps` replays), and the bytes floor. On the CPU (dry run) the same code times the
    static step eagerly and counts aten operators instead of kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vila_edge.backends.torch_llm import CudaGraphStep

    graphed = isinstance(engine._decode, CudaGraphStep)
    replays = replays or (50 if device == "cuda" else 5)
    x = torch.zeros(1, engine.hidden_size, dtype=engine.dtype, device=device)
    pos = torch.full((1,), engine.length, dtype=torch.long, device=device)  # a row no later step reads unwritten

    with torch.inference_mode():
        if graphed:  # the graph of the span a step at this length uses
            span = engine._span()[0]
            engine._decode(engine._decode.x.clone(), pos, span)
            replay = engine._decode.graphs[span][0].replay

        def step():
            if graphed:
                replay()
            else:
                engine.model.decode_static(x, pos)

        for _ in range(3):
            step()
        _sync(device)()
        t0 = time.perf_counter()
        for _ in range(replays):
            step()
        _sync(device)()
        step_us = 1e6 * (time.perf_counter() - t0) / replays
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        profiled = what = "graph replay" if graphed else "eager static step"
        with profile(activities=acts) as prof:
            for _ in range(steps):
                step()
            _sync(device)()
        per_step, top = _kernel_table(prof, steps, device)
        if per_step < 1 and graphed:  # this profiler saw no kernels inside graph replays: count the eager step
            graphed, profiled = False, "eager static step (graph replays showed no kernels)"
            with profile(activities=acts) as prof:
                for _ in range(steps):
                    step()
                _sync(device)()
            per_step, top = _kernel_table(prof, steps, device)
    floor_us = 1e6 * step_bytes / (bw["measured_gbs"] * 1e9) if bw.get("measured_gbs") else None
    unit = "kernels" if device == "cuda" else "aten ops"
    if rep is not None:
        loop = f" vs {loop_us:.0f} us per token in the generate loop: host {loop_us - step_us:.0f} us" if loop_us else ""
        rep.row(preset_name, "decode step", f"{step_us:.0f} us/step ({what} x{replays} back to back){loop}"
                + (f"; bytes floor {floor_us:.0f} us" if floor_us else ""), None)
        rep.row(preset_name, "decode kernels", f"{per_step:.0f} {unit}/step ({profiled}); "
                + ", ".join(f"{name} x{n:.0f} {us:.0f}us" for name, n, us in top[:4]), None)
    return {"step_us": step_us, "loop_us_per_token": loop_us,
            "host_us_per_token": None if loop_us is None else loop_us - step_us, "bytes_floor_us": floor_us,
            "timed": what, "profiled": profiled, "kernels_per_step": per_step,
            "top_kernels": [{"name": n, "calls_per_step": c, "us_per_step": u} for n, c, u in top]}


def random_vision(preset, cfg, device: str):
    """(tensors, config) of a random SigLIP tower (the layers used) + projector at the preset's widths, in the
    torch-weights layout (std 0.5 / sqrt(fan-in): activations stay O(1) through the layers)."""
    import torch

    from vila_edge.builder.torch_weights import vision_config
    from vila_edge.reference.projector import Projector

    v = preset.vision
    h, inter, patch = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    grid = cfg.vision.image_size // patch

    def rand(*shape):
        return torch.randn(*shape, device=device) * (0.5 / shape[-1] ** 0.5)

    out = {"tower.embeddings.patch_embedding.weight": rand(h, 3, patch, patch).reshape(h, 3, patch, patch),
           "tower.embeddings.patch_embedding.bias": torch.zeros(h, device=device),
           "tower.embeddings.position_embedding.weight": torch.randn(grid * grid, h, device=device) * 0.02}
    for i in range(cfg.vision.layers_used):
        p = f"tower.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            out[p + ln + ".weight"], out[p + ln + ".bias"] = torch.ones(h, device=device), torch.zeros(h, device=device)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[p + f"self_attn.{name}.weight"], out[p + f"self_attn.{name}.bias"] = rand(h, h), torch.zeros(h, device=device)
        out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = rand(inter, h), torch.zeros(inter, device=device)
        out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = rand(h, inter), torch.zeros(h, device=device)
    for k, t in Projector(cfg.projector).state_dict().items():
        out["projector." + k] = t.to(device)
    return out, vision_config(v, cfg)


# ---- 4. fp8: the torch backend's FP8 linears -----------------------------------------------------------------------


def _greedy_logits(engine, emb: np.ndarray, steps: int) -> tuple[np.ndarray, list[int]]:
    engine.reset()
    first = engine.forward(emb)
    tokens = [int(np.argmax(first))]
    for _ in range(steps - 1):
        tokens.append(int(np.argmax(engine.forward(engine.embed([tokens[-1]])))))
    return first, tokens


def fp8_from_int4(tensors: dict, config: dict, fmt: str = "e4m3") -> tuple[dict, dict]:
    """`random_llm`'s int4 linears dequantized and re-quantized to FP8 (128x128 blocks, `torch_fp8.quantize_weight`,
    kernels_ref's numbers) in the torch-weights "fp8" layout; everything else shared."""
    from vila_edge.backends.torch_fp8 import quantize_weight
    from vila_edge.backends.torch_llm import unpack_int4_rows

    out, linears = dict(tensors), {}
    for name, meta in config["linears"].items():
        sz = out.pop(f"{name}.scales_and_zeros")  # [K/G, N, 2]
        codes = unpack_int4_rows(out.pop(f"{name}.int4")).float()
        n, k = codes.shape
        g = int(meta["group_size"])
        w = ((codes.view(n, k // g, g) - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]).view(n, k)
        out[f"{name}.fp8"], out[f"{name}.fp8_scales"] = quantize_weight(w, fmt)
        linears[name] = {"kind": "fp8", "in": k, "out": n, "format": fmt, "activations": "dynamic"}
    return out, {**config, "linears": linears}


def fp8_section(rep: Report, device: str, work: Path, preset_name: str, dry: bool, new_tokens: int, runs: int
                ) -> dict:
    out: dict = {"fixtures": [], "preset": None}
    if device == "cuda":
        out["fixtures"] = _fp8_fixture_parity(rep, work)
    else:
        rep.row("fp8", "parity vs the CPU path", "SKIP: no CUDA device (dry run); the CPU path is checked against "
                "ONNX Runtime's FP8 graphs by tests/test_fp8_torch.py", None)
    out["preset"] = _fp8_speed(rep, device, preset_name, dry, new_tokens, runs)
    return out


def _fp8_fixture_parity(rep: Report, work: Path) -> list[dict]:
    """The real build (--llm-precision fp8 --projector-precision fp8 --torch-weights) of the nvila-lite fixture:
    LLM (fp32 and fp16 model) and FP8 projector on the GPU against the same files on the CPU."""
    import torch

    from vila_edge.backends.torch_llm import TorchLLMEngine
    from vila_edge.backends.torch_vision import TorchVisionEngine
    from vila_edge.builder.build import BuildOptions, build
    from vila_edge.testing import make_tiny_checkpoint

    ckpt_dir = make_tiny_checkpoint("nvila-lite", work / "ckpt-fp8", seed=0, overwrite=True)
    results = []
    for fmt in ("e4m3", "e5m2"):
        opts = BuildOptions(llm_quant="rtn", llm_precision="fp8", projector_precision="fp8", fp8_format=fmt,
                            torch_weights=True)
        engine_dir = build(ckpt_dir, work / f"engine-fp8-{fmt}", progress=False, force=True, options=opts).path
        manifest = json.loads((engine_dir / "manifest.json").read_text())
        references: dict = {}  # the CPU path in the GPU engine's mode (W8A8, or weight-only where _scaled_mm refuses)

        def reference(gemm, emb=None, engine_dir=engine_dir, manifest=manifest, references=references):
            if gemm not in references:
                cpu = TorchLLMEngine(engine_dir / "llm", manifest["llm"], device="cpu", max_context=256, fp8_gemm=gemm)
                references[gemm] = _greedy_logits(cpu, emb, GREEDY)
            return references[gemm]

        emb = np.load(engine_dir / "llm" / "embed_tokens.npy")[5:5 + TEXT_TOKENS].astype(np.float32)
        row = {"format": fmt}
        for dtype, tol in (("float32", FP8_FP32_LOGIT_TOL), ("float16", FP8_FP16_LOGIT_TOL)):
            gpu = TorchLLMEngine(engine_dir / "llm", manifest["llm"], device="cuda", dtype=dtype, max_context=256)
            got, tokens = _greedy_logits(gpu, emb, GREEDY)
            weight_only = any(lin.gemm == "weight-only" for layer in gpu.model.layers for lin in layer.values()
                              if hasattr(lin, "gemm"))
            want, want_tokens = reference("weight-only" if weight_only else None, emb)
            err = _rel_err(got, want)
            agree = next((i for i, (a, b) in enumerate(zip(tokens, want_tokens, strict=True)) if a != b), GREEDY)
            described = gpu.describe()
            rep.row("fp8", f"{fmt} LLM {dtype} vs CPU", f"relative error {err:.2e} (limit {tol:g}), {agree} of "
                    f"{GREEDY} greedy tokens agree; {described['fp8']}; {described['decode']} decode", err <= tol,
                    parity=True)
            if dtype == "float32":  # same arithmetic up to summation order: the greedy tokens must agree too
                rep.row("fp8", f"{fmt} greedy float32", f"{agree} of {GREEDY} tokens agree with the CPU path",
                        agree == GREEDY, parity=True)
            row[dtype] = {"logits_rel_err": err, "greedy_agree": agree, "llm": described}
            del gpu
            torch.cuda.empty_cache()
        vgpu = TorchVisionEngine(engine_dir / "vision", manifest["vision"], device="cuda", dtype="float32")
        weight_only = any(lin.gemm == "weight-only" for lin in vgpu.projector.fp8_linears)
        vcpu = TorchVisionEngine(engine_dir / "vision", manifest["vision"], device="cpu",
                                 fp8_gemm="weight-only" if weight_only else None)
        size = vcpu.config["image_size"]
        feats = vcpu.encode(np.random.default_rng(0).uniform(-1, 1, (2, 3, size, size)).astype(np.float32))
        perr = _rel_err(vgpu.project(feats), vcpu.project(feats))
        rep.row("fp8", f"{fmt} projector fp32 vs CPU", f"relative error {perr:.2e} (limit {FP8_FP32_LOGIT_TOL:g}); "
                f"{vgpu.describe().get('projector')}", perr <= FP8_FP32_LOGIT_TOL, parity=True)
        row["projector_rel_err"] = perr
        results.append(row)
    return results


def _fp8_speed(rep: Report, device: str, preset_name: str, dry: bool, new_tokens: int, runs: int) -> dict:
    """Decode tok/s of FP8 e4m3 against int4 on the same random weights at the preset's real sizes (toy sizes in a
    dry run), and the FP8 engine's first logits against the CPU path (CUDA only: 16 prompt positions)."""
    import torch

    from vila_edge.backends.torch_llm import TorchLLMEngine
    from vila_edge.presets import get_preset

    preset = get_preset(preset_name)
    if dry:
        preset = _shrunk(preset)
    sync = _sync(device)
    dtype = "float16" if device == "cuda" else None
    tensors, config, table, hf_state = random_llm(preset.llm, device)
    del hf_state
    fp8_tensors, fp8_config = fp8_from_int4(tensors, config)
    positions = 16 * TEXT_TOKENS
    prompt = np.asarray(table[np.random.default_rng(0).integers(0, table.shape[0], positions)], np.float32)
    max_context = positions + new_tokens + 16
    out = {"preset": preset_name, "dry_run_geometry": dry, "positions": positions, "new_tokens": new_tokens}
    for label, (t, c) in (("int4", (tensors, config)), ("fp8", (fp8_tensors, fp8_config))):
        eng = TorchLLMEngine.from_tensors(t, c, table, max_context=max_context, device=device, dtype=dtype)

        def decode(eng=eng) -> float:
            eng.reset()
            logits = eng.forward(prompt)
            sync()
            t0 = time.perf_counter()
            for _ in range(new_tokens):
                logits = eng.forward(eng.embed([int(np.argmax(logits))]))
            return time.perf_counter() - t0

        decode()  # warm-up
        out[label] = {"decode_tok_s": new_tokens / statistics.median(decode() for _ in range(runs)),
                      "weight_bytes": sum(x.numel() * x.element_size() for x in eng.model.tensors(decode_only=True)),
                      "llm": eng.describe()}
        if label == "fp8" and device == "cuda":
            eng.reset()
            got = eng.forward(prompt[:16])
            cpu_tensors = {k: v.cpu() for k, v in t.items()}
            weight_only = any(lin.gemm == "weight-only" for layer in eng.model.layers for lin in layer.values()
                              if hasattr(lin, "gemm"))
            cpu = TorchLLMEngine.from_tensors(cpu_tensors, c, table, max_context=64, device="cpu",
                                              fp8_gemm="weight-only" if weight_only else None)
            err = _rel_err(got, cpu.forward(prompt[:16]))
            out["fp8"]["logits_rel_err_vs_cpu"] = err
            rep.row("fp8", f"{preset_name} fp8 logits vs CPU", f"relative error {err:.2e} (fp16 model on the GPU, fp32 "
                    f"on the CPU, 16 positions; reported: the fixture rows hold the parity)", None)
            del cpu, cpu_tensors
        del eng
        if device == "cuda":
            torch.cuda.empty_cache()
    ratio = out["fp8"]["decode_tok_s"] / out["int4"]["decode_tok_s"]
    out["fp8_vs_int4_decode"] = ratio
    rep.row("fp8", f"{preset_name} decode", f"fp8 e4m3 {out['fp8']['decode_tok_s']:.1f} tok/s vs int4 "
            f"{out['int4']['decode_tok_s']:.1f} tok/s = {ratio:.2f}x; weights "
            f"{out['fp8']['weight_bytes'] / 1e6:.1f} vs {out['int4']['weight_bytes'] / 1e6:.1f} MB/step; "
            f"{out['fp8']['llm']['fp8']}"
            + (" (dry run: CPU, toy size)" if dry else ""), None)
    return out


# ---- main ---------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy geometry, no kernel section: checks the script")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_<card>.json; dry run: "
                    "a temp dir)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-fp8", action="store_true", help="leave out section 4 (the torch backend's FP8 linears)")
    ap.add_argument("--work-dir", default=None, help="scratch space for the fixture builds (default: a temp dir)")
    args = ap.parse_args(argv)
    t_start = time.time()

    import torch

    if args.dry_run:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("no CUDA GPU visible to PyTorch; run with --dry-run on a CPU", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu-{platform.machine()}"
    env = {"card": card, "device": device, "dry_run": args.dry_run, "torch": torch.__version__,
           "cuda_runtime": torch.version.cuda, "python": platform.python_version()}
    if device == "cuda":
        cc = torch.cuda.get_device_capability(0)
        env["sm"] = f"{cc[0]}{cc[1]}"
    log(f"vila-edge GPU check on {card} ({device}{', dry run' if args.dry_run else ''}); torch {torch.__version__}")
    rep = Report()
    from gpu_kernels import card_slug

    results_dir = ROOT / "benchmarks" / "results"
    with tempfile.TemporaryDirectory(prefix="vila-edge-gpu-check-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        out_path = Path(args.out) if args.out else (Path(tmp) / "gpu_dryrun.json" if args.dry_run
                                                    else results_dir / f"gpu_{card_slug(card)}.json")
        rep.run("fixtures", fixtures, device, work, [f for f in args.families.split(",") if f])
        if device == "cuda" and not args.skip_kernels:
            rep.run("kernels", kernels, results_dir, 240)
        bw = _roofline_bandwidth(device)
        env["bandwidth"] = bw
        new_tokens, runs = (8, 1) if args.dry_run else (NEW_TOKENS, 3)
        presets = [p for p in args.presets.split(",") if p]
        for name in presets:
            rep.run(name, geometry, device, name, args.dry_run, new_tokens, runs, bw)
        if not args.skip_fp8:
            rep.run("fp8", fp8_section, device, work, presets[0] if presets else PRESETS[0], args.dry_run, new_tokens,
                    runs)
        geo = [s["results"] for n, s in rep.sections.items() if n in PRESETS and s.get("ok")]
        planner = {g["preset"]: {k: g.get(k) for k in ("roofline_share_datasheet", "roofline_share_measured",
                                                       "vision_efficiency")} for g in geo}
        env["total_seconds"] = round(time.time() - t_start, 1)
        result = {"env": env, "sections": rep.sections, "planner": planner,
                  "table": [dict(zip(("section", "case", "result", "verdict"), r, strict=True)) for r in rep.rows]}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    n_fail = sum(r[3] == "FAIL" for r in rep.rows)
    print("\n" + "=" * 110)
    print(f"vila-edge GPU check on {card}, {env['total_seconds']} s; JSON: {out_path}")
    w = [max(len(r[i]) for r in rep.rows + [("section", "case", "result", "verdict")]) for i in range(2)]
    for sec, case, res, verdict in rep.rows:
        print(f"{sec:<{w[0]}}  {case:<{w[1]}}  {verdict:<7}  {res}")
    print(f"{n_fail} FAIL ({rep.parity_failures} parity)", flush=True)
    return 1 if rep.parity_failures or any(not s.get("ok") for s in rep.sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
