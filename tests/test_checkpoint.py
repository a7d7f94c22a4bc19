"""Loading every fixture family, the reference forward on each, and every bad-input error."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES
from safetensors.torch import load_file, save_file

from vila_edge.checkpoint import load_checkpoint
from vila_edge.errors import CheckpointError
from vila_edge.media.tiling import image_layout, preprocess_image
from vila_edge.prompt import Message, render, tokenize, user_content
from vila_edge.reference.model import ReferenceVILA
from vila_edge.reference.vision import build_siglip, full_model_features

CLI = [sys.executable, "-m", "vila_edge.cli"]


@pytest.mark.parametrize("family", FAMILIES)
def test_families_resolve(tiny_checkpoint, family):
    ckpt = load_checkpoint(tiny_checkpoint(family))
    cfg = ckpt.config
    assert cfg.family == family
    if family.startswith("vila1.5"):
        assert (cfg.generation, cfg.splice, cfg.projector.token_order, cfg.llm.chat_format) == ("v15", "v15", "col", "vicuna_v1")
        assert cfg.llm.stop_token_ids == (ckpt.tokenizer.token_to_id("</s>"),)
    else:
        assert (cfg.generation, cfg.splice, cfg.projector.token_order, cfg.llm.chat_format) == ("nvila", "head", "row", "auto")
        assert cfg.llm.media_token_ids["image"] == ckpt.tokenizer.token_to_id("<image>")
        assert cfg.llm.end_token_ids == tuple(ckpt.tokenizer.encode("\n"))
        assert ckpt.tokenizer.token_to_id("<|im_end|>") in cfg.llm.stop_token_ids
    assert load_checkpoint(tiny_checkpoint(family), token_order="row").config.projector.token_order == "row"


def test_flat_hf_layout_equals_dev_layout(tiny_checkpoint):
    dev = load_checkpoint(tiny_checkpoint("nvila-lite"))
    hf = load_checkpoint(tiny_checkpoint("nvila-lite", "hf"))
    assert hf.layout == "hf" and dev.layout == "dev"
    assert hf.config.vision == dev.config.vision and hf.config.projector == dev.config.projector
    for part in ("vision_tower", "mm_projector"):
        a, b = dev.state_dict(part), hf.state_dict(part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_forward(tiny_checkpoint, family):
    import numpy as np
    from PIL import Image

    ckpt = load_checkpoint(tiny_checkpoint(family))
    ref = ReferenceVILA(ckpt)
    img = Image.fromarray((np.random.RandomState(0).rand(120, 250, 3) * 255).astype(np.uint8))
    tiles = preprocess_image(img, ckpt.config.vision)
    # truncated tower == upstream hidden_states[select_layer]
    x = torch.from_numpy(tiles.pixels[:2])
    siglip = build_siglip(ckpt.raw["vision"], ckpt.state_dict("vision_tower", torch.float32))
    assert torch.allclose(ref.tower(x), full_model_features(siglip, ckpt.config.vision, x), atol=1e-6)
    items = ref.image_items(tiles)
    layout = image_layout(ckpt.config, 250, 120)
    assert len(items) == layout.n_items and all(i.shape[0] == layout.feature_tokens for i in items)
    text = render(ckpt.config.llm.chat_format,
                  [Message("user", user_content(ckpt.config, "What is this?", n_images=1, n_tiles=tiles.n_items))],
                  ckpt.tokenizer)
    ids = tokenize(ckpt.config, ckpt.tokenizer, text)
    emb = ref.inputs_embeds(ids, items)
    n_marks = len(ids) - len([t for t in ids if t not in ref.media_ids()])
    assert n_marks == layout.n_items
    assert emb.shape[0] == len(ids) - n_marks + layout.n_items * (layout.feature_tokens + layout.end_tokens)
    logits = ref.logits(emb)
    assert logits.shape[-1] == ckpt.config.llm.vocab_size
    masked = list(ckpt.config.llm.extra_masked_ids)
    assert torch.isinf(logits[-1, masked]).all()
    keep = torch.ones(logits.shape[-1], dtype=torch.bool)
    keep[masked] = False
    assert torch.isfinite(logits[-1, keep]).all()


def test_v15_prompt_keeps_one_bos(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint("vila1.5"))
    text = render("vicuna_v1", [Message("user", "<image>\n<image>\nDescribe.")], ckpt.tokenizer)
    assert text.startswith("A chat between") and text.endswith("USER: <image>\n<image>\nDescribe. ASSISTANT:")
    ids = tokenize(ckpt.config, ckpt.tokenizer, text)
    assert ids.count(1) == 1 and ids[0] == 1
    assert ids.count(-200) == 2


def test_cli_info_on_every_family(tiny_checkpoint):
    for family in FAMILIES:
        r = subprocess.run([*CLI, "info", str(tiny_checkpoint(family)), "--json"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert data["family"] == family and data["params_total"] > 0
    r = subprocess.run([*CLI, "info", str(tiny_checkpoint("nvila", "hf"))], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---- bad input ------------------------------------------------------------------------------


def _edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_tensors(path, fn):
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


BAD_CASES = {
    "missing sub-folder": (lambda p: shutil.rmtree(p / "mm_projector"), "sub-folder missing"),
    "missing tensor": (lambda p: _edit_tensors(p / "mm_projector" / "model.safetensors", lambda t: t.pop("layers.2.weight")),
                       "'layers.2.weight' is missing"),
    "unexpected tensor": (lambda p: _edit_tensors(p / "vision_tower" / "model.safetensors", lambda t: t.update(extra=torch.ones(2))),
                          "unexpected tensor 'extra'"),
    "mis-shaped tensor": (lambda p: _edit_tensors(p / "mm_projector" / "model.safetensors",
                                                  lambda t: t.update({"layers.4.bias": torch.ones(7)})), "has shape \\[7\\]"),
    "truncated safetensors": (lambda p: (p / "llm" / "model.safetensors").write_bytes(
        (p / "llm" / "model.safetensors").read_bytes()[:-100]), "truncated"),
    "unknown tower": (lambda p: _edit_json(p / "vision_tower" / "config.json", architectures=["RADIOModel"]), "not supported"),
    "unknown projector": (lambda p: _edit_json(p / "mm_projector" / "config.json", mm_projector_type="mlp_downsample_7x7"),
                          "projector type"),
    "contradicting keys": (lambda p: _edit_json(p / "config.json", s2=True), "both true"),
    "bad config json": (lambda p: (p / "llm" / "config.json").write_text("{oops"), "invalid JSON"),
    "missing tokenizer": (lambda p: (p / "llm" / "tokenizer.json").unlink(), "tokenizer.json is missing"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_checkpoints_raise_checkpoint_error(checkpoint_copy, case):
    path = checkpoint_copy("nvila")
    breaker, message = BAD_CASES[case]
    breaker(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_cli_reports_one_line_and_exit_2(checkpoint_copy):
    path = checkpoint_copy("vila1.5")
    (path / "llm" / "model.safetensors").write_bytes(b"\x01\x00")
    r = subprocess.run([*CLI, "info", str(path)], capture_output=True, text=True)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.safetensors" in lines[0] and "Traceback" not in r.stderr
