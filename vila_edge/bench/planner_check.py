"""The planner next to a benchmark: its prediction for each measured case (the case's tiles and prompt positions,
the vision tower and LM head that really ran, this machine's probes), live (`vila-edge bench`) or replayed from a
saved result document (`replay`, `python benchmarks/plan_vs_bench.py`): no engine is loaded, only the JSON."""

from __future__ import annotations

import statistics

from vila_edge.plan import (
    MIN_TEXT_TOKENS,
    PRECISION_BITS,
    DeviceProfile,
    host_profile,
    plan,
    predict,
    vision_flops_split,
)


def host_from_probes(probes: dict, memory_gib: float | None = None) -> DeviceProfile | None:
    """The host profile of a run: median read-bandwidth probe, the fp32 MatMul probe; None without probes."""
    bws = [p["read_gbs"] for p in probes.get("bandwidth", [])]
    if not bws or not probes.get("matmul"):
        return None
    return host_profile(statistics.median(bws), probes["matmul"]["fp32_tflops"], memory_gib=memory_gib)


def vision_precision_of(describe: dict) -> str:
    """The tower graph a pipeline loaded ("tower.int8.onnx" -> "int8"); fp32 when it does not say."""
    tower = (describe or {}).get("vision", {}).get("tower")
    parts = str(tower or "").split(".")
    return parts[-2] if len(parts) >= 3 and parts[-2] in ("fp32", "fp16", "int8", "fp8") else "fp32"


def lm_head_bits_of(llm_info: dict) -> float | None:
    """Bits per weight of the LM head a build recorded (manifest llm.lm_head.quant); None when not recorded."""
    quant = str(((llm_info or {}).get("lm_head") or {}).get("quant", ""))
    for prec in ("int8", "int4"):
        if prec in quant:
            return PRECISION_BITS[prec]
    return 16.0 if quant in ("float", "fp16") else None


def case_prediction(cfg, host: DeviceProfile, s: dict, *, precision: str, vision_precision: str = "fp32",
                    lm_head_bits: float | None = None, measured_weight_bytes: int | None = None,
                    device: str | None = None) -> dict:
    """One result entry (`summarize`) next to the planner: decode tok/s at the run's mean context, vision ms per
    tile (tower only, as measured) and, for pipelines, TTFT by stage. `ratio` = measured / predicted."""

    def pair(p, m):
        return {"predicted": p, "measured": m, "ratio": m / p if p else None}

    ctx = statistics.median([r["mean_context"] for r in s["runs"]])
    p = plan(cfg, host, max_context=max(int(ctx) + 1, 64), max_tiles=s.get("tiles") or None, llm_precision=precision,
             vision_precision=vision_precision, lm_head_bits=lm_head_bits, suggest=False)
    w = p.detail["llm_decode_read_per_token"]
    pred_dec = host.decode_efficiency * host.bandwidth_gbs * 1e9 / (w + p.detail["kv_bytes_per_position"] * ctx)
    row = {"name": s["name"], "image": s["image"], "prompt_tokens": s["prompt_tokens"],
           "host_bandwidth_gbs": host.bandwidth_gbs, "host_fp32_tflops": host.fp32_tflops,
           "decode_efficiency": host.decode_efficiency, "vision_efficiency": host.vision_efficiency,
           "vision_precision": vision_precision, "tower_int8_speedup": p.efficiency["tower_int8_speedup"],
           "prefill_int8_speedup": p.efficiency["prefill_int8_speedup"],
           "planner_weight_bytes": w, "measured_weight_bytes": measured_weight_bytes,
           "decode_tok_s": pair(pred_dec, s["decode_tok_s"]["median"])}
    if s.get("vision_ms_per_tile"):
        row["vision_ms_per_tile"] = pair(p.predicted["tower_ms_per_tile"], s["vision_ms_per_tile"]["median"])
    if s.get("ttft_split_ms"):
        row.update(ttft_prediction(cfg, host, precision, s, vision_precision=vision_precision,
                                   lm_head_bits=lm_head_bits))
    if device:
        q = plan(cfg, device, llm_precision=precision if precision != "fp32" else "fp16", suggest=False)
        row["device"] = {"name": q.device.name, "fits": q.fits, "memory_total_bytes": q.memory["total"],
                         "usable_bytes": q.memory["usable"], "decode_tok_s_ctx1k": q.predicted["decode_tok_s_ctx1k"],
                         "vision_ms_per_tile": q.predicted["vision_ms_per_tile"]}
    return row


