"""`vila-edge` command line: a thin layer over the Python API.

Every user-facing problem is a VilaEdgeError: printed as one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from vila_edge.errors import VilaEdgeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run VILA / NVILA vision-language models on Jetson Orin and laptops.")


def _parse_size(size: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in size.lower().split("x"))
        if w <= 0 or h <= 0:
            raise ValueError
        return w, h
    except ValueError:
        raise VilaEdgeError(f"--image-size {size!r}: expected WIDTHxHEIGHT, e.g. 1920x1080") from None


@app.command()
def info(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder (dev layout or flat -hf)."),
    image_size: str = typer.Option("1920x1080", help="Image size for the token count, WIDTHxHEIGHT."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    token_order: Optional[str] = typer.Option(None, help="Override the mlp_downsample token order: row | col."),
    splice: Optional[str] = typer.Option(None, help="Override the splice layout: v15 | head."),
):
    """Family, resolved config, tokens per image, parameter counts and weight bytes of a checkpoint."""
    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.info import checkpoint_info, print_info

    ckpt = load_checkpoint(checkpoint, token_order=token_order, splice=splice)
    w, h = _parse_size(image_size)
    data = checkpoint_info(ckpt, w, h)
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        print_info(data)


@app.command()
def fixture(
    family: str = typer.Argument(..., help="vila1.5 | vila1.5-s2 | nvila | nvila-lite"),
    out: Path = typer.Argument(..., help="Folder to write the checkpoint to."),
    seed: int = typer.Option(0, help="Weight seed."),
    layout: str = typer.Option("dev", help="dev | hf"),
):
    """Write a tiny random checkpoint in the real on-disk format (for trying the pipeline offline)."""
    from vila_edge.testing import FAMILY_NAMES, make_tiny_checkpoint

    if family not in FAMILY_NAMES:
        raise VilaEdgeError(f"family {family!r} is not one of: {', '.join(FAMILY_NAMES)}")
    path = make_tiny_checkpoint(family, out, seed, layout=layout)
    typer.echo(str(path))


@app.command()
def plan(
    model: str = typer.Argument(..., help="Checkpoint folder, or a preset name: vila1.5-3b | nvila-lite-2b | nvila-8b."),
    device: str = typer.Option(..., "--device", "-d", help="Device profile (build/profiles/*.toml), e.g. orin-nano-8gb."),
    max_context: int | None = typer.Option(None, help="KV cache positions (default: the model's max length)."),
    max_tiles: int | None = typer.Option(None, help="Largest tile count of one image (default: the model's max_tiles)."),
    llm_precision: str = typer.Option("int4", help="LLM weights: int4 | int8 | fp8 | fp16."),
    vision_precision: str = typer.Option("fp16", help="Vision tower weights: fp16 | fp8 | int8."),
    single_scale: bool = typer.Option(False, "--single-scale", help="Run the vision tower at one scale instead of S2."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
):
    """Memory budget and predicted speed of a model on a device; exits 2 with one line if it does not fit."""
    from vila_edge.plan import plan as make_plan
    from vila_edge.plan import print_plan

    p = make_plan(model, device, max_context=max_context, max_tiles=max_tiles, llm_precision=llm_precision,
                  vision_precision=vision_precision, single_scale=single_scale)
    if as_json:
        typer.echo(json.dumps(p.to_dict(), indent=2, default=str))
        if not p.fits:
            raise typer.Exit(2)
        return
    if not p.fits:
        raise VilaEdgeError(p.refusal())
    print_plan(p)


def main() -> None:
    try:
        app()
    except VilaEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
