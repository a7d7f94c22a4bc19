"""The planner's TTFT by stage next to saved real-size benchmarks, recomputed now (no engine is built or loaded).

    python benchmarks/plan_vs_bench.py [bench_*.json ...]

Default: the committed real-size runs (issue 19). For each measured case: the host profile rebuilt from the
probes the run recorded, the tower that ran (int8 / fp32) and the build's LM head from its manifest; the table
shows predicted / measured ms per TTFT stage, the ratio predicted/measured, and the prediction the run itself
recorded (the planner of its day). Cases the planner cannot tell apart (same model, tiles and positions) are also
compared with the median of their measurements; exit status 1 when one of those medians (or a lone case) is off
by more than --tolerance.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT = [RESULTS / "bench_nvila-lite-2b_20261206-033804.json", RESULTS / "bench_vila1.5-3b_20261206-005350.json"]


def rows(paths: list[Path]) -> list[dict]:
    from vila_edge.bench.planner_check import replay

    out = []
    for path in paths:
        doc = json.loads(Path(path).read_text())
        recorded = {(p["name"], json.dumps(p["image"])): p for p in doc.get("predictions", [])}
        for now in replay(doc):
            if not now.get("ttft_ms"):
                continue
            old = recorded.get((now["name"], json.dumps(now["image"])), {})
            out.append({"file": Path(path).name, "label": doc["label"], "now": now, "recorded": old})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, default=DEFAULT)
    ap.add_argument("--tolerance", type=float, default=0.25, help="allowed |predicted / measured - 1| of TTFT")
    args = ap.parse_args(argv)
    from vila_edge.plan import CPU_INT8_MATMUL_SPEEDUP

    groups: dict[tuple, list[float]] = {}
    for r in rows(args.files):
        n, o = r["now"], r["recorded"]
        img = f"{n['image']['width']}x{n['image']['height']}"
        print(f"{r['label']} {img}: {n['prompt_positions']} positions, {n['vision_precision']} tower; host "
              f"{n['host_fp32_tflops'] * 1e3:.0f} GFLOPS fp32 probe x {n['vision_efficiency']:g}, int8 MatMuls x "
              f"{CPU_INT8_MATMUL_SPEEDUP:g} (tower x {n['tower_int8_speedup']:g}, prefill x {n['prefill_int8_speedup']:g})")
        print(f"  {'stage':<10}{'predicted ms':>14}{'measured ms':>14}{'pred/meas':>11}{'recorded pred':>15}")
        for key, label in (("ttft_vision_ms", "vision"), ("ttft_projector_ms", "projector"),
                           ("ttft_prefill_ms", "prefill"), ("ttft_ms", "TTFT")):
            v = n[key]
            rec = o.get(key, {}).get("predicted")
            print(f"  {label:<10}{v['predicted']:>14.0f}{v['measured']:>14.0f}{v['predicted'] / v['measured']:>11.2f}"
                  f"{(f'{rec:.0f}' if rec is not None else '-'):>15}")
        d = n["decode_tok_s"]
        print(f"  decode tok/s predicted {d['predicted']:.1f}, measured {d['measured']:.1f} "
              f"(recorded prediction {o.get('decode_tok_s', {}).get('predicted', float('nan')):.1f})")
        key = (r["label"], n["prompt_positions"], n["ttft_ms"]["predicted"])
        groups.setdefault(key, []).append(n["ttft_ms"]["measured"])
    worst = 0.0
    print("TTFT predicted vs the median of the measurements of the same planner inputs:")
    for (label, positions, predicted), measured in groups.items():
        med = statistics.median(measured)
        worst = max(worst, abs(predicted / med - 1))
        print(f"  {label}, {positions} positions: predicted {predicted:.0f} ms, measured "
              f"{', '.join(f'{m:.0f}' for m in measured)} ms (median {med:.0f}): {100 * (predicted / med - 1):+.0f}%")
    print(f"largest error: {100 * worst:.0f}% (tolerance {100 * args.tolerance:.0f}%)")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    raise SystemExit(main())
