"""Structured output (vila_edge/structured.py): JSON-schema constrained decoding never yields invalid JSON.

The models here are the tiny random-weights checkpoints: their preferences are noise, so only the grammar mask
can make the output valid. Schemas are fuzzed with hypothesis (derandomized, bounded like tests/test_fuzz.py):
enums, integers and numbers with bounds, booleans, bounded strings, nested objects with required fields,
arrays. Every answer that finished ("stop") is parsed by json.loads and validated by `jsonschema`; answers
cut by max_new_tokens report "length" (and are not claimed valid).

Two layers: the grammar + sampler on the tiny tokenizers with random logits (many examples, no engine), and
the whole pipeline (prefill, ORT decode, grammar mask, detokenizer) on the tiny engines: ONNX Runtime fp32
and int4, and the PyTorch int4 backend.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from vila_edge.errors import VilaEdgeError
from vila_edge.generate import Sampler, SamplingParams, generate_tokens

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from conftest_runtime import runtime_engine  # noqa: E402,F401  (session fixture: tiny engine directories)

from vila_edge.structured import JsonConstraint, closing_tokens, cut_note, read_schema_file, schema_text  # noqa: E402

_FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
             derandomize=True, database=None, phases=[Phase.explicit, Phase.generate])
GRAMMAR_EXAMPLES, ENGINE_EXAMPLES = 60, 12

# ---- the schemas ---------------------------------------------------------------------------------------------

_words = st.text(alphabet="abcdefghij XYZ_-é", min_size=1, max_size=6)
_leaf = st.one_of(
    st.lists(_words, min_size=1, max_size=4, unique=True).map(lambda xs: {"enum": xs}),
    st.tuples(st.integers(-50, 50), st.integers(0, 300)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}),
    st.tuples(st.integers(-5, 5), st.integers(1, 20)).map(
        lambda t: {"type": "number", "minimum": t[0], "maximum": t[0] + t[1]}),
    st.just({"type": "boolean"}),
    st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
)


def _object(children):
    props = st.dictionaries(st.text(alphabet="abcxyz_", min_size=1, max_size=5), children, min_size=1, max_size=3)
    return props.flatmap(lambda p: st.lists(st.sampled_from(sorted(p)), unique=True).map(
        lambda req: {"type": "object", "properties": p, "required": req, "additionalProperties": False}))


def _array(children):
    return st.tuples(children, st.integers(0, 1), st.integers(1, 3)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]})


_node = st.recursive(_leaf, lambda children: st.one_of(_object(children), _array(children)), max_leaves=6)
SCHEMAS = _object(_node)  # the top level is an object, as response_format json_schema asks


def check_valid(text: str, schema: dict) -> object:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


# ---- grammar + sampler on the tiny tokenizers, random logits -------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers_by_family(tiny_checkpoint):
    from vila_edge.checkpoint import load_checkpoint

    return {f: load_checkpoint(tiny_checkpoint(f)) for f in ("nvila", "vila1.5")}


def random_answer(ckpt, schema: str, seed: int, *, temperature: float, max_new_tokens: int = 400):
    """generate_tokens with the real Sampler and JsonConstraint, logits drawn at random (a model of noise)."""
    cfg, tok = ckpt.config.llm, ckpt.tokenizer
    rng = np.random.default_rng(seed)
    width = cfg.vocab_size + 7  # engines may return wider logits than the trained vocabulary
    constraint = JsonConstraint(schema, tok, cfg.stop_token_ids)
    sampler = Sampler(SamplingParams(temperature=temperature, seed=seed, json_schema=schema), cfg.vocab_size,
                      cfg.extra_masked_ids, constraint=constraint)
    out, finish = [], None
    for token, finish in generate_tokens(rng.normal(size=width) * 4, lambda _t: rng.normal(size=width) * 4, sampler,
                                         max_new_tokens=max_new_tokens, stop_ids=set(cfg.stop_token_ids),
                                         complete=constraint.complete):
        if finish != "stop":
            out.append(token)
    return tok.decode(out), finish


@pytest.mark.parametrize("family", ["nvila", "vila1.5"])  # byte-level BPE (Qwen2) / byte fallback (Llama SP)
@settings(max_examples=GRAMMAR_EXAMPLES, **_FUZZ)
@given(schema=SCHEMAS, seed=st.integers(0, 2**16), temperature=st.sampled_from([0.0, 1.0]))
def test_random_logits_under_the_mask_are_always_schema_valid(tokenizers_by_family, family, schema, seed,
                                                              temperature):
    text, finish = random_answer(tokenizers_by_family[family], schema_text(schema), seed, temperature=temperature)
    assert finish in ("stop", "complete"), (finish, text)  # bounded schemas end well within 400 tokens
    check_valid(text, schema)


def test_max_new_tokens_cuts_the_answer_and_says_so(tokenizers_by_family):
    schema = {"type": "object", "properties": {"words": {"type": "array", "items": {"type": "string"},
                                                         "minItems": 30}}, "required": ["words"]}
    text, finish = random_answer(tokenizers_by_family["nvila"], schema_text(schema), 0, temperature=1.0,
                                 max_new_tokens=12)
    assert finish == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    from vila_edge.runtime import GenerationResult, Timings

    assert "not valid JSON" in cut_note(GenerationResult(text, [], "length", Timings()))
    assert cut_note(GenerationResult("{}", [], "stop", Timings())) is None


@pytest.mark.parametrize("family", ["nvila", "vila1.5"])
@pytest.mark.parametrize("seed", range(6))
def test_the_budget_closes_open_strings_and_containers(tokenizers_by_family, family, seed):
    """Noise logits under {"type": "object"} write long keys/strings and nest forever; with 24 tokens the last
    CLOSE_RESERVE close what is open: valid JSON, finish "length", cut_note says values may be short."""
    from vila_edge.runtime import GenerationResult, Timings

    schema = {"type": "object", "properties": {"note": {"type": "string"},
                                               "tags": {"type": "array", "items": {"type": "string"}}},
              "required": ["note", "tags"]}
    ckpt = tokenizers_by_family[family]
    cfg, tok = ckpt.config.llm, ckpt.tokenizer
    rng = np.random.default_rng(seed)
    width = cfg.vocab_size
    closing = np.flatnonzero(closing_tokens(tok))
    text_schema = schema_text(schema)
    constraint = JsonConstraint(text_schema, tok, cfg.stop_token_ids)
    sampler = Sampler(SamplingParams(temperature=1.0, seed=seed, json_schema=text_schema, max_new_tokens=24),
                      cfg.vocab_size, cfg.extra_masked_ids, constraint=constraint)

    def noise(_t=None):
        x = rng.normal(size=width) * 4
        x[closing] -= 50  # a model that never wants to close anything
        return x

    out = [t for t, _ in generate_tokens(noise(), noise, sampler, max_new_tokens=24,
                                         stop_ids=set(cfg.stop_token_ids), complete=constraint.complete)]
    text = tok.decode(out)
    assert len(out) <= 24 and constraint.complete() and constraint.closed_early, text
    check_valid(text, schema)
    assert "closed early" in cut_note(GenerationResult(text, out, "length", Timings()))


def test_closing_tokens_are_only_quotes_and_closers(tokenizers_by_family):
    tok = tokenizers_by_family["nvila"].tokenizer
    ids = np.flatnonzero(closing_tokens(tok))
    texts = {tok.decode([int(i)], skip_special_tokens=False) for i in ids}
    assert {'"', "}"} <= texts and all(set(t) <= set('"]}') for t in texts), texts


# ---- bad schemas: one line -------------------------------------------------------------------------------------


@pytest.mark.parametrize("schema, words", [
    ('{"type": "bogus"}', "bogus"),
    ('{"type": "string", "pattern": "("}', "unclosed"),
    ("[1, 2]", "must be an object"),
    ("{not json", "not valid JSON"),
])
def test_bad_schema_is_one_line_naming_the_file(tmp_path, schema, words):
    path = tmp_path / "schema.json"
    path.write_text(schema)
    with pytest.raises(VilaEdgeError) as e:
        read_schema_file(path)
    msg = str(e.value)
    assert str(path) in msg and words in msg and "\n" not in msg
    with pytest.raises(VilaEdgeError, match="cannot read"):
        read_schema_file(tmp_path / "missing.json")


def test_sampling_params_checks_and_canonicalizes_the_schema():
    a = SamplingParams(json_schema={"type": "object", "properties": {"a": {"type": "boolean"}}})
    b = SamplingParams(json_schema='{"properties": {"a": {"type": "boolean"}}, "type": "object"}')
    assert a.json_schema == b.json_schema and a == b
    with pytest.raises(VilaEdgeError, match="json_schema: unsupported or invalid"):
        SamplingParams(json_schema={"type": 3})
    with pytest.raises(VilaEdgeError, match="ignore_eos"):
        SamplingParams(json_schema={"type": "object"}, ignore_eos=True)
    with pytest.raises(VilaEdgeError, match="stop string could cut the JSON"):
        SamplingParams(json_schema={"type": "object"}, stop=("}",))


# ---- the whole pipeline on the tiny engines ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pipelines(runtime_engine, tiny_checkpoint, tmp_path_factory):  # noqa: F811
    import shutil

    from vila_edge.builder import torch_weights as tw
    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.runtime import load

    pipes = {"ort-fp32": load(runtime_engine("nvila"), threads=1), "ort-int4": load(runtime_engine("vila1.5", "int4"),
                                                                                   threads=1)}
    try:
        import torch  # noqa: F401

        dst = tmp_path_factory.mktemp("structured-torch") / "nvila"
        shutil.copytree(runtime_engine("nvila", "int4"), dst)
        tw.write_torch_weights(dst, load_checkpoint(tiny_checkpoint("nvila")))
        pipes["torch-int4"] = load(dst, threads=1, vision_backend="torch", llm_backend="torch")
    except ImportError:  # the export extra is not installed: the ORT engines still run
        pass
    yield pipes
    for p in pipes.values():
        p.close()


@pytest.mark.parametrize("backend", ["ort-fp32", "ort-int4", "torch-int4"])
@settings(max_examples=ENGINE_EXAMPLES, **_FUZZ)
@given(schema=SCHEMAS, seed=st.integers(0, 2**16), temperature=st.sampled_from([0.0, 0.8]))
def test_engine_answers_are_schema_valid(pipelines, backend, schema, seed, temperature):
    if backend not in pipelines:
        pytest.skip("torch is not installed (export extra)")
    pipe = pipelines[backend]
    r = pipe.generate("Fill in the form.", max_new_tokens=300, temperature=temperature, seed=seed, json_schema=schema)
    assert r.finish_reason == "stop", r
    check_valid(r.text, schema)
    assert r.token_ids[-1] not in pipe.config.llm.stop_token_ids  # ended by the grammar, no step spent on a stop


def test_streamed_json_equals_the_whole_answer_and_plain_answers_are_unchanged(pipelines):
    pipe = pipelines["ort-fp32"]
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["colour", "count"], "additionalProperties": False}
    whole = pipe.generate("What is it?", max_new_tokens=60, json_schema=schema)
    streamed = "".join(pipe.generate("What is it?", max_new_tokens=60, json_schema=schema, stream=True))
    assert streamed == whole.text
    assert check_valid(whole.text, schema)["colour"] in ("red", "green", "blue")
    # no schema: exactly the tokens the unconstrained loop gave before this change (greedy is deterministic)
    plain = pipe.generate("What is it?", max_new_tokens=20)
    assert pipe.generate("What is it?", max_new_tokens=20).token_ids == plain.token_ids
    assert not plain.text.startswith('{"colour"')


def test_json_object_mode_in_a_conversation(pipelines):
    pipe = pipelines["ort-fp32"]
    conv = pipe.chat()
    for q in ("First?", "Second?"):
        r = conv.ask(q, max_new_tokens=200, temperature=0.7, seed=3, json_schema={"type": "object"})
        if r.finish_reason == "stop":
            assert isinstance(json.loads(r.text), dict)
        else:  # a random model may write one long string value: cut, and said so
            assert r.finish_reason == "length" and cut_note(r)


# ---- CLI ------------------------------------------------------------------------------------------------------


def test_cli_json_schema(runtime_engine, tmp_path):  # noqa: F811
    import subprocess
    import sys

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                                "additionalProperties": False}))
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"x": {"type": "strnig"}}}')
    cmd = [sys.executable, "-m", "vila_edge.cli", "chat", str(runtime_engine("nvila")), "--prompt", "ok?",
           "--threads", "1"]
    r = subprocess.run(cmd + ["--json-schema", str(good)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] in (True, False)
    r = subprocess.run(cmd + ["--json-schema", str(bad)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and str(bad) in r.stderr and "strnig" in r.stderr


# ---- the server: response_format --------------------------------------------------------------------------------


def test_server_response_format(runtime_engine):  # noqa: F811
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from vila_edge.serve import BackgroundServer
    from vila_edge.serve.app import ServeSettings, create_app
    from vila_edge.serve.engine import PipelineEngine

    schema = {"type": "object", "properties": {"person": {"type": "boolean"},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 5}},
              "required": ["person", "count"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "Is there a person?"}]
    engine = PipelineEngine.load(runtime_engine("nvila"), model_id="tiny-nvila")
    with BackgroundServer(create_app(engine, ServeSettings())) as srv:
        url = srv.url + "/v1/chat/completions"
        fmt = {"type": "json_schema", "json_schema": {"name": "door", "schema": schema, "strict": True}}
        r = httpx.post(url, json={"messages": msgs, "response_format": fmt, "max_tokens": 60}, timeout=120)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"
        whole = check_valid(choice["message"]["content"], schema)

        body = {"messages": msgs, "response_format": fmt, "max_tokens": 60, "stream": True}
        pieces = []
        with httpx.stream("POST", url, json=body, timeout=120) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    pieces.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
        assert json.loads("".join(pieces)) == whole  # streaming still works, same greedy answer

        r = httpx.post(url, json={"messages": msgs, "response_format": {"type": "json_object"}, "max_tokens": 60,
                                  "temperature": 0.5, "seed": 1}, timeout=120)
        c = r.json()["choices"][0]
        assert c["finish_reason"] == "length" or isinstance(json.loads(c["message"]["content"]), dict)

        for rf, param in [({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}},
                           "response_format.json_schema.schema"),
                          ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema"),
                          ({"type": "xml"}, "response_format"), ("json", "response_format")]:
            r = httpx.post(url, json={"messages": msgs, "response_format": rf}, timeout=30)
            assert r.status_code == 400, (rf, r.text)
            assert r.json()["error"]["param"] == param
        r = httpx.post(url, json={"messages": msgs, "response_format": fmt, "stop": ["}"]}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text

        # a budget too small for the answer: the runtime closes the JSON, the server says "length"
        loose = {"type": "json_schema", "json_schema": {"name": "note", "schema": {
            "type": "object", "properties": {"note": {"type": "string", "minLength": 40}}, "required": ["note"]}}}
        r = httpx.post(url, json={"messages": msgs, "response_format": loose, "max_tokens": 30}, timeout=120)
        c = r.json()["choices"][0]
        assert c["finish_reason"] == "length", c
        if c["message"]["content"].endswith("}"):
            assert len(json.loads(c["message"]["content"])["note"]) >= 40
