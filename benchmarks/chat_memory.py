"""Peak memory of a chat process vs what it must hold (issue 19, P6): one image question, fresh process.

    python benchmarks/chat_memory.py ENGINE_DIR [--image-size 1920x1080] [--new-tokens 32] [--rounds 1]

Each variant runs in its own child process (VmHWM is that process's alone), interleaved per round:
- `before`: the runtime as it was: vision session loaded first, every tile in one tower run, CPU arena on,
  the prompt prefilled in one run;
- `whole-prefill`: the LLM loaded first, CPU_TILE_BATCH tiles per run, no vision arena;
- `default-heap`: and the prompt prefilled in runs of ort_llm.PREFILL_CHUNK positions;
- `after`: `vila_edge.load` as it is now: and blocks of 1 MiB and more served from mmap (vila_edge.heap).
The first three build the pipeline by hand, with glibc's default heap policy.
Reported per variant: peak RSS, RSS after load, the resident floor (LLM decoder files + allocated KV cache
+ the vision graphs loaded), their ratio (goal <= 1.3), vision / prefill seconds and decode tok/s (speed
must not drop). Writes benchmarks/results/chat_memory_<preset or engine>.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from vila_edge.bench.child import _peak_rss, _rss, child_entry, run_child, synthetic_image
from vila_edge.bench.probes import machine_info, versions
from vila_edge.bench.run import llm_decode_bytes

MIB = 1 << 20
VARIANTS = ("before", "whole-prefill", "default-heap", "after")


def _vision_bytes(vision) -> int:
    total = 0
    for runner in (vision.tower, vision.projector):
        for f in (runner.path, runner.path.with_name(runner.path.name + ".data")):
            if f.is_file():
                total += f.stat().st_size
    return total


def child(spec: dict) -> dict:
    import vila_edge
    from vila_edge.backends.ort_vision import OrtVisionEngine
    from vila_edge.bench.child import prompt_of_tokens

    t0 = time.perf_counter()
    if spec["variant"] == "after":
        pipe = vila_edge.load(spec["engine"], device="cpu", threads=spec["threads"])
    else:  # earlier runtimes, same engines, built by hand: vila_edge.load would set the heap policy
        from vila_edge.backends import make_llm_engine, make_vision_engine
        from vila_edge.engine_dir import read_manifest
        from vila_edge.runtime import Pipeline
        from vila_edge.tokenizer import Tokenizer

        eng = Path(spec["engine"])
        manifest = read_manifest(eng)

        def llm_engine():
            return make_llm_engine("onnxruntime", eng, manifest, device="cpu", threads=spec["threads"],
                                   max_context=manifest.config.llm.max_length)

        if spec["variant"] == "before":  # the vision session first, every tile in one run, CPU arena on
            vision = OrtVisionEngine(eng / "vision", manifest.vision, device="cpu", threads=spec["threads"],
                                     tile_batch=0, arena=True)
            llm = llm_engine()
        else:
            llm = llm_engine()
            vision = make_vision_engine("onnxruntime", eng, manifest, device="cpu", threads=spec["threads"])
        if spec["variant"] in ("before", "whole-prefill"):
            llm.prefill_chunk = 0
        pipe = Pipeline(manifest.config, Tokenizer.from_dir(eng / "tokenizer"), vision, llm, engine_dir=eng,
                        manifest=manifest)
    load_s = time.perf_counter() - t0
    after_load = _rss()
    w, h = spec["image_size"]
    prompt = prompt_of_tokens(pipe.tokenizer, 32)
    res = pipe.generate(prompt, images=[synthetic_image(w, h)], max_new_tokens=spec["new_tokens"], ignore_eos=True)
    t = res.timings
    floor = {"llm_decoder_bytes": llm_decode_bytes(Path(spec["engine"])), "kv_cache_bytes": pipe.llm.kv_bytes(),
             "vision_bytes": _vision_bytes(pipe.vision)}
    out = {"variant": spec["variant"], "load_s": load_s, "rss_after_load_bytes": after_load,
           "peak_rss_bytes": _peak_rss(), "floor": floor, "tiles": t.tiles, "prompt_positions": t.prompt_positions,
           "vision_s": t.vision, "prefill_s": t.prefill, "ttft_s": t.ttft, "decode_tok_s": t.decode_tokens_per_s,
           "tower": pipe.vision.tower.path.name, "tile_batch": pipe.vision.max_batch,
           "kv_dtype": pipe.llm.describe().get("kv_dtype"), "prefill_chunk": pipe.llm.prefill_chunk}
    pipe.close()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine", type=Path)
    ap.add_argument("--label", default=None, help="name in the result files (default: the engine folder's)")
    ap.add_argument("--image-size", default="1920x1080")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args(argv)
    w, h = (int(v) for v in a.image_size.lower().split("x"))
    label = a.label or a.engine.name
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    loads = []
    for r in range(a.rounds):
        for v in VARIANTS:
            spec = {"engine": str(a.engine), "variant": v, "image_size": [w, h], "new_tokens": a.new_tokens,
                    "threads": a.threads}
            loads.append(os.getloadavg()[0])
            res = run_child([sys.executable, __file__, "--child"], spec)
            fl = res["floor"]
            res["peak_over_floor"] = res["peak_rss_bytes"] / sum(fl.values())
            runs[v].append(res)
            print(f"round {r + 1} {v}: peak {res['peak_rss_bytes'] / MIB:.0f} MiB = {res['peak_over_floor']:.2f}x "
                  f"(LLM {fl['llm_decoder_bytes'] / MIB:.0f} + KV {fl['kv_cache_bytes'] / MIB:.0f} + vision "
                  f"{fl['vision_bytes'] / MIB:.0f} MiB), {res['tiles']} tiles, vision {res['vision_s']:.1f} s, "
                  f"prefill {res['prefill_s']:.1f} s, decode {res['decode_tok_s']:.2f} tok/s", flush=True)
    summary = {v: {"peak_over_floor": statistics.median(x["peak_over_floor"] for x in rs),
                   "peak_rss_mib": statistics.median(x["peak_rss_bytes"] for x in rs) / MIB,
                   "decode_tok_s": statistics.median(x["decode_tok_s"] for x in rs),
                   "prefill_s": statistics.median(x["prefill_s"] for x in rs)} for v, rs in runs.items()}
    doc = {"what": "peak RSS of one chat process (load, one image question, answer) over the resident floor: "
                   "LLM decoder files + allocated KV cache + vision graphs loaded (issue 19, P6: goal <= 1.3x)",
           "method": __doc__.split("\n\n", 2)[2].strip(), "engine": label, "image_size": [w, h],
           "new_tokens": a.new_tokens, "threads": a.threads, "load_average_1min": loads, "machine": machine_info(),
           "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "summary": summary, "runs": runs}
    a.out.mkdir(parents=True, exist_ok=True)
    jp = a.out / f"chat_memory_{label}.json"
    jp.write_text(json.dumps(doc, indent=1) + "\n")
    rows = [f"| {label} | {v} | {s['peak_rss_mib']:.0f} | {s['peak_over_floor']:.2f}x | {s['decode_tok_s']:.2f} |"
            for v, s in summary.items()]
    print("\n".join(rows))
    print(f"wrote {jp}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        child_entry(child)
    else:
        main()
