"""JSON-schema output with the demo model: validity on generated prompts, and accuracy as a JSON field.

1. Validity: 200 generated prompts (demo scenes, every question type, and five schema shapes: the answer as an
   enum, as a bounded string, a scene record, a list of objects, any JSON object), greedy and sampled; each
   answer is parsed by json.loads and validated by jsonschema. Goal: 100 % valid.
2. Accuracy: the demo set's held-out questions (vila_edge/demo/evaluate.py, the same judge) answered plainly
   and as {"answer": ...} with the options as an enum and as a free string. Goal: within 2 points of plain.
3. Cost: decode time per token with and without the grammar mask (same prompts; a ratio, not a timed test).

    python benchmarks/structured_output.py [--engines-root engines] [--n-per-type 100]

Results: benchmarks/results/structured_output.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vila_edge.demo import data as D  # noqa: E402
from vila_edge.demo.evaluate import _tally  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SEED = 20_261_204


def enum_schema(qtype: str) -> dict:
    return {"type": "object", "properties": {"answer": {"enum": list(D.ANSWER_SET[qtype])}}, "required": ["answer"],
            "additionalProperties": False}


STRING_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 24}},
                 "required": ["answer"], "additionalProperties": False}
SCENE_SCHEMA = {"type": "object", "properties": {
    "colour": {"enum": list(D.COLOURS)}, "shape": {"enum": list(D.SHAPES)},
    "count": {"type": "integer", "minimum": 1, "maximum": 5}, "big": {"type": "boolean"},
    "position": {"enum": list(D.POSITIONS)}}, "required": ["colour", "shape", "count", "big"],
    "additionalProperties": False}
LIST_SCHEMA = {"type": "object", "properties": {"objects": {"type": "array", "maxItems": 5, "items": {
    "type": "object", "properties": {"shape": {"enum": list(D.SHAPES)}, "colour": {"enum": list(D.COLOURS)}},
    "required": ["shape", "colour"], "additionalProperties": False}}}, "required": ["objects"],
    "additionalProperties": False}
ANY_OBJECT = {"type": "object"}


def validity_prompts(n: int, seed: int = SEED) -> list[dict]:
    """n (scene, question, schema, temperature) cases, every schema shape and question type in turn."""
    rng = random.Random(seed)
    shapes = ["enum", "string", "scene", "list", "object"]
    cases = []
    for i in range(n):
        qa = D.make_qa(rng, D.QUESTION_TYPES[i % len(D.QUESTION_TYPES)])
        shape = shapes[i % len(shapes)]
        schema = {"enum": enum_schema(qa.qtype), "string": STRING_SCHEMA, "scene": SCENE_SCHEMA, "list": LIST_SCHEMA,
                  "object": ANY_OBJECT}[shape]
        question = {"scene": "Describe the image.", "list": "List the shapes.", "object": "Describe the image."}.get(
            shape, qa.question)
        cases.append({"qa": qa, "question": question, "shape": shape, "schema": schema,
                      "temperature": 0.0 if i % 2 == 0 else 0.8, "seed": i})
    return cases


def run_validity(pipe, cases: list[dict], max_new_tokens: int) -> dict:
    import jsonschema

    by_shape: dict[str, list[int]] = {}
    finishes: dict[str, int] = {}
    invalid, tokens, t0 = [], 0, time.time()
    for i, c in enumerate(cases):
        r = pipe.generate(c["question"], images=[Image.fromarray(c["qa"].scene.image)], max_new_tokens=max_new_tokens,
                          temperature=c["temperature"], seed=c["seed"], json_schema=c["schema"])
        tokens += len(r.token_ids)
        finishes[r.finish_reason] = finishes.get(r.finish_reason, 0) + 1
        # valid = the text is JSON the schema accepts, whatever the finish: an answer the budget made the runtime
        # close early ends "length" but is valid (finish_reasons counts those)
        try:
            jsonschema.validate(json.loads(r.text), c["schema"])
            ok = True
        except (ValueError, jsonschema.ValidationError):
            ok = False
        counts = by_shape.setdefault(c["shape"], [0, 0])
        counts[0] += ok
        counts[1] += 1
        if not ok:
            invalid.append({"index": i, "shape": c["shape"], "finish": r.finish_reason, "text": r.text[:200]})
    valid = sum(v for v, _ in by_shape.values())
    return {"n": len(cases), "valid": valid, "valid_pct": round(100.0 * valid / len(cases), 2), "by_shape": by_shape,
            "finish_reasons": finishes, "generated_tokens": tokens, "seconds": round(time.time() - t0, 1),
            "max_new_tokens": max_new_tokens, "invalid": invalid[:20],
            "examples": [r for r in _examples(pipe, cases[:5], max_new_tokens)]}


def _examples(pipe, cases, max_new_tokens):
    for c in cases:
        r = pipe.generate(c["question"], images=[Image.fromarray(c["qa"].scene.image)], max_new_tokens=max_new_tokens,
                          temperature=c["temperature"], seed=c["seed"], json_schema=c["schema"])
        yield {"question": c["question"], "shape": c["shape"], "answer": r.text}


def run_accuracy(pipe, qas, mode: str, max_new_tokens: int):
    """Plain answers ("plain"), or the answer field of {"answer": ...} ("enum" / "string")."""

    def judged():
        for qa in qas:
            img = Image.fromarray(qa.scene.image)
            if mode == "plain":
                got = pipe.generate(qa.question, images=[img], max_new_tokens=4).text
            else:
                schema = enum_schema(qa.qtype) if mode == "enum" else STRING_SCHEMA
                r = pipe.generate(qa.question, images=[img], max_new_tokens=max_new_tokens, json_schema=schema)
                got = json.loads(r.text)["answer"] if r.finish_reason == "stop" else r.text
            yield D.is_correct(got, qa.answer), got

    return _tally(qas, judged(), f"json-{mode}" if mode != "plain" else "plain", "demo engine", time.time())


def decode_cost(pipe, qas, n: int = 30) -> dict:
    """The grammar's share of a decode step: mask + accept per token (replaying the constrained answers'
    tokens through a fresh JsonConstraint) against the engine's mean decode step (free answers, fixed length)."""
    from vila_edge.structured import JsonConstraint

    stops = pipe.config.llm.stop_token_ids
    step_s = steps = 0
    for qa in qas[:n]:
        r = pipe.generate(qa.question, images=[Image.fromarray(qa.scene.image)], max_new_tokens=16, ignore_eos=True)
        step_s += r.timings.decode
        steps += r.timings.generated_tokens
    out = {"decode_step_ms": round(1e3 * step_s / steps, 3)}
    for name, schema in (("enum", None), ("string", STRING_SCHEMA), ("scene", SCENE_SCHEMA)):
        grammar_s = tokens = 0
        for qa in qas[:n]:
            sch = schema or enum_schema(qa.qtype)
            r = pipe.generate(qa.question, images=[Image.fromarray(qa.scene.image)], max_new_tokens=64, json_schema=sch)
            from vila_edge.structured import schema_text

            c = JsonConstraint(schema_text(sch), pipe.tokenizer, stops)
            logits = np.zeros(pipe.config.llm.vocab_size, np.float32)
            t0 = time.perf_counter()
            for t in r.token_ids:
                logits[:] = 0.0
                c.mask(logits)
                c.accept(t)
            grammar_s += time.perf_counter() - t0
            tokens += len(r.token_ids)
        out[f"grammar_ms_per_token_{name}"] = round(1e3 * grammar_s / tokens, 3)
    out["grammar_share_of_step"] = round(max(v for k, v in out.items() if k.startswith("grammar_ms"))
                                         / out["decode_step_ms"], 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines-root", default=str(ROOT / "engines"))
    ap.add_argument("--n-prompts", type=int, default=200)
    ap.add_argument("--n-per-type", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=128, help="accuracy runs")
    ap.add_argument("--validity-max-new-tokens", type=int, default=256,
                    help="validity runs (the any-object schema lets the model write long objects)")
    ap.add_argument("--parts", default="all", help="all, or a comma list of validity, accuracy, cost")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    import llguidance

    from vila_edge.demo import demo_engine
    from vila_edge.runtime import load

    pipe = load(demo_engine(args.engines_root, say=lambda m: print(m, file=sys.stderr), progress=False),
                threads=args.threads)
    out = Path(args.out)
    jpath = out / "structured_output.json"
    # --parts validity: rerun one part, keep the others' results from the last run
    result = json.loads(jpath.read_text()) if jpath.is_file() and args.parts != "all" else {}
    result.update({"benchmark": "structured_output", "llguidance": llguidance.__version__,
                   "engine": "vila-edge demo (SmolLM2-135M int4 RTN g32, ONNX Runtime CPU)",
                   "machine": platform.machine()})
    parts = {"validity", "accuracy", "cost"} if args.parts == "all" else set(args.parts.split(","))
    qas = D.held_out_set(args.n_per_type)
    if "validity" in parts:
        result["validity"] = run_validity(pipe, validity_prompts(args.n_prompts), args.validity_max_new_tokens)
        print(f"validity: {result['validity']['valid']}/{args.n_prompts}", file=sys.stderr)
    if "accuracy" in parts:
        acc = {}
        for mode in ("plain", "enum", "string"):
            r = run_accuracy(pipe, qas, mode, args.max_new_tokens)
            acc[mode] = {"n": r.n, "accuracy": r.accuracy, "mistakes": r.mistakes[:10]}
            print(f"accuracy {mode}: {r.accuracy}", file=sys.stderr)
        result["accuracy"] = acc
        result["accuracy_delta_points"] = {m: round(acc[m]["accuracy"]["overall"] - acc["plain"]["accuracy"]["overall"],
                                                    2) for m in ("enum", "string")}
    if "cost" in parts:
        result["decode_cost"] = decode_cost(pipe, qas)
    pipe.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(result, indent=2) + "\n")
    (out / "structured_output.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    v = r["validity"]
    lines = ["# Structured output (JSON schema) with the demo model", "",
             f"Engine: {r['engine']}; llguidance {r['llguidance']}. `python benchmarks/structured_output.py`.", "",
             f"## Validity: {v['valid']}/{v['n']} answers schema-valid ({v['valid_pct']} %)", "",
             f"Generated prompts over the demo scenes, half greedy, half sampled (T=0.8); max_new_tokens "
             f"{v['max_new_tokens']}; finish reasons {v['finish_reasons']} (\"length\": the budget ran out and "
             "the runtime closed the JSON early; valid counts the JSON, whatever the finish).", "",
             "| schema | valid / n |", "|---|---:|"]
    lines += [f"| {k} | {a}/{b} |" for k, (a, b) in v["by_shape"].items()]
    lines += ["", "## Accuracy on the demo held-out set (greedy; same judge as `vila-edge eval --demo-set`)", "",
              "| question type | plain (%) | {\"answer\": enum} (%) | {\"answer\": string} (%) |",
              "|---|---:|---:|---:|"]
    types = [t for t in r["accuracy"]["plain"]["accuracy"]]
    for t in types:
        lines.append(f"| {t} | " + " | ".join(f"{r['accuracy'][m]['accuracy'].get(t, float('nan')):.1f}"
                                           for m in ("plain", "enum", "string")) + " |")
    d = r["accuracy_delta_points"]
    c = r["decode_cost"]
    g = ", ".join(f"{k.rsplit('_', 1)[1]} {v} ms" for k, v in c.items() if k.startswith("grammar_ms"))
    lines += ["", f"Overall difference to plain answers: enum {d['enum']:+.1f} points, string {d['string']:+.1f} points.",
              "", f"Grammar cost per token (llguidance mask + accept): {g}; one decode step of the engine: "
              f"{c['decode_step_ms']} ms; the mask adds at most {100 * c['grammar_share_of_step']:.1f} % to a step "
              f"({r['machine']}, shared CPU: a ratio, not a timing).", "",
              "Examples:", ""]
    lines += [f"- {e['shape']}: {e['question']} -> `{e['answer']}`" for e in v["examples"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
