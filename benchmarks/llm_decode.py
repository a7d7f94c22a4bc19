#!/usr/bin/env python
"""LLM-only decode benchmark at a preset's real geometry with random weights (no download).

    python benchmarks/llm_decode.py --preset nvila-lite-2b --threads 2 \
        [--group-size 128 --group-size 32] [--peers llama_cpp,transformers_eager] \
        [--prompt-tokens 300] [--new-tokens 128] [--runs 3] [--work-dir bench-work] [--out benchmarks/results]

Writes the preset's llm/ (vila_edge.presets, streamed shards), builds our int4 decoder with
vila_edge.builder.llm_onnx.build_llm_onnx (symmetric RTN, one build per --group-size; cached in
--work-dir), then runs every contender interleaved (fresh process per run, bandwidth probe right after
each run): decode tok/s (median/min/max of --runs rounds, forced --new-tokens), prefill time, peak RSS,
and the share of the bandwidth roofline = probe / (decoder bytes + KV bytes of the mean context).
Peers are the scripts in benchmarks/peers/ (same geometry, weights and threads).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

from vila_edge import bench

PEERS_DIR = Path(__file__).resolve().parent / "peers"


def load_peer(name: str):
    path = PEERS_DIR / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"unknown peer {name!r}: benchmarks/peers/ has {sorted(p.stem for p in PEERS_DIR.glob('*.py'))}")
    spec = importlib.util.spec_from_file_location(f"vila_edge_peer_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _peer_contender(mod, a, threads: int, opts: bench.BenchOptions):
    if "omp_wait" in mod.contender.__code__.co_varnames:
        return mod.contender(a.preset, a.work_dir, opts, threads=threads, omp_wait=a.llama_omp_wait)
    return mod.contender(a.preset, a.work_dir, opts, threads=threads)


def main(argv=None) -> dict:
    a = bench.llm_comparison_args(__doc__, argv, extra=lambda ap: ap.add_argument(
        "--peers", default="", help="comma-separated scripts of benchmarks/peers/ to run interleaved"))
    threads = a.threads or bench.default_threads()
    peers = [load_peer(n.strip()) for n in a.peers.split(",") if n.strip()]
    factories = [functools.partial(_peer_contender, m, a, threads) for m in peers]
    tag = "+".join(n.strip() for n in a.peers.split(",") if n.strip()) or "llm"
    return bench.run_llm_comparison(a, factories, tag=tag)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
