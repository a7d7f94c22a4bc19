"""Speculative decoding by prompt lookup: the decoder's logits_to_keep input, the drafter, and the loop's
exactness (the same tokens as plain greedy decoding, the same KV cache after every token)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest_runtime import runtime_engine  # noqa: F401  (session fixture shared by the runtime tests)

from vila_edge.generate import (
    DraftStats,
    PromptLookup,
    SamplingParams,
    decode_one_token,
    generate_tokens,
    speculative_tokens,
)

pytest.importorskip("torch")


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    draft = PromptLookup(num_draft=3, max_ngram=3, min_ngram=2)
    assert draft([1, 2, 3, 4, 5, 6, 9, 2, 3]) == [4, 5, 6]  # 2-gram [2, 3] after 3-gram [9, 2, 3] misses
    assert draft([1, 2, 3, 7, 1, 2, 3, 8, 1, 2, 3]) == [8, 1, 2]  # the latest occurrence wins
    assert draft([1, 2, 3, 4, 1, 2], limit=1) == [3]
    assert draft([5, 6, 7, 8]) == []  # no repeat: no draft
    assert draft([1, 2, 9, 2]) == []  # a 1-gram match is below min_ngram
    assert PromptLookup(num_draft=2, min_ngram=1)([1, 2, 9, 2]) == [9, 2]
    assert draft([1, 2, 1, 2]) == [1, 2]  # a match may run into the tail itself
    with pytest.raises(ValueError):
        PromptLookup(min_ngram=3, max_ngram=2)


def test_add_logits_to_keep_on_a_last_position_graph(tmp_path):
    """The rewrite of a builder-style last-position head: logits_to_keep=1 gives the same logits, k the last k
    positions, equal to an unpruned head; a second rewrite is a no-op."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from vila_edge.builder.decoder_onnx import add_logits_to_keep

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 11)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Gather", ["x", "m1"], ["g"], name="/lm_head/prune/Gather", axis=1),
        helper.make_node("Unsqueeze", ["g", "one"], ["u"], name="/lm_head/prune/Unsqueeze"),
        helper.make_node("MatMul", ["u", "w"], ["logits"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 1, 11])],
                              # genai's builder keeps the index as an initializer, the axes as a Constant
                              initializer=[numpy_helper.from_array(weight, "w"),
                                           numpy_helper.from_array(np.array(-1, np.int64), "m1")])
    path = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
    x = rng.standard_normal((1, 5, 8)).astype(np.float32)
    before = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    assert add_logits_to_keep(path) is True
    assert add_logits_to_keep(path) is False
    rewritten = onnx.load(str(path))
    # nothing the old head read is left behind (ONNX Runtime warns on stderr about each orphan at every load)
    assert [i.name for i in rewritten.graph.initializer] == ["w"]
    assert [n.op_type for n in rewritten.graph.node if n.op_type in ("Gather", "Unsqueeze")] == []
    assert not [n for n in rewritten.graph.node if n.op_type == "Constant" and n.output[0] in ("m1", "one")]
    session = ort.InferenceSession(str(path))
    assert "logits_to_keep" in [i.name for i in session.get_inputs()]
    np.testing.assert_array_equal(session.run(None, {"x": x, "logits_to_keep": np.array([1], np.int64)})[0], before)
    three = session.run(None, {"x": x, "logits_to_keep": np.array([3], np.int64)})[0]
    np.testing.assert_allclose(three[0], x[0, -3:] @ weight, rtol=1e-5, atol=1e-5)


def _engine(runtime_engine):  # noqa: F811
    from vila_edge.backends.ort_llm import OrtLLMEngine

    return OrtLLMEngine(runtime_engine("nvila") / "llm", threads=1)


def test_built_decoder_forward_all_equals_one_position_at_a_time(runtime_engine):  # noqa: F811
    """A built decoder has the logits_to_keep input: forward_all's rows are the logits forward gives one
    position at a time (tolerance: float32 reassociation between a 1-row and a 6-row run)."""
    a, b = _engine(runtime_engine), _engine(runtime_engine)
    assert a.can_forward_all and a.keep_input == "logits_to_keep"
    prompt = a.embed(list(range(3, 20)))
    np.testing.assert_array_equal(a.forward(prompt), b.forward(prompt))
    ids = [5, 9, 13, 2, 7, 11]
    rows = a.forward_all(ids, a.embed(ids))
    assert rows.shape == (6, a.vocab_size) and a.length == b.length + 6
    one_by_one = np.stack([b.forward(b.embed([i])) for i in ids])
    np.testing.assert_allclose(rows, one_by_one, rtol=0, atol=1e-4)
    a.truncate(b.length - 3)  # roll back three positions, then decode the same: the cache is right
    b.truncate(b.length - 3)
    np.testing.assert_allclose(a.forward(a.embed([4])), b.forward(b.embed([4])), rtol=0, atol=1e-4)


