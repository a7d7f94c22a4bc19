"""Tiling schemes: the registry covers every tiling the config loader produces, and each scheme's
answers agree with each other (layout vs tiles vs merge spec) and with upstream's PyTorch merges.

The runtime side (layout positions == what `Pipeline` produces) is in test_runtime.py, next to the
engine fixtures."""

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from vila_edge.config import TILINGS, config_from_dicts, detect_family
from vila_edge.errors import CheckpointError
from vila_edge.media.tiling import SCHEMES, image_layout, preprocess_image, tiling_scheme
from vila_edge.reference.s2 import dynamic_s2_merge, dynamic_s2_tokens, s2_merge, static_s2_merge

SIGLIP_56 = {"architectures": ["SiglipVisionModel"], "image_size": 56, "patch_size": 14, "hidden_size": 8,
             "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16}
CLIP_56 = {**SIGLIP_56, "architectures": ["CLIPVisionModel"]}  # "crop" is CLIP's processor default
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 500, "model_max_length": 4096}
TOPS = {  # one checkpoint per scheme; s2 with an output scale that is neither the first nor the last
    "resize": ({"image_aspect_ratio": "resize"}, 1, "mlp_downsample"),
    "pad": ({"image_aspect_ratio": "pad"}, 1, "linear"),
    "crop": ({"image_aspect_ratio": "square", "mm_vision_select_feature": "patch"}, 1, "mlp_downsample"),
    "s2": ({"image_aspect_ratio": "resize", "s2": True, "s2_scales": "56,112,168", "s2_max_split_size": 56,
            "s2_resize_output_to_scale_idx": 1}, 3, "mlp_downsample"),
    "dynamic": ({"image_aspect_ratio": "dynamic", "min_tiles": 1, "max_tiles": 6}, 1, "mlp_downsample_3x3_fix"),
    "dynamic_s2": ({"image_aspect_ratio": "dynamic_s2", "dynamic_s2": True, "s2_scales": "56,112,168",
                    "s2_max_split_size": 56, "s2_resize_output_to_scale_idx": -1, "max_tiles": 12}, 3, "mlp_downsample"),
}
SIZES = ((300, 150), (120, 200), (56, 56), (500, 60))


def make(tiling, end_ids=(198,)):
    top, n_scales, ptype = TOPS[tiling]
    return config_from_dicts(top={**top, "mm_hidden_size": 8 * n_scales, "hidden_size": 32}, llm=QWEN2,
                             vision=CLIP_56 if tiling == "crop" else SIGLIP_56, projector={"mm_projector_type": ptype},
                             preprocessor=None, name="x",
                             has_chat_template=True, where="config.json", tokens={"end_token_ids": end_ids})


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_registry_covers_every_tiling_the_loader_produces():
    produced = set()
    for aspect, s2, dyn in itertools.product((None, "resize", "pad", "square", "dynamic", "dynamic_s2", "anyres"),
                                             (False, True), (False, True)):
        top = {"image_aspect_ratio": aspect, "s2": s2, "dynamic_s2": dyn}
        try:
            produced.add(detect_family(top, "config.json")[1])
        except CheckpointError:
            pass
    assert produced == set(TILINGS) == set(SCHEMES)
    assert all(SCHEMES[name].name == name for name in SCHEMES)
    assert {tiling_scheme(make(t).vision).name for t in TOPS} == set(TILINGS)


def test_unknown_tiling_is_one_clear_error():
    cfg = make("resize")
    bad = type(cfg.vision)(**{**cfg.vision.__dict__, "tiling": "anyres"})
    with pytest.raises(CheckpointError, match="tiling 'anyres' is not one of"):
        tiling_scheme(bad)


