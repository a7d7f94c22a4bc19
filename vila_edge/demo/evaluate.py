"""Held-out accuracy of the demo model, per question type, through the engines or the PyTorch reference.

The held-out set is generated with a seed disjoint from training's (`data.held_out_set`); an answer is
correct when the generated text, lowercased and stripped of punctuation, is exactly the expected word.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from vila_edge.demo import data as D

MAX_NEW_TOKENS = 4  # answers are one word: 1-2 tokens, the stop token, room for a "."


@dataclass
class EvalResult:
    backend: str  # "engine" | "reference"
    source: str
    n: int
    accuracy: dict[str, float]  # question type -> %, and "overall"
    counts: dict[str, list[int]]  # question type -> [correct, total]
    seconds: float
    mistakes: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"backend": self.backend, "source": self.source, "n": self.n, "accuracy": self.accuracy,
                "counts": self.counts, "seconds": round(self.seconds, 1), "mistakes": self.mistakes[:20]}


class ReferenceAnswerer:
    """Greedy answers from the fp32 PyTorch reference (`ReferenceVILA`), prompts built as the runtime does."""

    def __init__(self, checkpoint):
        from vila_edge.checkpoint import load_checkpoint
        from vila_edge.reference.model import ReferenceVILA

        self.ckpt = load_checkpoint(checkpoint)
        self.ref = ReferenceVILA(self.ckpt)

    def __call__(self, image: Image.Image, question: str) -> str:
        from vila_edge.media.tiling import preprocess_image
        from vila_edge.prompt import Message, render, tokenize, user_content

        cfg, tok = self.ckpt.config, self.ckpt.tokenizer
        items = self.ref.image_items(preprocess_image(image, cfg.vision))
        text = render(cfg.llm.chat_format, [Message("user", user_content(cfg, question, n_images=1))], tok)
        ids = tokenize(cfg, tok, text)
        out = self.ref.greedy(self.ref.inputs_embeds(ids, items), MAX_NEW_TOKENS)
        return tok.decode([t for t in out if t not in cfg.llm.stop_token_ids])


class EngineAnswerer:
    def __init__(self, engine_dir, *, threads: int | None = None):
        from vila_edge.runtime import load

        self.pipe = load(engine_dir, threads=threads)

    def __call__(self, image: Image.Image, question: str) -> str:
        return self.pipe.generate(question, images=[image], max_new_tokens=MAX_NEW_TOKENS).text

    def close(self) -> None:
        self.pipe.close()


def evaluate(answer: Callable[[Image.Image, str], str], qas: Sequence[D.QA], *, backend: str, source: str,
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    t0 = time.time()

    def judged():
        for i, qa in enumerate(qas):
            got = answer(Image.fromarray(qa.scene.image), qa.question)
            if progress:
                progress(i + 1, len(qas))
            yield D.is_correct(got, qa.answer), got

    return _tally(qas, judged(), backend, source, t0)


def _tally(qas: Sequence[D.QA], judged, backend: str, source: str, t0: float) -> EvalResult:
    """EvalResult from one (correct, generated text) pair per question, in order."""
    counts: dict[str, list[int]] = {qt: [0, 0] for qt in D.QUESTION_TYPES}
    mistakes = []
    for i, (qa, (ok, got)) in enumerate(zip(qas, judged, strict=True)):
        counts[qa.qtype][0] += int(ok)
        counts[qa.qtype][1] += 1
        if not ok:
            mistakes.append({"index": i, "type": qa.qtype, "question": qa.question, "expected": qa.answer, "got": got})
    counts = {k: v for k, v in counts.items() if v[1]}
    acc = {k: round(100.0 * c / n, 1) for k, (c, n) in counts.items()}
    total = sum(n for _, n in counts.values())
    acc["overall"] = round(100.0 * sum(c for c, _ in counts.values()) / max(1, total), 1)
    return EvalResult(backend, source, total, acc, counts, time.time() - t0, mistakes)


def evaluate_reference(checkpoint, qas: Sequence[D.QA], *, batch: int = 16,
                       progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Greedy exact-match accuracy of the fp32 PyTorch reference, computed fast but exactly.

    A question is answered correctly by greedy decoding with exactly the expected tokens iff, teacher-forced
    on "answer <|im_end|>", every position's argmax is the next expected token. That check runs batched
    (the prompt prefix before the image is shared through a KV cache); the questions it rejects are then
    decoded for real with `ReferenceVILA.greedy` and judged like the engine's text (case, punctuation).
    """
    import torch

    from vila_edge.demo.train import VQA
    from vila_edge.media.tiling import preprocess_image

    t0 = time.time()
    answer = ReferenceAnswerer(checkpoint)
    ref, cfg = answer.ref, answer.ckpt.config
    vqa = VQA(answer.ckpt, ref.llm)
    fast = []
    for i in range(0, len(qas), batch):
        chunk = qas[i:i + batch]
        items = torch.stack([ref.image_items(preprocess_image(Image.fromarray(q.scene.image), cfg.vision))[0]
                             for q in chunk])
        fast += vqa.correct(items, chunk)
        if progress:
            progress(min(i + batch, len(qas)), len(qas))

    def judged():
        for qa, ok in zip(qas, fast, strict=True):
            if ok:
                yield True, qa.answer
            else:  # decode for real and judge the text like the engine's
                got = answer(Image.fromarray(qa.scene.image), qa.question)
                yield D.is_correct(got, qa.answer), got

    return _tally(qas, judged(), "reference", Path(checkpoint).name + " (fp32 PyTorch)", t0)


