"""The `vila-edge demo` and `vila-edge eval` commands (registered on the main typer app by vila_edge.cli)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        image: Path | None = typer.Option(None, "--image", help="Ask about this image instead of the bundled samples."),
        prompt: str | None = typer.Option(None, "--prompt", help="The question (with --image or --camera)."),
        camera: str | None = typer.Option(None, "--camera", help="Grab one frame from a camera (index, device, URL, "
                                          "GStreamer pipeline or video file) and ask about it."),
        limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N bundled sample images."),
        engines_dir: Path = typer.Option(Path("engines"), "--engines-dir",
                                         help="Where the demo checkpoint and its engines are cached."),
        threads: int | None = typer.Option(None, min=1, help="CPU threads (default: physical cores)."),
        max_new_tokens: int = typer.Option(16, help="Maximum tokens per answer."),
        llm_quant: str = typer.Option("rtn", "--llm-quant", help="int4 LLM quantization of the build: rtn (seconds; "
                                      "the demo's vision side was trained against it) | awq (128 x 512 calibration "
                                      "tokens: tens of minutes on a 2-core CPU)."),
        group_size: int = typer.Option(32, "--group-size", help="int4 group size (SmolLM2 needs 32 or 64)."),
    ):
        """Offline demo: a small VILA1.5-architecture model trained here (SmolLM2-135M + SigLIP-from-scratch);
        builds its engines on first use, then answers questions about bundled sample images."""
        from vila_edge.demo import run_demo

        code = run_demo(engines_root=engines_dir, image=image, prompt=prompt, camera=camera, limit=limit,
                        threads=threads, max_new_tokens=max_new_tokens, llm_quant=llm_quant, group_size=group_size)
        if code:
            raise typer.Exit(code)

    @app.command("eval")
    def eval_(
        engines: Path = typer.Argument(..., help="Engine directory (or, with --reference, the checkpoint folder)."),
        demo_set: bool = typer.Option(False, "--demo-set", help="The demo model's held-out question set."),
        reference: bool = typer.Option(False, "--reference", help="Answer with the fp32 PyTorch reference of the "
                                       "checkpoint the engines were built from, instead of the engines."),
        per_type: int = typer.Option(100, "--per-type", min=1, help="Questions per question type."),
        out: Path | None = typer.Option(Path("benchmarks/results"), "--out", "-o",
                                        help="Folder for demo_eval.json / demo_eval.md (merged per backend)."),
        threads: int | None = typer.Option(None, min=1, help="CPU threads (engines)."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
        label: str = typer.Option("engine", "--label", help="The engines' column in demo_eval.md (e.g. engine-fp8 "
                                  "for a second build next to the default one)."),
    ):
        """Accuracy per question type on a held-out question set (only --demo-set exists so far)."""
        from vila_edge.demo import data as D
        from vila_edge.demo import evaluate as E
        from vila_edge.errors import VilaEdgeError

        if not demo_set:
            raise VilaEdgeError("choose a question set: --demo-set (the only one so far)")
        qas = D.held_out_set(per_type)

        def progress(i, n):
            if i % 50 == 0 or i == n:
                print(f"  {i}/{n}", file=sys.stderr, flush=True)

        if reference:
            import torch

            if threads:
                torch.set_num_threads(threads)
            ckpt = E.checkpoint_of(engines)
            print(f"reference (fp32 PyTorch) of {ckpt}: {len(qas)} questions", file=sys.stderr)
            result = E.evaluate_reference(ckpt, qas, progress=progress)
        else:
            print(f"engines {engines}: {len(qas)} questions", file=sys.stderr)
            answerer = E.EngineAnswerer(engines, threads=threads)
            try:
                desc = answerer.pipe.describe()
                result = E.evaluate(answerer, qas, backend=label, source=f"{Path(engines).name} "
                                    f"({_engine_summary(desc)})", progress=progress)
            finally:
                answerer.close()
        if out is not None:
            E.write_results([result], out)
        if as_json:
            typer.echo(json.dumps(result.as_dict(), indent=2))
        else:
            typer.echo(E.markdown_table([result]))


def _engine_summary(desc: dict) -> str:
    def name(part):
        d = desc.get(part) or {}
        return ", ".join(f"{k}={v}" for k, v in d.items() if isinstance(v, (str, int, float)) and k != "path")[:80]

    return f"vision: {name('vision')}; llm: {name('llm')}"
