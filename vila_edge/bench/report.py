"""The result document (JSON, benchmarks/schema/bench.schema.json), its summary statistics, roofline
shares, ratios against peers and the planner's predictions, the rich table and the PNG chart."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from vila_edge.bench.probes import MIB, machine_info, stats, versions
from vila_edge.bench.run import BenchOptions, Contender

SCHEMA_ID = "vila-edge-bench/1"


def summarize(contenders: list[Contender], raw: dict, opts: BenchOptions) -> list[dict]:
    """One entry per contender x case: medians, min/max, roofline shares, predictions."""
    out = []
    for c in contenders:
        rounds = raw["results"][c.name]
        if not rounds:
            continue
        n_cases = len(rounds[0]["cases"])
        for k in range(n_cases):
            runs, shares, share_copy = [], [], []
            for rd in rounds:
                case = rd["cases"][k]
                bw = rd["bandwidth_after"]
                # the KV dtype the engine really allocated (ORT on CPU keeps fp32 KV) when it says so
                kvp = rd.get("kv_bytes_per_position") or c.kv_bytes_per_position
                for run in case["runs"]:
                    ctx = run["prompt_positions"] + run["generated_tokens"] / 2
                    per_tok = c.weight_bytes + kvp * ctx
                    roof = bw["read_gbs"] * 1e9 / per_tok if per_tok else 0.0
                    roof_copy = bw["copy_gbs"] * 1e9 / per_tok if per_tok else 0.0
                    run = dict(run, roofline_tok_s=roof, bandwidth_read_gbs=bw["read_gbs"],
                               bandwidth_copy_gbs=bw["copy_gbs"], mean_context=ctx, bytes_per_token=per_tok)
                    runs.append(run)
                    if roof:
                        shares.append(100 * run["decode_tok_s"] / roof)
                        share_copy.append(100 * run["decode_tok_s"] / roof_copy)
            case0 = rounds[0]["cases"][k]
            peak = max(rd["peak_rss_bytes"] for rd in rounds)
            kv_alloc = max(rd.get("kv_cache_bytes", 0) for rd in rounds)
            vision_b = _vision_bytes(Path(c.spec.get("engine", "")), rounds[0].get("describe", {})) \
                if c.kind == "pipeline" else 0
            resident = c.weight_bytes + vision_b + kv_alloc
            entry = {
                "name": c.name,
                "kind": c.kind,
                "engine": c.spec.get("engine") or c.spec.get("model", ""),
                "precision": c.precision,
                "image": case0["image"],
                "prompt_tokens": case0["prompt_tokens"],
                "new_tokens": opts.new_tokens,
                "threads": rounds[0].get("threads", raw["threads"]),
                "runs": runs,
                "decode_tok_s": stats([r["decode_tok_s"] for r in runs]),
                "prefill_s": stats([r["prefill_s"] for r in runs]),
                "ttft_ms": stats([1e3 * r["ttft_s"] for r in runs]),
                "roofline_share_pct": stats(shares),
                "roofline_share_copy_pct": stats(share_copy),
                "memory": {
                    "peak_rss_bytes": peak,
                    "rss_after_load_bytes": max(rd["rss_after_load_bytes"] for rd in rounds),
                    "weight_bytes": c.weight_bytes,
                    "vision_weight_bytes": vision_b,
                    "kv_cache_bytes": kv_alloc,
                    "peak_over_weights_plus_kv": peak / resident if resident else None,
                },
                "load_s": stats([rd["load_s"] for rd in rounds]),
                "describe": rounds[0].get("describe", {}),
            }
            if c.kind == "pipeline":
                tiles = [r["tiles"] for r in runs]
                entry["tiles"] = max(tiles) if tiles else 0
                entry["vision_ms_per_tile"] = stats([1e3 * r["vision_s"] / max(1, r["tiles"]) for r in runs])
                entry["ttft_split_ms"] = {
                    stage: statistics.median([1e3 * r[f"{stage}_s"] for r in runs])
                    for stage in ("preprocess", "vision", "merge_projector", "prefill")
                }
            out.append(entry)
    return out


def _vision_bytes(engine_dir: Path, describe: dict) -> int:
    """Bytes of the vision graphs the pipeline loaded (tower + projector, external data included)."""
    v = describe.get("vision", {}) if isinstance(describe, dict) else {}
    total = 0
    for key in ("tower", "projector"):
        name = v.get(key)
        if not isinstance(name, str):
            continue
        for f in (engine_dir / "vision" / name, engine_dir / "vision" / (name + ".data")):
            if f.is_file():
                total += f.stat().st_size
    return total


def predictions(contenders: list[Contender], summary: list[dict], raw: dict, opts: BenchOptions) -> list[dict]:
    """The planner's prediction for this machine (measured bandwidth + matmul rate) next to the measurement,
    for the vision tower and LM head that really ran (vila_edge.bench.planner_check)."""
    from vila_edge.bench.planner_check import case_prediction, host_from_probes, lm_head_bits_of, vision_precision_of

    host = host_from_probes({"bandwidth": [p for ps in raw["probes"].values() for p in ps], "matmul": raw["matmul"]})
    if host is None:
        return []
    out = []
    by_name = {c.name: c for c in contenders}
    for s in summary:
        c = by_name.get(s["name"])
        if c is None or c.config is None:
            continue
        prec = c.precision if c.precision in ("int4", "int8", "fp16", "fp32", "bf16") else "int4"
        vp = vision_precision_of(s.get("describe", {})) if c.kind == "pipeline" else "fp32"
        out.append(case_prediction(c.config, host, s, precision=prec, vision_precision=vp,
                                   lm_head_bits=lm_head_bits_of(c.manifest.get("llm", {})),
                                   measured_weight_bytes=c.weight_bytes, device=opts.device))
    return out


def make_document(contenders: list[Contender], raw: dict, opts: BenchOptions, *, label: str,
                  peers_ratio: dict | None = None, notes: Sequence[str] = ()) -> dict:
    summary = summarize(contenders, raw, opts)
    doc = {
        "schema": SCHEMA_ID,
        "label": label,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "versions": versions(),
        "options": {**asdict(opts), "image_sizes": [list(s) for s in opts.image_sizes]},
        "engines": [{"name": c.name, "kind": c.kind, "path": c.spec.get("engine") or c.spec.get("model", ""),
                     "precision": c.precision, "manifest": c.manifest, "weight_bytes": c.weight_bytes,
                     "kv_bytes_per_position": c.kv_bytes_per_position} for c in contenders],
        "probes": {"bandwidth": [p for ps in raw["probes"].values() for p in ps], "matmul": raw["matmul"]},
        "results": summary,
        "predictions": predictions(contenders, summary, raw, opts),
        "ratios": peers_ratio or ratios(summary),
        "notes": list(notes),
    }
    return _scrub(json.loads(json.dumps(doc, default=_jsonable)))


def portable_path(p) -> str:
    """A path fit for a committed result: relative to the working directory when inside it, else
    `<work>/<name>` (no absolute machine paths in results)."""
    p = Path(str(p))
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return f"<work>/{p.name}"


def _scrub(obj):
    """Replace absolute paths in strings of a result document (engine paths, manifest entries)."""
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("/") and len(obj) > 1 and " " not in obj:
        return portable_path(obj)
    return obj


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    return str(x)


def ratios(summary: list[dict]) -> list[dict]:
    """Decode and prefill speed of our engines relative to each peer (or to the first engine), per case."""
    if len(summary) < 2:
        return []
    peers = [s for s in summary if s["kind"] == "peer"]
    ours = [s for s in summary if s["kind"] != "peer"]
    if peers:
        pairs = [(o, p) for o in ours for p in peers]
    else:
        pairs = [(summary[0], s) for s in summary[1:] if s["name"] != summary[0]["name"]]
    out = []
    for b, s in pairs:
        if json.dumps(b["image"]) != json.dumps(s["image"]) or b["prompt_tokens"] != s["prompt_tokens"]:
            continue
        out.append({"baseline": b["name"], "other": s["name"],
                    "decode_ratio": b["decode_tok_s"]["median"] / s["decode_tok_s"]["median"]
                    if s["decode_tok_s"]["median"] else None,
                    "prefill_ratio": s["prefill_s"]["median"] / b["prefill_s"]["median"]
                    if b["prefill_s"]["median"] else None})
    return out


def print_report(doc: dict, console=None) -> None:
    from rich.table import Table

    con = console or _console()
    m = doc["machine"]
    con.print(f"[bold]{doc['label']}[/bold]  {m['cpu']} ({m['physical_cores']} cores, {m['memory_gib']} GiB), "
              f"threads {doc['options']['threads'] or doc['probes']['matmul']['threads']}, "
              f"onnxruntime {doc['versions'].get('onnxruntime', '?')}")
    t = Table(show_header=True)
    for col in ("engine", "case", "decode tok/s (min..max)", "% roofline", "TTFT ms", "TTFT split ms (pre/vis/proj/prefill)",
                "vision ms/tile", "peak RSS MiB", "weights+KV MiB (LLM+vision+KV)"):
        t.add_column(col, justify="right" if col != "engine" else "left")
    for s in doc["results"]:
        d = s["decode_tok_s"]
        case = (f"{s['image']['width']}x{s['image']['height']}, " if s["image"] else "") + f"{s['prompt_tokens']} tok"
        split = s.get("ttft_split_ms")
        split_s = "/".join(f"{split[k]:.0f}" for k in ("preprocess", "vision", "merge_projector", "prefill")) if split else "-"
        vis = s.get("vision_ms_per_tile")
        mem = s["memory"]
        t.add_row(s["name"], case, f"{d['median']:.2f} ({d['min']:.2f}..{d['max']:.2f})",
                  f"{s['roofline_share_pct']['median']:.0f}%" if s["roofline_share_pct"]["median"] else "-",
                  f"{s['ttft_ms']['median']:.0f}", split_s,
                  f"{vis['median']:.0f}" if vis else "-", f"{mem['peak_rss_bytes'] / MIB:.0f}",
                  f"{(mem['weight_bytes'] + mem.get('vision_weight_bytes', 0) + mem['kv_cache_bytes']) / MIB:.0f}")
    con.print(t)
    bws = [p["read_gbs"] for p in doc["probes"]["bandwidth"]]
    if bws:
        con.print(f"bandwidth probes (read GB/s): {', '.join(f'{b:.1f}' for b in bws)}; "
                  f"matmul fp32 {doc['probes']['matmul']['fp32_tflops'] * 1e3:.0f} GFLOPS")
    for r in doc["ratios"]:
        if r.get("decode_ratio"):
            con.print(f"decode {r['baseline']} / {r['other']}: [bold]{r['decode_ratio']:.2f}x[/bold]"
                      + (f", prefill {r['prefill_ratio']:.2f}x" if r.get("prefill_ratio") else ""))
    for p in doc["predictions"]:
        line = (f"planner for this machine ({p['host_bandwidth_gbs']:.1f} GB/s x {p['decode_efficiency']}): "
                f"{p['name']} decode predicted {p['decode_tok_s']['predicted']:.2f}, measured "
                f"{p['decode_tok_s']['measured']:.2f} tok/s")
        if p.get("vision_ms_per_tile"):
            v = p["vision_ms_per_tile"]
            line += f"; vision predicted {v['predicted']:.0f}, measured {v['measured']:.0f} ms/tile"
        if p.get("ttft_ms"):
            tt = p["ttft_ms"]
            line += (f"; TTFT predicted {tt['predicted']:.0f}, measured {tt['measured']:.0f} ms "
                     f"(measured/predicted {tt['ratio']:.2f}; {p.get('vision_precision', 'fp32')} tower)")
        con.print(line)
        if p.get("device"):
            dv = p["device"]
            con.print(f"  on {dv['name']}: {'fits' if dv['fits'] else 'does NOT fit'}, decode ~{dv['decode_tok_s_ctx1k']:.1f} "
                      f"tok/s @1k, vision ~{dv['vision_ms_per_tile']:.0f} ms/tile (predicted)")


def _console(stderr: bool = False):
    from rich.console import Console

    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(stderr=stderr, width=170)


def write_chart(doc: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    labels = [(s["name"] + ("\n" + f"{s['image']['width']}x{s['image']['height']}" if s["image"] else "")
               + f"\n{s['prompt_tokens']} tok") for s in res]
    pipe = [s for s in res if s.get("ttft_split_ms")]
    ncols = 3 if pipe else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4.2))
    x = np.arange(len(res))
    med = [s["decode_tok_s"]["median"] for s in res]
    lo = [s["decode_tok_s"]["median"] - s["decode_tok_s"]["min"] for s in res]
    hi = [s["decode_tok_s"]["max"] - s["decode_tok_s"]["median"] for s in res]
    ax = axes[0]
    ax.bar(x, med, yerr=[lo, hi], capsize=4, color="#4C72B0", label="measured (median, min..max)")
    roof = [statistics.median([r["roofline_tok_s"] for r in s["runs"]]) if s["runs"] else 0 for s in res]
    ax.scatter(x, roof, marker="_", s=600, color="#C44E52", label="bandwidth roofline", zorder=3)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"decode ({doc['options']['new_tokens']} tokens)")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    peak = [s["memory"]["peak_rss_bytes"] / MIB for s in res]
    wkv = [(s["memory"]["weight_bytes"] + s["memory"].get("vision_weight_bytes", 0) + s["memory"]["kv_cache_bytes"]) / MIB
           for s in res]
    ax.bar(x - 0.2, peak, 0.4, label="peak RSS", color="#55A868")
    ax.bar(x + 0.2, wkv, 0.4, label="weights (LLM + vision) + KV", color="#8172B2")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title("memory")
    ax.legend(fontsize=7)
    if pipe:
        ax = axes[2]
        xs = np.arange(len(pipe))
        bottom = np.zeros(len(pipe))
        for stage, color in (("preprocess", "#DD8452"), ("vision", "#4C72B0"), ("merge_projector", "#937860"),
                             ("prefill", "#55A868")):
            vals = np.array([s["ttft_split_ms"][stage] for s in pipe])
            ax.bar(xs, vals, bottom=bottom, label=stage.replace("_", "+"), color=color)
            bottom += vals
        ax.set_xticks(xs, [lb for s, lb in zip(res, labels, strict=True) if s.get("ttft_split_ms")], fontsize=7)
        ax.set_ylabel("ms")
        ax.set_title("time to first token")
        ax.legend(fontsize=7)
    m = doc["machine"]
    fig.suptitle(f"{doc['label']} — {m['cpu']}, {doc['probes']['matmul']['threads']} threads", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(doc: dict, out: Path, stem: str | None = None) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or f"bench_{doc['label']}_{time.strftime('%Y%m%d-%H%M%S')}"
    jp = out / f"{stem}.json"
    jp.write_text(json.dumps(doc, indent=2))
    pp = write_chart(doc, out / f"{stem}.png")
    return jp, pp


def schema_path() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks" / "schema" / "bench.schema.json"


def validate(doc: dict, schema_file: Path | None = None) -> None:
    """Validate against the JSON schema (needs `jsonschema`)."""
    import jsonschema

    schema = json.loads(Path(schema_file or schema_path()).read_text())
    jsonschema.validate(doc, schema)