def checkpoint_of(engine_or_checkpoint: Path) -> Path:
    """The checkpoint folder behind an engine directory (its manifest records it), or the folder itself."""
    from vila_edge.engine_dir import is_engine_dir, read_manifest

    p = Path(engine_or_checkpoint)
    if is_engine_dir(p):
        src = read_manifest(p).checkpoint.path
        if src:
            for cand in (Path(src), p / src, p.parent / src):
                if (cand / "config.json").is_file():
                    return cand
        from vila_edge.errors import VilaEdgeError

        raise VilaEdgeError(f"{p}: the checkpoint it was built from ({src}) is not here; pass the checkpoint folder")
    return p


def markdown_table(results: Sequence[EvalResult]) -> str:
    types = [t for t in (*D.QUESTION_TYPES, "overall") if any(t in r.accuracy for r in results)]
    head = "| question type | n | " + " | ".join(f"{r.backend} (%)" for r in results) + " |"
    sep = "|---|---:|" + "---:|" * len(results)
    rows = []
    for t in types:
        n = results[0].counts[t][1] if t in results[0].counts else results[0].n
        rows.append(f"| {t} | {n} | " + " | ".join(f"{r.accuracy.get(t, float('nan')):.1f}" for r in results) + " |")
    return "\n".join([head, sep, *rows])


def write_results(results: Sequence[EvalResult], out_dir: Path, extra: dict | None = None) -> tuple[Path, Path]:
    """benchmarks/results/demo_eval.{json,md}; results already there for other backends are kept."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / "demo_eval.json", out_dir / "demo_eval.md"
    data = json.loads(jpath.read_text()) if jpath.is_file() else {}
    runs = {r["backend"]: r for r in data.get("runs", [])}
    for r in results:
        runs[r.backend] = r.as_dict()
    data["runs"] = list(runs.values())
    data["held_out_seed"] = D.HELD_OUT_SEED
    data.update(extra or {})
    extra = {k: v for k, v in data.items() if k not in ("runs", "held_out_seed")}  # kept from earlier runs too
    jpath.write_text(json.dumps(data, indent=2) + "\n")
    all_results = [EvalResult(r["backend"], r["source"], r["n"], r["accuracy"], r["counts"], r["seconds"])
                   for r in runs.values()]
    order = {"reference": 0, "engine": 1}
    all_results.sort(key=lambda r: order.get(r.backend, 2))
    lines = ["# Demo model: held-out accuracy", "",
             f"{all_results[0].n} generated questions (seed {D.HELD_OUT_SEED}, disjoint from training's), "
             "exact match of the one-word answer, greedy decoding.", "",
             "- reference: the fp32 PyTorch reference (`vila-edge eval ENGINES --demo-set --reference`)",
             "- engine: the built engines (`vila-edge demo` build: int4 RTN g32 LLM, fp32 ONNX vision) on ONNX Runtime CPU "
             "(`vila-edge eval ENGINES --demo-set`)"]
    lines += [f"- {r.backend}: another build of the same checkpoint (`vila-edge eval ENGINES --demo-set --label "
              f"{r.backend}`; its engines below)" for r in all_results if r.backend not in order]
    lines += ["", markdown_table(all_results), ""]
    for r in all_results:
        lines.append(f"- {r.backend}: {r.source}, {r.seconds:.0f} s")
    if extra:
        lines += ["", "```json", json.dumps(extra, indent=2), "```"]
    mpath.write_text("\n".join(lines) + "\n")
    return jpath, mpath