@pytest.mark.parametrize("penalty,budget", [(1.0, None), (1.3, None), (1.0, "cheap")])
def test_speculative_loop_yields_the_greedy_tokens_with_the_same_cache(runtime_engine, penalty, budget):  # noqa: F811
    """On a prompt that repeats itself, prompt lookup drafts, some drafts are accepted and some rejected,
    and every yielded token, finish and cache length equals plain greedy decoding's (also with a DraftBudget
    cutting drafts short: runs cost the same here, so it verifies the part its acceptance says pays)."""
    from vila_edge.generate import DraftBudget, Sampler

    budget = DraftBudget(measure=False, run_cost={w: 1.0 + 0.05 * (w - 1) for w in range(2, 8)}) if budget else None

    params = SamplingParams(repetition_penalty=penalty)
    prompt_ids = [7, 8, 9, 10, 11, 12] * 4 + [7, 8, 9]
    plain, spec = _engine(runtime_engine), _engine(runtime_engine)
    runs = {}
    stats = DraftStats()
    for name, eng in (("plain", plain), ("spec", spec)):
        logits = eng.forward(eng.embed(prompt_ids))
        sampler = Sampler(params, eng.vocab_size)
        if name == "plain":
            loop = generate_tokens(logits, lambda t, e=eng: decode_one_token(e, t), sampler, max_new_tokens=40)
        else:
            loop = speculative_tokens(logits, eng, sampler, PromptLookup(4, min_ngram=1), prompt_ids,
                                      max_new_tokens=40, stats=stats, budget=budget)
        runs[name] = [(token, finish, eng.length) for token, finish in loop]
    assert [r[:2] for r in runs["spec"]] == [r[:2] for r in runs["plain"]]
    # the cache runs ahead while drafts are confirmed, by at most the drafts; at the end it is the same
    assert all(0 <= s[2] - p[2] <= 4 for s, p in zip(runs["spec"], runs["plain"], strict=True))
    assert runs["spec"][-1][2] == runs["plain"][-1][2] == plain.length == spec.length
    assert stats.accepted > 0 and stats.drafted > stats.accepted  # both paths of the loop ran
    assert stats.steps < 39  # fewer decoder runs than tokens after the first


LITE_2_CORES = {2: 1.32, 3: 1.74, 4: 1.98, 5: 2.24}  # run cost in steps, nvila-lite-2b int4 (speculative_decode.md)


def test_draft_budget_verifies_what_pays():
    """Tokens per cost: 1 + a + ... + a^k over c(k + 1), against a plain step's 1."""
    from vila_edge.generate import DraftBudget

    budget = DraftBudget(measure=False, run_cost=LITE_2_CORES, memory=1.0)
    assert budget.acceptance == pytest.approx(0.6)
    assert budget.choose(4) == 1  # 1.6 / 1.32 = 1.21 beats 1.96 / 1.74, 2.18 / 1.98, 2.31 / 2.24
    for _ in range(10):
        budget.resolve(4, 4)  # every draft right: a -> 43 / 43 = 0.96
    assert budget.choose(4) == 4 and budget.choose(2) == 2
    budget.new_answer()
    for _ in range(10):
        budget.resolve(4, 0)  # first answers: wrong at once, a -> 1.8 / 13 = 0.14
    assert budget.choose(4) == 0  # 1.14 / 1.32 < 1: a plain step
    aging = DraftBudget(measure=False, run_cost=LITE_2_CORES, memory=0.9)
    for _ in range(10):
        aging.resolve(4, 0)
    decisions = [aging.choose(4) for _ in range(40)]
    assert decisions[0] == 0 and decisions[-1] == 1  # the bad stretch ages out: drafting is tried again
    free = DraftBudget(measure=False, run_cost={})
    assert free.cost(5) == pytest.approx(1 + 4 * free.prior_cost)


