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
