"""CLIP and InternViT towers: preprocessing pixel-exact against the upstream rules, the loader (what it
accepts and refuses, in one line), the reference modules against independent formulations, the planner's
VILA1.5-40b preset, `vila-edge info` and `vila-edge fixture`.

ONNX parity per tower is in test_vision_builder.py (the "clip" and "intern" fixture families run the same
parity tests as SigLIP's, at the same tolerances); chat end to end against the reference in test_runtime.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from vila_edge.checkpoint import load_checkpoint
from vila_edge.errors import CheckpointError
from vila_edge.media.tiling import preprocess_image

torch = pytest.importorskip("torch")

SIZES = ((150, 100), (100, 150), (57, 300), (56, 56), (333, 251), (40, 30))
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _image(w, h, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _normalise(u8: np.ndarray, mean, std) -> np.ndarray:
    """HWC uint8 -> CHW float32, written out: u8 / 255 in float32, minus mean, over std."""
    x = u8.astype(np.float32) / np.float32(255)
    return ((x - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)


# ---- preprocessing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("w,h", SIZES)
def test_clip_crop_is_shortest_side_resize_then_centre_crop(tiny_checkpoint, w, h):
    """The rule written independently: short side -> S (long side scaled, truncated), Pillow bicubic, the
    centred S x S window (offsets floored), CLIP mean/std."""
    cfg = load_checkpoint(tiny_checkpoint("clip")).config
    s = cfg.vision.image_size
    assert cfg.vision.tiling == "crop" and cfg.vision.image_mean == CLIP_MEAN and cfg.vision.image_std == CLIP_STD
    img = _image(w, h, seed=w + h)
    scale = s / min(w, h)
    nw, nh = (s, int(h * scale)) if w <= h else (int(w * scale), s)
    # int(s * long / short) and int(long * (s / short)) agree on these sizes; the runtime uses upstream's order
    assert (nw, nh) == ((s, int(s * h / w)) if w <= h else (int(s * w / h), s))
    u8 = np.asarray(img.resize((nw, nh), Image.BICUBIC))
    top, left = (nh - s) // 2, (nw - s) // 2
    want = _normalise(u8[top:top + s, left:left + s], CLIP_MEAN, CLIP_STD)
    got = preprocess_image(img, cfg.vision).pixels
    assert got.shape == (1, 3, s, s)
    assert np.array_equal(got[0], want)


@pytest.mark.parametrize("w,h", SIZES)
def test_clip_preprocessing_equals_transformers_clip_image_processor(tiny_checkpoint, w, h):
    """VILA's process_image with CLIPImageProcessor (its PIL backend, what transformers 4.x ran): 'square'
    hands the image to the processor; 'resize' squeezes it to the crop size first; 'pad' pastes it on a
    square of int(mean*255) first. All three, byte for byte."""
    proc_mod = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    from dataclasses import replace

    from vila_edge.media.tiling import expand_to_square

    cfg = load_checkpoint(tiny_checkpoint("clip")).config
    s = cfg.vision.image_size
    pre = json.loads((tiny_checkpoint("clip") / "vision_tower" / "preprocessor_config.json").read_text())
    proc = proc_mod.CLIPImageProcessorPil(**{k: v for k, v in pre.items() if k != "image_processor_type"})
    img = _image(w, h, seed=7 * w + h)

    def processor(im):
        return np.asarray(proc.preprocess(im, return_tensors="np")["pixel_values"][0])

    fill = tuple(int(m * 255) for m in CLIP_MEAN)
    upstream = {"crop": processor(img), "resize": processor(img.resize((s, s))),
                "pad": processor(expand_to_square(img, fill))}
    for tiling, want in upstream.items():
        got = preprocess_image(img, replace(cfg.vision, tiling=tiling)).pixels[0]
        assert np.array_equal(got, want), tiling


@pytest.mark.parametrize("w,h", SIZES)
def test_intern_preprocessing_is_resize_then_imagenet_normalisation(tiny_checkpoint, w, h):
    """intern_encoder.py::build_transform after process_image's resize: torchvision Resize((S, S), BICUBIC) on
    a PIL image is Pillow's bicubic resize (a no-op copy at the same size), ToTensor is u8 / 255 in float32,
    Normalize subtracts and divides in float32 (torchvision is not installed here: its steps written in torch)."""
    cfg = load_checkpoint(tiny_checkpoint("intern")).config
    s = cfg.vision.image_size
    img = _image(w, h, seed=3 * w + h)
    x = torch.from_numpy(np.array(img.resize((s, s)).resize((s, s), Image.BICUBIC))).permute(2, 0, 1)
    x = x.to(torch.float32).div(255)
    x = x.sub(torch.tensor([0.485, 0.456, 0.406])[:, None, None]).div(torch.tensor([0.229, 0.224, 0.225])[:, None, None])
    got = preprocess_image(img, cfg.vision).pixels[0]
    assert np.array_equal(got, x.numpy())


# ---- loader ----------------------------------------------------------------------------------------------


def test_clip_and_intern_fixtures_load_as_vila_does(tiny_checkpoint):
    clip = load_checkpoint(tiny_checkpoint("clip")).config
    assert (clip.vision.tower, clip.vision.class_token, clip.vision.layers_used) == ("clip", True, 2)
    assert clip.vision.tokens_per_tile == 16 and clip.vision.sequence_length == 17  # 4x4 patches + CLS, CLS dropped
    assert clip.projector.type == "mlp2x_gelu" and clip.tokens_per_tile == 16
    intern = load_checkpoint(tiny_checkpoint("intern")).config
    v = intern.vision
    assert (v.tower, v.tiling, v.select_layer, v.layers_used, v.select_feature) == ("intern", "resize", -1, 3, "patch")
    assert (v.qkv_bias, v.qk_normalization) == (False, True)
    assert intern.tokens_per_tile == 4  # 4x4 patches, 2x2 downsample
    assert intern.llm.chat_format == "hermes-2" and intern.projector.token_order == "col"


def _edit(path, part, **changes):
    f = path / part / "config.json" if part else path / "config.json"
    data = json.loads(f.read_text())
    data.update(changes)
    f.write_text(json.dumps(data))


def test_intern_normalisation_is_fixed_whatever_the_preprocessor_file_says(checkpoint_copy):
    path = checkpoint_copy("intern")
    pre = path / "vision_tower" / "preprocessor_config.json"
    pre.write_text(json.dumps({**json.loads(pre.read_text()), "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    v = load_checkpoint(path).config.vision
    assert v.image_mean == (0.485, 0.456, 0.406) and v.image_std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("family,part,changes,needle", [
    ("intern", "vision_tower", {"norm_type": "layer"}, "norm_type='layer'"),
    ("intern", None, {"image_aspect_ratio": "pad"}, "InternVisionPreprocessor has no image_mean"),
    ("intern", None, {"mm_vision_select_feature": "cls_patch"}, "needs a square token grid"),
    ("clip", None, {"s2": True, "s2_scales": "56,112", "s2_max_split_size": 56}, "s2=true needs image_aspect_ratio"),
    ("clip", None, {"image_aspect_ratio": "dynamic"}, "clip tower runs with image_aspect_ratio resize, pad or square"),
    ("clip", "vision_tower", {"architectures": ["RADIOModel"]}, "'RADIOModel' is not supported"),
])
def test_what_vila_would_not_run_is_refused_in_one_line(checkpoint_copy, family, part, changes, needle):
    path = checkpoint_copy(family)
    _edit(path, part, **changes)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_intern_weights_are_checked_by_name_and_shape(checkpoint_copy):
    from safetensors.torch import load_file, save_file

    path = checkpoint_copy("intern")
    f = path / "vision_tower" / "model.safetensors"
    w = load_file(str(f))
    del w["encoder.layers.1.attn.q_norm.weight"]
    save_file(w, str(f))
    with pytest.raises(CheckpointError, match="q_norm.weight' is missing"):
        load_checkpoint(path)
    _edit(path, "vision_tower", qk_normalization=False)  # now the file matches a tower without q/k norm ...
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'encoder\.layers\.\d\.attn\.[qk]_norm\.weight'"):
        load_checkpoint(path)  # ... except for the other layers' norms


def test_old_clip_files_with_position_ids_load(checkpoint_copy):
    """transformers < 4.31 saved CLIP's `position_ids` buffer in the weights file."""
    from safetensors.torch import load_file, save_file

    from vila_edge.reference.vision import load_tower

    path = checkpoint_copy("clip")
    f = path / "vision_tower" / "model.safetensors"
    w = load_file(str(f))
    w["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(w, str(f))
    assert load_tower(load_checkpoint(path))(torch.zeros(1, 3, 56, 56)).shape == (1, 16, 32)


def test_siglip_square_aspect_is_a_plain_resize(checkpoint_copy):
    path = checkpoint_copy("vila1.5")
    _edit(path, None, image_aspect_ratio="square")
    assert load_checkpoint(path).config.vision.tiling == "resize"


# ---- reference modules --------------------------------------------------------------------------------------


@pytest.mark.parametrize("feature", ["patch", "cls_patch"])
def test_clip_selected_features_equal_transformers_hidden_states(tiny_checkpoint, feature):
    """SelectedFeatures (embeddings, pre_layrnorm, the layers up to select_layer) against transformers'
    CLIPVisionModel(output_hidden_states=True)[select_layer] with VILA's feature_select."""
    from dataclasses import replace

    from vila_edge.reference.clip import build_clip
    from vila_edge.reference.vision import SelectedFeatures, full_model_features

    ckpt = load_checkpoint(tiny_checkpoint("clip"))
    v = replace(ckpt.config.vision, select_feature=feature)
    model = build_clip(ckpt.raw["vision"], ckpt.state_dict("vision_tower", torch.float32))
    assert model.config.hidden_act == "quick_gelu"
    x = torch.rand(2, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        got = SelectedFeatures(model, v)(x)
        want = full_model_features(model, v, x)
    assert got.shape == (2, v.tokens_per_tile, 32) and v.tokens_per_tile == (17 if feature == "cls_patch" else 16)
    assert torch.allclose(got, want, atol=1e-5)


def _intern_by_formula(sd: dict, x: torch.Tensor, heads: int, layers: int, eps: float) -> torch.Tensor:
    """InternViT written out once more, functionally, from modeling_intern_vit.py's equations."""
    import torch.nn.functional as F

    def rms(t, w):
        return w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps))

    e = F.conv2d(x, sd["embeddings.patch_embedding.weight"], sd["embeddings.patch_embedding.bias"], stride=14)
    h = torch.cat([sd["embeddings.class_embedding"].expand(x.shape[0], 1, -1), e.flatten(2).transpose(1, 2)], 1)
    h = h + sd["embeddings.position_embedding"]
    b, n, c = h.shape
    for k in range(layers):
        p = f"encoder.layers.{k}."
        q, key, v = F.linear(rms(h, sd[p + "norm1.weight"]), sd[p + "attn.qkv.weight"]).split(c, dim=-1)
        q, key = rms(q, sd[p + "attn.q_norm.weight"]), rms(key, sd[p + "attn.k_norm.weight"])  # over all heads
        q, key, v = (t.view(b, n, heads, -1).transpose(1, 2) for t in (q, key, v))
        a = F.scaled_dot_product_attention(q, key, v).transpose(1, 2).reshape(b, n, c)
        h = h + sd[p + "ls1"] * F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        m = F.gelu(F.linear(rms(h, sd[p + "norm2.weight"]), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        h = h + sd[p + "ls2"] * F.linear(m, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return h


def test_intern_reference_equals_its_equations_and_its_hidden_states(tiny_checkpoint):
    from vila_edge.reference.intern import build_intern
    from vila_edge.reference.vision import full_model_features, load_tower

    ckpt = load_checkpoint(tiny_checkpoint("intern"))
    v = ckpt.config.vision
    sd = ckpt.state_dict("vision_tower", torch.float32)
    x = torch.rand(3, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        got = load_tower(ckpt)(x)
        want = _intern_by_formula(sd, x, v.num_heads, v.layers_used, v.layer_norm_eps)[:, 1:]
        full = full_model_features(build_intern(ckpt.raw["vision"], v, sd), v, x)
    assert got.shape == (3, 16, 32)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got, full, atol=1e-6)
    assert float((got - want).abs().max()) < 1e-5 < float(got.abs().mean())  # not trivially zero


# ---- planner, info, fixtures -----------------------------------------------------------------------------


def test_vila15_40b_preset_geometry_and_where_it_fits():
    from vila_edge.plan import plan, vision_params
    from vila_edge.presets import preset_config, preset_tensors

    cfg = preset_config("vila1.5-40b")
    assert (cfg.vision.tower, cfg.vision.layers_used, cfg.vision.tokens_per_tile, cfg.tokens_per_tile) == ("intern", 45, 1024, 256)
    assert cfg.projector.in_features == 3200 and cfg.llm.hidden_size == 7168 and cfg.llm.chat_format == "hermes-2"
    tensors = preset_tensors("vila1.5-40b")
    assert tensors["mm_projector"]["layers.2.weight"] == (7168, 12800)
    assert 5.5e9 < vision_params(cfg)["tower"] < 5.6e9  # InternViT-6B at 45 layers
    assert plan("vila1.5-40b", "agx-orin-64gb").fits
    for small in ("orin-nano-8gb", "orin-nano-8gb-super", "orin-nx-8gb", "orin-nx-16gb", "agx-orin-32gb"):
        p = plan("vila1.5-40b", small)
        assert not p.fits and p.bigger_devices == ["agx-orin-64gb"], small


def test_plan_cli_refuses_the_40b_on_orin_nx_in_one_line():
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "vila_edge.cli", "plan", "vila1.5-40b", *args],
                              capture_output=True, text=True, timeout=120)

    r = cli("--device", "orin-nx-16gb")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: vila1.5-40b does not fit orin-nx-16gb") and r.stderr.count("\n") == 1
    ok = cli("--device", "agx-orin-64gb", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["fits"] is True


@pytest.mark.parametrize("family,label", [("clip", "CLIP"), ("intern", "InternViT")])
def test_info_names_the_tower(tiny_checkpoint, family, label):
    from typer.testing import CliRunner

    from vila_edge.cli import app

    r = CliRunner().invoke(app, ["info", str(tiny_checkpoint(family)), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["tower"] == label and data["tokens_per_tile"] == 16
    assert data["config"]["vision"]["tower"] == family
    assert data["image"]["feature_tokens"] == (16 if family == "clip" else 4)
    human = CliRunner().invoke(app, ["info", str(tiny_checkpoint(family))])
    assert human.exit_code == 0 and f"{label} 56px/14" in human.output


def test_fixture_cli_writes_loadable_clip_and_intern_checkpoints(tmp_path):
    from typer.testing import CliRunner

    from vila_edge.cli import app

    for family in ("clip", "intern"):
        r = CliRunner().invoke(app, ["fixture", family, str(tmp_path / family)])
        assert r.exit_code == 0, r.output
        assert sorted(p.name for p in (tmp_path / family).iterdir()) == ["config.json", "llm", "mm_projector", "vision_tower"]
        assert load_checkpoint(tmp_path / family).config.vision.tower == family
    bad = CliRunner().invoke(app, ["fixture", "clip", str(tmp_path / "hf"), "--layout", "hf"])
    assert bad.exit_code != 0 and not (tmp_path / "hf").exists()
    shutil.rmtree(tmp_path)
