"""Live captioner: today's loop vs frame dedup + pipelining, and a 10,000-frame memory soak.

    python benchmarks/live_captioner.py speed --engine engines/vila-edge-demo-smollm2-135m
    python benchmarks/live_captioner.py speed --tiny nvila        # a tiny random NVILA engine: vision ~ LLM
    python benchmarks/live_captioner.py soak --engine engines/vila-edge-demo-smollm2-135m --frames 10000

speed: a generated 30 s video (10 fps, 640x360, sensor noise) of 5 static scenes joined by 1 s of motion. The
captioner is asked about every `--every`-th frame (default 5: 2 frames a second, 60 frames). Contenders, each
on the same frames, interleaved in rounds:
- today:      the loop `chat --interval` ran before (`pipe.chat().ask(prompt, images=[frame])`, one frame after
              the other, every frame encoded);
- pipelined:  Captioner, dedup off, next frame encoded while the answer decodes;
- dedup:      Captioner, dedup on, sequential;
- dedup+pipelined.
Reported per contender: wall seconds, captions (fresh answers), frames covered per second (a frame is covered by
its own caption or, when dedup skipped it, by the caption of the identical-looking frame before it: what a
viewer sees), and whether every caption equals today's caption of the same frame (text and token ids).

soak: `--frames` frames (160x96, written to an MJPG file, read back with OpenCV) through dedup + pipelined
captioning; the scene changes every `--change-every` frames, so real encodes and answers run all along. RSS is
sampled every 100 frames; growth = median of the last 10 samples - median of the first 10 after warm-up.

Results: benchmarks/results/live_captioner.{json,md}, live_soak.{json,md,png}. Timings on a shared machine are
not assertions (tests/test_captioner.py checks the behaviour).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROMPT = "Describe the image."


# ---- generated video ---------------------------------------------------------------------------------------


def draw_scene(k: int, w: int, h: int, shift: float = 0.0) -> np.ndarray:
    """Scene k: a background grey level and a coloured box; `shift` (0..1) slides the box towards scene k+1."""
    import cv2

    x = k + shift
    img = np.full((h, w, 3), int(40 + 35 * (k % 5) + 35 * shift * (1 if k % 5 < 4 else -4)), np.uint8)
    bw, bh = w // 4, h // 3
    x0 = int((0.05 + 0.15 * x) * w) % (w - bw)
    y0 = int((0.2 + 0.1 * (x % 3)) * h)
    colour = [(0, 0, 230), (0, 200, 0), (230, 0, 0), (0, 220, 220), (220, 0, 220)][k % 5]
    cv2.rectangle(img, (x0, y0), (x0 + bw, y0 + bh), colour, -1)
    return img


def write_video(path: Path, *, seconds: float = 30.0, fps: int = 10, size=(640, 360), scenes: int = 5,
                motion_s: float = 1.0, noise: float = 2.0, seed: int = 0) -> Path:
    """Static stretches of `scenes` scenes, each change a `motion_s` second slide; Gaussian sensor noise."""
    import cv2

    w, h = size
    n = int(seconds * fps)
    per = n // scenes
    moving = int(motion_s * fps)
    rng = np.random.default_rng(seed)
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    for i in range(n):
        k, j = divmod(i, per)
        shift = max(0.0, (j - (per - moving)) / moving) if moving and k < scenes - 1 else 0.0
        img = draw_scene(k, w, h, shift).astype(np.float32)
        if noise:
            img += rng.normal(0.0, noise, img.shape).astype(np.float32)
        out.write(np.clip(img, 0, 255).astype(np.uint8))
    out.release()
    return path


def sampled(frames, every: int):
    for f in frames:
        if (f.seq - 1) % every == 0:
            yield f


# ---- contenders --------------------------------------------------------------------------------------------


def run_today(pipe, frames, params) -> dict:
    """The live loop as `chat --interval` ran it before dedup and pipelining (vila_edge.chat.run_live)."""
    from vila_edge.media.image import bgr_to_pil

    t0 = time.perf_counter()
    caps = {}
    vision = llm = 0.0
    n = 0
    for f in frames:
        n += 1
        r = pipe.chat().ask(PROMPT, images=[bgr_to_pil(f.image, f"frame {f.seq}")], params=params)
        caps[f.seq] = (r.text, list(r.token_ids))
        t = r.timings
        vision += t.preprocess + t.vision + t.merge_projector
        llm += t.prefill + t.decode
    return {"wall_s": time.perf_counter() - t0, "frames": n, "captions": caps, "vision_s": vision, "llm_s": llm,
            "encoded": n, "skipped": 0}


def run_captioner(pipe, frames, params, *, threshold: float, pipelined: bool) -> dict:
    from vila_edge.captioner import Captioner
    from vila_edge.media.frame_dedup import FrameDedup

    cap = Captioner(pipe, PROMPT, params=params, dedup=FrameDedup(threshold), pipelined=pipelined)
    t0 = time.perf_counter()
    caps = {}
    for c in cap.captions(frames):
        text = "".join(c.stream)
        caps[c.frame.seq] = (text, list(c.stream.result.token_ids))
    wall = time.perf_counter() - t0
    st = cap.stats()
    return {"wall_s": wall, "frames": st.frames_seen, "captions": caps, "vision_s": st.vision_s, "llm_s": st.llm_s,
            "encoded": st.frames_encoded, "skipped": st.frames_skipped}


CONTENDERS = {
    "today": lambda pipe, fr, p, thr: run_today(pipe, fr, p),
    "pipelined": lambda pipe, fr, p, thr: run_captioner(pipe, fr, p, threshold=0.0, pipelined=True),
    "dedup": lambda pipe, fr, p, thr: run_captioner(pipe, fr, p, threshold=thr, pipelined=False),
    "dedup+pipelined": lambda pipe, fr, p, thr: run_captioner(pipe, fr, p, threshold=thr, pipelined=True),
}


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "loadavg_at_start": load}


def tiny_engine(family: str, work: Path) -> Path:
    from vila_edge.builder.build import build_engine_dir
    from vila_edge.testing import make_tiny_checkpoint

    out = work / f"tiny-{family}-engine"
    if not (out / "manifest.json").exists():
        ck = make_tiny_checkpoint(family, work / f"tiny-{family}", seed=0)
        build_engine_dir(ck, out, precision="fp32", progress=False)
    return out


def speed(args) -> dict:
    import vila_edge
    from vila_edge.generate import SamplingParams
    from vila_edge.media.camera import file_frames

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    engine = Path(args.engine) if args.engine else tiny_engine(args.tiny, work)
    video = write_video(work / "live_30s.avi")
    pipe = vila_edge.load(engine, device="cpu", threads=args.threads, vision_threads=args.vision_threads)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    names = args.contenders or list(CONTENDERS)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    try:
        for _ in range(args.warmup):
            run_today(pipe, sampled(file_frames(video), 150), params)
        for r in range(args.rounds):
            for name in names:
                res = CONTENDERS[name](pipe, sampled(file_frames(video), args.every), params, args.threshold)
                runs[name].append(res)
                print(f"round {r + 1} {name:16s} {res['wall_s']:7.2f} s, {len(res['captions'])} captions, "
                      f"{res['frames'] / res['wall_s']:.2f} frames/s", file=sys.stderr, flush=True)
    finally:
        pipe.close()
    today = runs.get("today", [None])[0]
    out = {"benchmark": "live_captioner", "engine": engine.name, "machine": machine(),
           "video": {"seconds": 30, "fps": 10, "size": [640, 360], "scenes": 5, "motion_s": 1.0, "noise_sigma": 2.0,
                     "every": args.every},
           "settings": {"threshold": args.threshold, "max_new_tokens": args.max_new_tokens, "threads": args.threads,
                        "vision_threads": args.vision_threads, "rounds": args.rounds, "prompt": PROMPT},
           "contenders": {}}
    base = None
    for name, rs in runs.items():
        med = statistics.median(x["wall_s"] for x in rs)
        first = rs[0]
        same = None
        if today is not None:
            same = all(x["captions"][s] == today["captions"][s] for x in rs for s in x["captions"])
        d = {"wall_s_median": round(med, 3), "wall_s": [round(x["wall_s"], 3) for x in rs],
             "frames": first["frames"], "captions": len(first["captions"]), "encoded": first["encoded"],
             "skipped": first["skipped"], "frames_covered_per_s": round(first["frames"] / med, 3),
             "fresh_captions_per_s": round(len(first["captions"]) / med, 3),
             "vision_s": round(statistics.median(x["vision_s"] for x in rs), 3),
             "llm_s": round(statistics.median(x["llm_s"] for x in rs), 3),
             "captioned_frames": sorted(first["captions"]), "same_answers_as_today": same}
        if name == "today":
            base = d
        out["contenders"][name] = d
    if base is not None:
        for d in out["contenders"].values():
            d["speedup_vs_today"] = round(d["frames_covered_per_s"] / base["frames_covered_per_s"], 3)
    return out


# ---- soak --------------------------------------------------------------------------------------------------


def soak(args) -> dict:
    import psutil

    import vila_edge
    from vila_edge.captioner import Captioner
    from vila_edge.generate import SamplingParams
    from vila_edge.media.camera import file_frames
    from vila_edge.media.frame_dedup import FrameDedup

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    engine = Path(args.engine) if args.engine else tiny_engine(args.tiny, work)
    video = work / f"soak_{args.frames}.avi"
    scenes = max(1, args.frames // args.change_every)
    write_video(video, seconds=args.frames / 10, fps=10, size=(160, 96), scenes=scenes, motion_s=0.0, noise=2.0)
    proc = psutil.Process()
    samples: list[tuple[int, int]] = []

    def watched(frames):
        for f in frames:
            if f.seq % 100 == 0:
                samples.append((f.seq, proc.memory_info().rss))
            yield f

    pipe = vila_edge.load(engine, device="cpu", threads=args.threads, vision_threads=args.vision_threads)
    cap = Captioner(pipe, PROMPT, params=SamplingParams(max_new_tokens=args.max_new_tokens),
                    dedup=FrameDedup(args.threshold), pipelined=True)
    t0 = time.perf_counter()
    try:
        n = 0
        for c in cap.captions(watched(file_frames(video))):
            for _ in c.stream:
                pass
            n += 1
    finally:
        pipe.close()
    wall = time.perf_counter() - t0
    st = cap.stats()
    after = [rss for seq, rss in samples if seq > args.warmup_frames]
    growth = statistics.median(after[-10:]) - statistics.median(after[:10])
    return {"benchmark": "live_soak", "engine": engine.name, "machine": machine(),
            "settings": {"frames": args.frames, "change_every": args.change_every, "size": [160, 96],
                         "threshold": args.threshold, "max_new_tokens": args.max_new_tokens,
                         "warmup_frames": args.warmup_frames},
            "stats": st.as_dict(), "captions": n, "wall_s": round(wall, 2),
            "rss_mb": [[seq, round(rss / 2**20, 3)] for seq, rss in samples],
            "rss_growth_after_warmup_mb": round(growth / 2**20, 3),
            "rss_max_minus_min_after_warmup_mb": round((max(after) - min(after)) / 2**20, 3),
            "pass": growth < 5 * 2**20}


# ---- reports -----------------------------------------------------------------------------------------------


def speed_md(r: dict) -> str:
    lines = [f"# Live captioner: today's loop vs dedup + pipelining ({r['engine']})", "",
             f"Video: generated, 30 s, 10 fps, 640x360, 5 static scenes joined by 1 s slides, noise sigma 2; every "
             f"{r['video']['every']}th frame asked about. Threshold {r['settings']['threshold']} grey levels, "
             f"{r['settings']['max_new_tokens']} new tokens max, threads {r['settings']['threads'] or 'default'} "
             f"(vision {r['settings']['vision_threads'] or 'same'}), {r['settings']['rounds']} round(s), median wall. "
             f"Load average at start: {r['machine']['loadavg_at_start']}.", "",
             "| contender | wall s | frames | captions (encoded) | skipped | frames covered/s | fresh captions/s | "
             "vision s | LLM s | vs today | same answers as today |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in r["contenders"].items():
        lines.append(f"| {name} | {d['wall_s_median']} | {d['frames']} | {d['captions']} ({d['encoded']}) | "
                     f"{d['skipped']} | {d['frames_covered_per_s']} | {d['fresh_captions_per_s']} | {d['vision_s']} | "
                     f"{d['llm_s']} | {d.get('speedup_vs_today', '')}x | {d['same_answers_as_today']} |")
    return "\n".join(lines) + "\n"


def soak_md(r: dict) -> str:
    s = r["stats"]
    return "\n".join([
        f"# Live captioner memory soak ({r['engine']})", "",
        f"{r['settings']['frames']} frames (160x96 MJPG, read back with OpenCV), scene change every "
        f"{r['settings']['change_every']} frames, dedup {r['settings']['threshold']} + pipelined captioning.", "",
        f"- frames seen {s['frames_seen']}, encoded {s['frames_encoded']}, skipped {s['frames_skipped']}; "
        f"captions {r['captions']}; {r['wall_s']} s",
        f"- RSS growth after warm-up ({r['settings']['warmup_frames']} frames): "
        f"**{r['rss_growth_after_warmup_mb']} MB** (median of the last 10 samples - median of the first 10; "
        f"goal < 5 MB: {'pass' if r['pass'] else 'FAIL'}); max - min after warm-up "
        f"{r['rss_max_minus_min_after_warmup_mb']} MB",
        "", "![RSS over frames](live_soak.png)", ""])


def soak_png(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [a for a, _ in r["rss_mb"]]
    ys = [b for _, b in r["rss_mb"]]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(xs, ys, lw=1.2)
    ax.axvline(r["settings"]["warmup_frames"], color="grey", ls="--", lw=0.8, label="end of warm-up")
    ax.set_xlabel("frames")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(f"live captioner soak: RSS growth after warm-up {r['rss_growth_after_warmup_mb']} MB")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["speed", "soak"])
    ap.add_argument("--engine", help="engine directory (e.g. engines/vila-edge-demo-smollm2-135m)")
    ap.add_argument("--tiny", default="nvila", help="without --engine: build this tiny random checkpoint's engine")
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "vila-edge-live-bench"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vision-threads", type=int, default=None)
    ap.add_argument("--threshold", type=float, default=2.0)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--contenders", nargs="*", choices=list(CONTENDERS))
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--change-every", type=int, default=100)
    ap.add_argument("--warmup-frames", type=int, default=1000)
    ap.add_argument("--out", default=None, help="results name (default live_captioner / live_soak)")
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.mode == "speed":
        r = speed(args)
        name = args.out or "live_captioner"
        (RESULTS / f"{name}.json").write_text(json.dumps(r, indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text(speed_md(r))
        print(speed_md(r))
    else:
        r = soak(args)
        name = args.out or "live_soak"
        (RESULTS / f"{name}.json").write_text(json.dumps(r, indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text(soak_md(r))
        soak_png(r, RESULTS / f"{name}.png")
        print(soak_md(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
