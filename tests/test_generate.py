"""Sampling, incremental detokenization and stop strings (vila_edge.generate)."""

from __future__ import annotations

import numpy as np
import pytest

from vila_edge.errors import VilaEdgeError
from vila_edge.generate import IncrementalDetokenizer, Sampler, SamplingParams, StopStrings, decode_stream, mask_logits

TEXT = "héllo wörld — 世界 😀 naïve café ∑ ok"


def _tokenizer(tiny_checkpoint, family):
    from vila_edge.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint(family)).tokenizer


@pytest.mark.parametrize("family", ["nvila", "vila1.5"])  # byte-level BPE (Qwen2) / byte fallback (Llama SP)
def test_detokenizer_never_emits_half_a_character(tiny_checkpoint, family):
    tok = _tokenizer(tiny_checkpoint, family)
    ids = tok.encode(TEXT, add_special_tokens=False)
    # the point of the test: some characters really are split across several tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces = list(decode_stream(tok, ids))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    assert "世界" in "".join(pieces) and "😀" in "".join(pieces)


def test_detokenizer_holds_incomplete_bytes_until_the_character_completes(tiny_checkpoint):
    tok = _tokenizer(tiny_checkpoint, "nvila")
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1
    det = IncrementalDetokenizer(tok)
    out = [det.push(i) for i in ids]
    assert out[:-1] == [""] * (len(ids) - 1) and out[-1] == "😀"
    assert det.flush() == ""


def test_detokenizer_flushes_a_trailing_partial_character(tiny_checkpoint):
    tok = _tokenizer(tiny_checkpoint, "nvila")
    ids = tok.encode("ab😀", add_special_tokens=False)[:-1]  # cut inside the emoji
    det = IncrementalDetokenizer(tok)
    text = "".join(det.push(i) for i in ids) + det.flush()
    assert text == tok.decode(ids)


def test_detokenizer_skips_special_tokens(tiny_checkpoint):
    tok = _tokenizer(tiny_checkpoint, "nvila")
    end = tok.token_to_id("<|im_end|>")
    ids = tok.encode("hi there", add_special_tokens=False) + [end]
    assert "".join(decode_stream(tok, ids)) == "hi there"


def test_stop_strings_never_stream_a_stop_prefix():
    s = StopStrings(("STOP",))
    out = [s.feed(d) for d in ["hello S", "T", "O", "P and more"]]
    assert "".join(out) == "hello " and s.hit == "STOP" and s.text == "hello "
    s2 = StopStrings(("STOP",))
    text = "".join(s2.feed(d) for d in ["abc ST", "ART"]) + s2.feed("", final=True)
    assert text == "abc START" and s2.hit is None


# ---- sampler --------------------------------------------------------------------------------


def test_masks_untrained_and_extra_ids():
    logits = np.zeros(12, np.float32)
    logits[10] = 100  # beyond the trained vocabulary (resized rows)
    logits[3] = 50  # an added media/sentinel id
    logits[5] = 1
    x = mask_logits(logits, 10, (3,))
    assert x.shape == (10,) and x[3] == -np.inf
    assert Sampler(SamplingParams(), 10, (3,))(logits) == 5
    s = Sampler(SamplingParams(temperature=1.0, seed=0), 10, (3,))
    assert all(s(logits) not in (3, 10, 11) for _ in range(50))


def test_repetition_penalty_follows_hf():
    logits = np.array([2.0, -2.0, 1.0], np.float32)
    x = Sampler(SamplingParams(repetition_penalty=2.0), 3).processed(logits, [0, 1])
    np.testing.assert_allclose(x, [1.0, -4.0, 1.0])


def test_top_k_and_top_p_filter():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    k = Sampler(SamplingParams(temperature=1.0, top_k=2), 4).processed(logits)
    assert np.isfinite(k).tolist() == [True, True, False, False]
    p = Sampler(SamplingParams(temperature=1.0, top_p=0.7), 4).processed(logits)
    assert np.isfinite(p).tolist() == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    p = Sampler(SamplingParams(temperature=1.0, top_p=0.5), 4).processed(logits)
    assert np.isfinite(p).tolist() == [True, False, False, False]


def test_seeded_sampling_reproducible():
    logits = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    a = Sampler(SamplingParams(temperature=1.0, seed=42), 100)
    b = Sampler(SamplingParams(temperature=1.0, seed=42), 100)
    c = Sampler(SamplingParams(temperature=1.0, seed=43), 100)
    draws_a = [a(logits) for _ in range(20)]
    assert draws_a == [b(logits) for _ in range(20)]
    assert draws_a != [c(logits) for _ in range(20)]


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1),
                                 dict(repetition_penalty=0)])
def test_bad_sampling_params(bad):
    with pytest.raises(VilaEdgeError):
        SamplingParams(**bad)