def test_draft_budget_times_its_runs():
    from vila_edge.generate import DraftBudget

    budget = DraftBudget()
    assert budget.cost(3) == pytest.approx(1 + 2 * budget.prior_cost)  # nothing timed yet
    budget.observe_run(1, 0.010)
    budget.observe_run(3, 0.016)
    assert budget.cost(3) == pytest.approx(1.6)
    assert budget.cost(5) == pytest.approx(1 + 4 * 0.3)  # the measured extra cost per position, 0.3
    budget.observe_run(1, 0.020)  # an EMA: 0.8 x 10 ms + 0.2 x 20 ms
    assert budget.run_seconds[1] == pytest.approx(0.012)
    budget.observe_run(2, 0.001)  # noise below a step's time is a step's cost, not less
    assert budget.cost(2) == 1.0


def test_draft_budget_skips_drafts_that_cannot_pay(runtime_engine):  # noqa: F811
    """Runs priced far above what a draft can return: no verification at all, the plain greedy tokens."""
    from vila_edge.generate import DraftBudget, Sampler

    prompt_ids = [7, 8, 9, 10, 11, 12] * 4 + [7, 8, 9]
    eng = _engine(runtime_engine)
    plain = [t for t, _ in generate_tokens(eng.forward(eng.embed(prompt_ids)), lambda t: decode_one_token(eng, t),
                                           Sampler(SamplingParams(), eng.vocab_size), max_new_tokens=20)]
    eng.reset()
    stats = DraftStats()
    budget = DraftBudget(measure=False, run_cost={w: 10.0 * w for w in range(2, 8)})
    loop = speculative_tokens(eng.forward(eng.embed(prompt_ids)), eng, Sampler(SamplingParams(), eng.vocab_size),
                              PromptLookup(4, min_ngram=1), prompt_ids, max_new_tokens=20, stats=stats, budget=budget)
    assert [t for t, _ in loop] == plain
    assert stats.verifications == 0 and stats.steps == 19


def test_speculative_loop_closed_early_leaves_the_plain_cache(runtime_engine):  # noqa: F811
    from vila_edge.generate import Sampler

    prompt_ids = [7, 8, 9, 10] * 6
    eng = _engine(runtime_engine)
    start = eng.length + len(prompt_ids)
    loop = speculative_tokens(eng.forward(eng.embed(prompt_ids)), eng, Sampler(SamplingParams(), eng.vocab_size),
                              PromptLookup(6, min_ngram=1), prompt_ids, max_new_tokens=50)
    for k, _ in enumerate(loop, 1):
        if k == 5:
            break
    loop.close()
    assert eng.length == start + 4  # the prompt and every token but the last, as generate_tokens leaves it


def test_pipeline_prompt_lookup_answer_equals_greedy_answer(runtime_engine):  # noqa: F811
    """Through the runtime (chat conversation, two turns): the same answers with prompt lookup on, and the
    drafts are counted in the timings."""
    import vila_edge

    pipe = vila_edge.load(runtime_engine("nvila"), device="cpu", threads=1)
    text = "Repeat after me: the red fox jumps over the red fox jumps over the red fox."
    answers = {}
    for lookup in (0, 4):
        chat = pipe.chat()
        first = chat.ask(text, max_new_tokens=24, prompt_lookup=lookup)
        second = chat.ask("Again: the red fox jumps over", max_new_tokens=16, prompt_lookup=lookup)
        answers[lookup] = [(r.token_ids, r.finish_reason) for r in (first, second)]
        if lookup:
            assert first.timings.drafted_tokens + second.timings.drafted_tokens > 0
    assert answers[4] == answers[0]


def test_prompt_lookup_param_is_checked():
    from vila_edge.errors import VilaEdgeError

    with pytest.raises(VilaEdgeError, match="prompt_lookup"):
        SamplingParams(prompt_lookup=-1)
    with pytest.raises(VilaEdgeError, match="prompt_lookup"):
        SamplingParams(prompt_lookup=99)


def test_chat_cli_prompt_lookup(runtime_engine):  # noqa: F811
    """`chat --prompt-lookup N` answers like plain greedy on the fp32 tiny engine; an out-of-range N is one
    usage line, exit 2."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "vila_edge.cli", "chat", str(runtime_engine("nvila")), "--prompt",
           "the fox the fox the fox", "--threads", "1", "--max-new-tokens", "20"]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lookup = subprocess.run(cmd + ["--prompt-lookup", "4"], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and lookup.returncode == 0, lookup.stderr
    assert lookup.stdout == plain.stdout
    bad = subprocess.run(cmd + ["--prompt-lookup", "99"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "prompt-lookup" in bad.stderr