def ttft_prediction(cfg, host: DeviceProfile, precision: str, s: dict, *, vision_precision: str = "fp32",
                    lm_head_bits: float | None = None) -> dict:
    """The planner's TTFT for the measured case (its tiles and prompt positions) next to the measurement, by stage:
    vision (the tower), projector (merge + projector graph) and prefill; the measured total also holds the
    preprocess (resize and tiling: under 0.3% of TTFT at real size), which the planner does not model."""
    positions = int(statistics.median([r["prompt_positions"] for r in s["runs"]]))
    tiles = int(s.get("tiles") or 0)
    pred, _ = predict(cfg, host, precision, tiles, max(0, positions - MIN_TEXT_TOKENS), max(positions + 1, 64),
                      lm_head_bits, vision_precision)
    measured = s["ttft_split_ms"]
    total = statistics.median([1e3 * r["ttft_s"] for r in s["runs"]])

    def pair(p, m):
        return {"predicted": p, "measured": m, "ratio": m / p if p else None}

    return {"ttft_ms": pair(pred["ttft_ms_largest_image"], total),
            "ttft_vision_ms": pair(pred["tower_ms_per_tile"] * tiles, measured["vision"]),
            "ttft_projector_ms": pair(pred["projector_ms_per_tile"] * tiles, measured["merge_projector"]),
            "ttft_prefill_ms": pair(pred["prefill_ms_largest_image"], measured["prefill"]),
            "prompt_positions": positions}


def replay(doc: dict) -> list[dict]:
    """The current planner's predictions for a saved bench document (vila-edge-bench/1): the host from the
    document's probes, each engine's config and LM head from its recorded manifest, the tower that ran from
    each result's `describe`. Entries without a recorded config (peers) are skipped."""
    from vila_edge.config import config_from_json

    host = host_from_probes(doc.get("probes", {}), memory_gib=doc.get("machine", {}).get("memory_gib"))
    if host is None:
        return []
    engines = {e["name"]: e for e in doc.get("engines", [])}
    out = []
    for s in doc.get("results", []):
        e = engines.get(s["name"], {})
        manifest = e.get("manifest") or {}
        if not manifest.get("config"):
            continue
        cfg = config_from_json(manifest["config"])
        precision = s.get("precision") if s.get("precision") in ("int4", "int8", "fp16", "fp32", "bf16") else "int4"
        vp = vision_precision_of(s.get("describe", {})) if s.get("kind") == "pipeline" else "fp32"
        out.append(case_prediction(cfg, host, s, precision=precision, vision_precision=vp,
                                   lm_head_bits=lm_head_bits_of(manifest.get("llm", {})),
                                   measured_weight_bytes=e.get("weight_bytes")))
    return out


def int8_speedup_from_vision_cpu(doc: dict) -> dict[int, float]:
    """The int8-vs-fp32 speed of the weight MatMuls, per tile size, from benchmarks/results/vision_cpu.json:
    the measured per-tile fp32 / int8 ratio with the FLOPs that stay fp32 in the int8 graph (attention, patch
    convolution, by the planner's split of a SigLIP tile of that size) taken out. The source of
    vila_edge.plan.CPU_INT8_MATMUL_SPEEDUP."""
    import dataclasses

    from vila_edge.errors import VilaEdgeError
    from vila_edge.presets import preset_config

    siglip = preset_config("nvila-lite-2b")  # SigLIP-so400m, the tower vision_cpu.json measured
    out = {}
    for r in doc["results"]:
        cfg = dataclasses.replace(siglip, vision=dataclasses.replace(siglip.vision, image_size=r["image_size"]))
        split = vision_flops_split(cfg)
        tower = split["weights"] + split["attention"] + split["other"]
        if abs(tower / 1e9 - r["gflop_per_tile"]) > 0.01 * r["gflop_per_tile"]:
            raise VilaEdgeError(f"vision_cpu result at {r['image_size']} px: {r['gflop_per_tile']} GFLOP/tile recorded, "
                                f"the planner counts {tower / 1e9:.1f}; re-run benchmarks/vision.py")
        fp32_share = (split["attention"] + split["other"]) / tower
        t = r["seconds_per_tile"]
        inv = t["ort_int8"]["median"] / t["ort_fp32"]["median"]  # int8 time as a share of fp32 time
        out[r["image_size"]] = (1 - fp32_share) / (inv - fp32_share)
    return out
