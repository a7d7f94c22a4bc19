"""`vila-edge bench` (run_bench_cli) and the LLM-only comparisons of benchmarks/llm_decode.py and
benchmarks/peers/*.py (llm_comparison_args, run_llm_comparison): options in, document + table + chart out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from vila_edge.bench.preset_engines import ensure_llm_engine, ensure_preset_checkpoint, ensure_preset_engine
from vila_edge.bench.probes import default_threads
from vila_edge.bench.report import _console, make_document, print_report, write_outputs
from vila_edge.bench.run import BenchOptions, Contender, engine_contender, run_interleaved
from vila_edge.errors import VilaEdgeError


def run_bench_cli(engines: list[Path], opts: BenchOptions, *, out: Path, preset: str | None, work_dir: Path) -> dict:

    con = _console()
    err = _console(stderr=True)
    config = None
    if preset:
        from vila_edge.presets import preset_config

        config = preset_config(preset)
        if opts.llm_only:
            ckpt = ensure_preset_checkpoint(preset, work_dir, llm_only=True, console=err)
            engines = [ensure_llm_engine(ckpt / "llm", Path(work_dir) / f"{preset}-llm-int4")] + list(engines)
        else:
            engines = [ensure_preset_engine(preset, work_dir, console=err, threads=opts.threads)] + list(engines)
    if not engines:
        raise VilaEdgeError("give engine directories, or --preset NAME")
    if opts.new_tokens < 1 or opts.runs < 1:
        raise VilaEdgeError("--new-tokens and --runs must be at least 1")
    contenders = [engine_contender(e, opts, config=config if preset and k == 0 else None)
                  for k, e in enumerate(engines)]
    raw = run_interleaved(contenders, opts, console=err)
    label = (preset or contenders[0].name) + ("-llm" if opts.llm_only else "")
    doc = make_document(contenders, raw, opts, label=label)
    print_report(doc, con)
    jp, pp = write_outputs(doc, out)
    con.print(f"wrote {jp} and {pp}")
    return doc


def llm_comparison_args(doc: str | None, argv=None, extra=None):
    import argparse

    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="nvila-lite-2b", help="LLM geometry (vila_edge.presets)")
    ap.add_argument("--ours", type=Path, action="append", default=[],
                    help="our LLM folder or engine directory (repeatable; default: build with vila_edge.builder.llm_onnx)")
    ap.add_argument("--group-size", type=int, action="append", default=[],
                    help="int4 block size(s) of our builds when --ours is not given (32, 64, 128; default 128)")
    ap.add_argument("--threads", type=int, default=None, help="threads for every contender (default: physical cores)")
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds (median, min, max reported)")
    ap.add_argument("--work-dir", type=Path, default=Path("bench-work"), help="checkpoints, GGUFs and builds (cached)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--bandwidth-mib", type=int, default=512)
    ap.add_argument("--lm-head", default=None,
                    help="LM head precision of our builds (build_llm_onnx lm_head: int4 | int8 | float; default: the builder's)")
    ap.add_argument("--ort-spinning", choices=("on", "off", "both"), default="on",
                    help="ONNX Runtime intra-op spinning of our decoder(s) (default on, as the runtime)")
    ap.add_argument("--llama-omp-wait", choices=("default", "passive", "both"), default="default",
                    help="llama.cpp peer: OMP_WAIT_POLICY of its process (passive: threads sleep at barriers)")
    if extra:
        extra(ap)
    a = ap.parse_args(argv)
    a.group_size = a.group_size or [128]
    return a


def our_contenders(a, opts: BenchOptions, cfg, threads: int) -> list[Contender]:
    """`--ours` folders, or our int4 builds of the preset's LLM, one per `--group-size`."""
    if a.ours:
        return [engine_contender(d, opts, name=f"vila-edge {Path(d).name}", config=cfg, precision="int4")
                for d in a.ours]
    ckpt = ensure_preset_checkpoint(a.preset, a.work_dir, llm_only=True)
    head = getattr(a, "lm_head", None)
    kw = {"lm_head": head} if head else {}
    suffix = f"-head-{head}" if head else ""
    ours = []
    for g in a.group_size:
        d = ensure_llm_engine(ckpt / "llm", Path(a.work_dir) / f"{a.preset}-llm-int4-g{g}{suffix}", group_size=g,
                              threads=threads, **kw)
        ours.append(engine_contender(d, opts, name=f"vila-edge ORT int4 g{g}" + (f" head {head}" if head else ""),
                                     config=cfg, precision="int4"))
    return ours


def comparison_label(preset: str, peers_tag: str | None) -> str:
    """`<preset>-vs-<peers>` when peers ran, else `<preset>-llm` (the stem of the result files)."""
    return f"{preset}-vs-{peers_tag}" if peers_tag else f"{preset}-llm"


def run_llm_comparison(a, peer_factories: Sequence[Callable[[BenchOptions], Contender]], tag: str) -> dict:
    """Our int4 decoder(s) + peers at a preset's LLM geometry, interleaved; document, table, chart."""
    from vila_edge.presets import preset_config

    threads = a.threads or default_threads()
    opts = BenchOptions(image_sizes=[], prompt_tokens=[a.prompt_tokens], new_tokens=a.new_tokens, runs=a.runs,
                        warmup=1, threads=threads, llm_only=True, bandwidth_mib=a.bandwidth_mib)
    cfg = preset_config(a.preset)
    ours = our_contenders(a, opts, cfg, threads)
    spins = {"on": [True], "off": [False], "both": [True, False]}[getattr(a, "ort_spinning", "on")]
    variants = []
    for c in ours:
        for spin in spins:
            v = Contender(**{**c.__dict__, "spec": {**c.spec, "spinning": spin}})
            if len(spins) > 1 or not spin:
                v.name = f"{c.name} spin {'on' if spin else 'off'}"
            variants.append(v)
    peers = []
    for f in peer_factories:
        got = f(opts)
        peers += got if isinstance(got, list) else [got]
    contenders = variants + peers
    raw = run_interleaved(contenders, opts)
    notes = [f"{a.preset} LLM geometry, random weights; prompt {a.prompt_tokens} random ids then {a.new_tokens} "
             f"forced greedy tokens; {threads} threads everywhere; every run in a fresh process; contenders "
             f"interleaved per round, a bandwidth probe right after each run"]
    doc = make_document(contenders, raw, opts, label=comparison_label(a.preset, tag if peer_factories else None),
                        notes=notes)
    print_report(doc)
    jp, pp = write_outputs(doc, a.out)
    print(f"wrote {jp} and {pp}")
    return doc
