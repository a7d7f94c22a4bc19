"""Conversation templates, media markers and stop tokens (reference doc §5.2-§5.4)."""

import pytest

from vila_edge.checkpoint import load_checkpoint
from vila_edge.prompt import Message, infer_stop_tokens, render, tokenize, user_content


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint("vila1.5"))


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint("nvila-lite"))


def test_vicuna_multi_turn(llama):
    msgs = [Message("user", "<image>\nHi"), Message("assistant", "Hello."), Message("user", "More?")]
    text = render("vicuna_v1", msgs, llama.tokenizer)
    assert text.endswith("USER: <image>\nHi ASSISTANT: Hello.</s>USER: More? ASSISTANT:")


def test_llama3_and_hermes(llama):
    t3 = render("llama_3", [Message("user", "Q")], llama.tokenizer)
    assert t3.endswith("<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\n")
    h = render("hermes-2", [Message("user", "Q")], llama.tokenizer)
    assert h == "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nQ<|im_end|><|im_start|>assistant\n"


def test_auto_uses_checkpoint_template(qwen):
    text = render("auto", [Message("user", "<image>Q")], qwen.tokenizer)
    assert text == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n<image>Q<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert infer_stop_tokens("auto", qwen.tokenizer) == [qwen.tokenizer.token_to_id("<|im_end|>")]


def test_media_markers_per_family(llama, qwen, tiny_checkpoint):
    assert user_content(llama.config, "Describe.", n_images=2) == "<image>\n<image>\nDescribe."
    assert user_content(llama.config, "x", video=True, n_frames=3) == "<image>\n" * 3 + "x"
    # NVILA-Lite with one image: one "<image>\n" per tile; several images: one "<image>" each
    assert user_content(qwen.config, "Q", n_images=1, n_tiles=3) == "<image>\n<image>\n<image>\nQ"
    assert user_content(qwen.config, "Q", n_images=2) == "<image><image>Q"
    nvila = load_checkpoint(tiny_checkpoint("nvila"))
    assert user_content(nvila.config, "Q", n_images=1, n_tiles=17) == "<image>Q"
    assert user_content(nvila.config, "Q", video=True) == "<vila/video>Q"
    # a literal marker typed by the user is not a media slot
    assert user_content(nvila.config, "a <image> b", n_images=0) == "a  b"


def test_head_tokenization_uses_media_token_ids(qwen):
    text = render("auto", [Message("user", "<image>\n<image>\nQ")], qwen.tokenizer)
    ids = tokenize(qwen.config, qwen.tokenizer, text)
    assert ids.count(qwen.config.llm.media_token_ids["image"]) == 2
    assert ids[0] == qwen.tokenizer.token_to_id("<|im_start|>")  # Qwen2 adds no BOS


def test_sentencepiece_only_tokenizer_is_converted(tmp_path):
    """VILA1.5's llm/ may ship only tokenizer.model: converted as transformers does with legacy=False, and
    encoding equals the slow SentencePiece tokenizer VILA1.5 was trained with (use_fast=False)."""
    import json

    spm = pytest.importorskip("sentencepiece")
    from transformers import AutoTokenizer

    from vila_edge.testing import corpus_text
    from vila_edge.tokenizer import Tokenizer

    (tmp_path / "corpus.txt").write_text(corpus_text(60_000))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"), vocab_size=500, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True, minloglevel=2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "legacy": False,
         "tokenizer_class": "LlamaTokenizer"}))
    tok = Tokenizer.from_dir(tmp_path)
    slow = AutoTokenizer.from_pretrained(str(tmp_path), use_fast=False, legacy=False)
    for text in ["\nDescribe the image.", "USER: ", " ASSISTANT:", "naïve café 123"]:
        assert tok.encode(text) == slow(text).input_ids, text
    assert tok.encode("\n")[0] == 1 and tok.adds_bos