@pytest.mark.parametrize("tiling", sorted(TOPS))
def test_layout_agrees_with_the_tiles(tiling):
    """What `layout` counts for a w x h image is what `tiles` cuts, for one image and for two."""
    cfg = make(tiling)
    for (w, h), n_images in itertools.product(SIZES, (1, 2)):
        tiles = preprocess_image(_image(w, h), cfg.vision, single=n_images == 1)
        lay = image_layout(cfg, w, h, n_images)
        assert (lay.n_tiles, lay.n_items, lay.block_size) == (tiles.pixels.shape[0], tiles.n_items, tiles.block_size)


@pytest.mark.parametrize("tiling", sorted(TOPS))
def test_merge_and_remerge_give_the_layouts_items(tiling):
    """The numpy merge reads exactly the tiles that were cut, and the re-merge after the projector
    (here the identity: rows are counted before the projector's k x k downsampling) groups its chunks
    into the layout's media items of `feature_tokens` rows."""
    cfg = make(tiling)
    scheme = tiling_scheme(cfg.vision)
    g, c = cfg.vision.grid, cfg.vision.hidden_size
    for (w, h), n_images in itertools.product(SIZES, (1, 2)):
        tiles = scheme.tiles(_image(w, h), single=n_images == 1)
        feats = np.random.default_rng(1).standard_normal((tiles.pixels.shape[0], g * g, c)).astype(np.float32)
        x = scheme.merge(feats, tiles)  # raises when the spec needs other tiles than were cut
        assert x.shape[-1] == cfg.vision.feature_width
        lay = image_layout(cfg, w, h, n_images)
        items = scheme.after_projector(x, tiles)
        per_item = x.shape[0] // lay.n_items
        assert len(items) == lay.n_items and all(len(it) == per_item * x.shape[1] for it in items)
        assert lay.feature_tokens == per_item * cfg.projector.tokens_out(int(np.sqrt(x.shape[1])))


@pytest.mark.parametrize("tiling,size", [("s2", (300, 150)), ("dynamic_s2", (300, 150)), ("dynamic_s2", (120, 200)),
                                         ("dynamic_s2", (56, 56))])
def test_spec_merge_equals_upstream_merges(tiling, size):
    """The reference merges by the scheme's spec; that is upstream's static / dynamic S2 merge."""
    cfg = make(tiling)
    v = cfg.vision
    for single in (True, False):
        tiles = preprocess_image(_image(*size), v, single=single)
        feats = torch.randn(tiles.pixels.shape[0], v.grid * v.grid, 4)
        got = s2_merge(feats, tiling_scheme(v).merge_spec(tiles))
        if tiling == "s2":
            want = static_s2_merge(feats, tiles_per_side=[1, 2, 3], output_scale_idx=v.s2_output_scale_idx)
        else:
            want = dynamic_s2_merge(feats, block_size=tiles.block_size, scales=list(v.s2_scales),
                                    output_scale_idx=v.s2_output_scale_idx)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        # and the numpy merge / re-merge the runtime runs are upstream's too
        scheme = tiling_scheme(v)
        np.testing.assert_allclose(scheme.merge(feats.numpy(), tiles), want.numpy(), rtol=0, atol=1e-6)
        if tiles.block_size is not None:
            y = torch.randn(want.shape[0], 9, 5)  # projected chunks: 3x3 tokens each
            np.testing.assert_array_equal(scheme.after_projector(y.numpy(), tiles)[0],
                                          dynamic_s2_tokens(y, tiles.block_size).numpy())


def test_worst_case_bounds_every_layout():
    """The planner's worst case is at least every real image's tiles and positions."""
    for tiling in TOPS:
        cfg = make(tiling)
        worst = tiling_scheme(cfg.vision).worst_case(cfg, cfg.vision.max_tiles, single_scale=False)
        for w, h in SIZES + ((2000, 100), (100, 2000), (1920, 1080)):
            lay = image_layout(cfg, w, h)
            assert lay.n_tiles <= worst.n_tiles and lay.positions <= worst.positions, (tiling, w, h)
        lo, _, hi = tiling_scheme(cfg.vision).tile_batch(cfg.num_video_frames)
        assert lo <= worst.n_tiles <= hi  # the TensorRT profile takes the largest image in one batch
