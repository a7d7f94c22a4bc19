"""PS3 (VILA-HD's 4K tower): config and loader, the reference's pieces against upstream's rules, the numpy
selection against the reference's, the ONNX path against the reference, the runtime end to end, info.

The fixture is `make_tiny_checkpoint("ps3")`: the real on-disk layout (PS3VisionModel weight names,
PS3VisionConfig fields, the projector's high_res_pos_embed) with a tiny trunk."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest_runtime import runtime_engine  # noqa: F401  (session fixture shared by the runtime tests)

from vila_edge.errors import CheckpointError
from vila_edge.ps3_config import Ps3Settings, max_item_tokens, ps3_settings, select_counts

torch = pytest.importorskip("torch")


def _settings(scales=(378, 756, 1512), max_select=2560, **top) -> Ps3Settings:
    vision = {"model_name": "vit_so400m_patch14_siglip_384", "ps3_scales": list(scales), "max_select_num": max_select}
    return ps3_settings({"ps3": True, "look_close_mode": "after_image", **top}, vision, "test")


# ---- config: the numbers VILA-HD's README documents ---------------------------------------------------------


def test_settings_reproduce_the_documented_vila_hd_budgets():
    hd15 = _settings(num_look_close=6)
    assert hd15.select_num_each_scale == (512, 2048)  # README: SELECT_NUM_EACH_SCALE default 512+2048 (1.5K)
    assert hd15.max_high_res_tokens == 14580  # README: NUM_TOKEN_LOOK_CLOSE between 1 and 14580 (1.5K)
    assert hd15.look_close_steps() == (6, 14580)  # README: NUM_LOOK_CLOSE 1..6 for 1.5K; 6 covers every patch
    hd4k = _settings((378, 756, 1512, 3780), num_look_close=99)
    assert hd4k.max_high_res_tokens == 87480  # README: 1..87480 for 4K
    assert hd4k.look_close_steps()[0] == 35  # README: NUM_LOOK_CLOSE 1..35 for 4K
    assert hd15.low_res_tokens == 729
    with_tokens = _settings(num_token_look_close=3000)
    assert with_tokens.look_close_steps() == (2, 3000)


def test_select_counts_spill_what_a_scale_lacks_to_the_next_one():
    s = _settings(num_look_close=6)
    # the 6th step of the 1.5K model: 356 patches left at 756, 1424 at 1512 (upstream's spill, then clamp)
    assert select_counts(s, [2916 - 5 * 512, 11664 - 5 * 2048], None) == [356, 1424]
    assert select_counts(s, [2916, 11664], 1000) == [200, 800]  # num_select_token splits by the same ratio


@pytest.mark.parametrize("bad,needle", [
    ({"model_name": "vit_giant_patch14_whatever"}, "model_name"),
    ({"ps3_scales": [378, 700]}, "ps3_scales"),
    ({"radio": True}, "RADIO"),
    ({"select_based_on_layer": [0, 40]}, "select_based_on_layer"),
])
def test_bad_ps3_vision_configs_are_refused_in_one_line(bad, needle):
    vision = {"model_name": "vit_so400m_patch14_siglip_384", **bad}
    with pytest.raises(CheckpointError, match=needle):
        ps3_settings({"ps3": True}, vision, "x/config.json")


def test_fixture_loads_as_vila_hd_with_the_real_layout(tiny_checkpoint):
    from vila_edge.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint("ps3"))
    cfg = ckpt.config
    assert (cfg.family, cfg.vision.tower, cfg.generation, cfg.splice) == ("vila-hd", "ps3", "nvila", "head")
    s = cfg.vision.ps3
    assert s.scales == (70, 140, 280) and s.select_num_each_scale == (20, 80) and s.look_close_steps() == (2, 200)
    assert cfg.vision.image_size == 280  # preprocessing: one squashed image at the largest scale
    names = set(ckpt.index["vision_tower"])
    assert {"vision_model.trunk.blocks.2.attn.qkv.weight", "vision_model.prior_prompt", "vision_model.pos_emb_residual.1",
            "vision_model.highres_selection_feature_module.blocks.0.weight"} <= names
    assert {"high_res_pos_embed", "high_res_scale_embed.2", "top_down_prompt_head.weight"} <= set(ckpt.index["mm_projector"])
    from vila_edge.config import config_from_json

    assert config_from_json(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg  # the manifest round trip


@pytest.mark.parametrize("edit,needle", [
    (lambda top, v: top.update(mm_vision_select_layer=-3), "select_layer"),
    (lambda top, v: top.update(mm_projector_type="mlp2x_gelu", mm_projector_cfg=None), "mlp_downsample"),
    (lambda top, v: top.update(ps3_dynamic_aspect_ratio=True), "dynamic_aspect_ratio"),
    (lambda top, v: top.update(look_close_mode="sideways"), "look_close_mode"),
])
def test_unsupported_vila_hd_settings_are_refused(checkpoint_copy, edit, needle):
    from vila_edge.checkpoint import load_checkpoint

    root = checkpoint_copy("ps3")
    top = json.loads((root / "config.json").read_text())
    vision = json.loads((root / "vision_tower" / "config.json").read_text())
    edit(top, vision)
    if top.get("mm_projector_type"):
        proj = json.loads((root / "mm_projector" / "config.json").read_text())
        proj["mm_projector_type"] = top["mm_projector_type"]
        (root / "mm_projector" / "config.json").write_text(json.dumps(proj))
    (root / "config.json").write_text(json.dumps(top))
    with pytest.raises(CheckpointError, match=needle):
        load_checkpoint(root)


def test_a_missing_ps3_tensor_is_named(checkpoint_copy):
    from safetensors.torch import load_file, save_file

    from vila_edge.checkpoint import load_checkpoint

    root = checkpoint_copy("ps3")
    f = root / "vision_tower" / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["vision_model.pos_emb_residual.0"]
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match="pos_emb_residual.0"):
        load_checkpoint(root)


# ---- reference pieces ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,out", [(54, 5), (54, 27), (10, 4), (7, 7)])
def test_static_window_max_pool_is_torch_adaptive_max_pool(n, out):
    from vila_edge.reference.ps3 import adaptive_max_pool

    x = torch.randn(2, 3, n, n)
    assert torch.equal(adaptive_max_pool(x, out), torch.nn.functional.adaptive_max_pool2d(x, out))


def _tied_probs(s: Ps3Settings, seed: int) -> list[torch.Tensor]:
    """Probabilities as PS3 makes them: one low-res map, nearest-upsampled to every scale (ties everywhere)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 1, s.low_res_grid, s.low_res_grid, generator=g)
    return [torch.nn.functional.interpolate(low, size=(gg, gg), mode="nearest")[:, 0] for gg in s.high_res_grids]


@pytest.mark.parametrize("top", [{"num_look_close": 1}, {"num_look_close": 3}, {"num_look_close": 99},
                                 {"num_token_look_close": 150}, {"num_token_look_close": 333}])
def test_numpy_selection_equals_the_reference_selection(top):
    from vila_edge.ps3 import selection_steps as np_steps
    from vila_edge.reference.ps3 import selection_steps as ref_steps

    vision = {"model_name": "vila_edge_tiny_ps3", "ps3_scales": [70, 140, 280], "max_select_num": 100,
              "select_based_on_layer": [0, 1, 2]}
    s = ps3_settings({"ps3": True, "look_close_mode": "after_image", **top}, vision, "t")
    for seed in range(3):
        probs = _tied_probs(s, seed)
        want = ref_steps(s, probs)
        got = np_steps(s, [p[0].numpy() for p in probs])
        assert len(got) == len(want) == s.look_close_steps()[0]
        for a, b in zip(got, want, strict=True):
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(x, y.numpy())
        union = sum(sum(m.sum() for m in step) for step in got)
        assert union == s.look_close_steps()[1]  # every step takes new patches only
        # the selection takes the highest probabilities: nothing unselected beats anything selected, per scale
        first = got[0]
        for p, m in zip(probs, first, strict=True):
            pn = p[0].numpy()
            if 0 < m.sum() < m.size:
                assert pn[m == 0].max() <= pn[m == 1].min()


def test_ties_break_toward_the_lower_row_major_index():
    from vila_edge.ps3 import selection_steps

    s = ps3_settings({"ps3": True, "look_close_mode": "after_image"}, {
        "model_name": "vila_edge_tiny_ps3", "ps3_scales": [70, 140], "max_select_num_each_scale": [3],
        "select_based_on_layer": [0]}, "t")
    (step,) = selection_steps(s, [np.full((10, 10), 0.5, np.float32)])
    assert np.flatnonzero(step[0]).tolist() == [0, 1, 2]


@pytest.mark.parametrize("g,k", [(10, 3), (20, 3), (54, 2), (54, 3), (5, 2)])
def test_kept_cells_numpy_equals_the_reference(g, k):
    from vila_edge.ps3 import kept_cells as np_kept
    from vila_edge.reference.ps3 import kept_cells as ref_kept

    rng = np.random.default_rng(g * 10 + k)
    for density in (0.5, 0.9, 1.0):
        m = (rng.random((g, g)) < density).astype(np.float32)
        np.testing.assert_array_equal(np_kept([m], k), ref_kept([torch.as_tensor(m)], k).numpy())
    assert np_kept([np.ones((g, g), np.float32)], k).all()


def test_max_item_tokens_bounds_the_real_items(tiny_checkpoint):
    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.media.tiling import image_layout, preprocess_image
    from vila_edge.reference.model import ReferenceVILA

    ckpt = load_checkpoint(tiny_checkpoint("ps3"))
    ref = ReferenceVILA(ckpt, llm=False)
    bound = max_item_tokens(ckpt.config.vision.ps3, ckpt.config.projector.downsample)
    assert image_layout(ckpt.config, 640, 480).feature_tokens == bound
    for seed in range(2):
        item = ref.image_items(preprocess_image(_image(seed), ckpt.config.vision))
        assert len(item) == 1 and 4 < item[0].shape[0] <= bound  # 4 low-res cells + the kept high-res cells
    hd15 = _settings(num_look_close=6)
    assert max_item_tokens(hd15, 2) == 14 * 14 + 27 * 27 + 54 * 54  # everything selected: every cell kept
    assert max_item_tokens(hd15, 3) == 81 + 18 * 18 + 36 * 36


def _image(seed=0, w=300, h=220):
    from vila_edge.builder.vision_onnx import synthetic_image

    return synthetic_image(w, h, seed)


# ---- the ONNX path (the engine directory's graphs) against the reference ------------------------------------


@pytest.fixture(scope="module")
def ps3_engine(runtime_engine):  # noqa: F811
    return runtime_engine("ps3")


@pytest.fixture(scope="module")
def ps3_reference(tiny_checkpoint):
    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.reference.model import ReferenceVILA

    return ReferenceVILA(load_checkpoint(tiny_checkpoint("ps3")))


def test_engine_records_parity_and_the_three_graphs(ps3_engine):
    m = json.loads((ps3_engine / "manifest.json").read_text())
    v = m["vision"]
    assert v["tower"] == "ps3" and set(v["files"]) == {"ps3_low_res", "ps3_high_res", "ps3_projector"}
    for mode in ("bottom_up", "top_down"):
        c = v["checks"][f"ps3_{mode}_vs_reference"]
        assert c["same_selection"] and c["features_max_abs"] <= 1e-4 and c["item_max_abs"] <= 1e-4


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["bottom_up", "top_down"])
def test_onnx_path_matches_reference_and_selects_the_same_patches(ps3_engine, ps3_reference, seed, mode):
    from vila_edge.engine_dir import read_manifest
    from vila_edge.media.tiling import preprocess_image
    from vila_edge.ps3 import Ps3Runner, selection_steps
    from vila_edge.reference.ps3 import project_ps3
    from vila_edge.reference.ps3 import selection_steps as ref_steps

    ref = ps3_reference
    cfg = ref.cfg
    runner = Ps3Runner(ps3_engine / "vision", read_manifest(ps3_engine).vision, cfg.vision.ps3, cfg.projector.downsample)
    pixels = np.asarray(preprocess_image(_image(seed + 10), cfg.vision).pixels)
    prompt = None if mode == "bottom_up" else np.random.default_rng(seed).standard_normal(cfg.vision.hidden_size).astype(np.float32)
    with torch.no_grad():
        want, maps, probs = ref.tower(torch.as_tensor(pixels), None if prompt is None else torch.as_tensor(prompt))
        want_item = project_ps3(want, maps, cfg.vision.ps3, ref.projector, ref.projector_extras)
    _, _, got_probs = runner.select(pixels, prompt)
    np.testing.assert_allclose(np.concatenate([p.reshape(-1) for p in got_probs]),
                               np.concatenate([p.reshape(-1).numpy() for p in probs]), rtol=0, atol=1e-5)
    # selection exactness: the same patches at every look-close step
    for a, b in zip(selection_steps(cfg.vision.ps3, got_probs), ref_steps(cfg.vision.ps3, probs), strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y.numpy())
    got, got_maps, _ = runner.features(pixels, prompt)
    assert got.shape == tuple(want.shape) == (25 + 200, cfg.vision.hidden_size)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4)  # SigLIP's tower tolerance
    item = runner.item(pixels, prompt)
    assert item.shape == tuple(want_item.shape)
    np.testing.assert_allclose(item, want_item.numpy(), rtol=0, atol=1e-4)


def test_a_different_prompt_selects_different_patches(ps3_engine, ps3_reference):
    """The top-down prompt input is live: two prompts do not select the same patches."""
    from vila_edge.engine_dir import read_manifest
    from vila_edge.ps3 import Ps3Runner

    cfg = ps3_reference.cfg
    runner = Ps3Runner(ps3_engine / "vision", read_manifest(ps3_engine).vision, cfg.vision.ps3, cfg.projector.downsample)
    from vila_edge.media.tiling import preprocess_image

    pixels = np.asarray(preprocess_image(_image(3), cfg.vision).pixels)
    rng = np.random.default_rng(7)
    maps = [runner.features(pixels, rng.standard_normal(cfg.vision.hidden_size).astype(np.float32))[1] for _ in range(3)]
    assert any(not all(np.array_equal(a, b) for a, b in zip(maps[0], m, strict=True)) for m in maps[1:])


def test_chat_on_an_image_end_to_end_matches_the_reference(ps3_engine, ps3_reference):
    import vila_edge
    from vila_edge.media.tiling import preprocess_image
    from vila_edge.prompt import Message, render, tokenize, user_content

    ref = ps3_reference
    cfg, tok = ref.cfg, ref.ckpt.tokenizer
    img = _image(5, 500, 380)
    items = ref.image_items(preprocess_image(img, cfg.vision))
    content = user_content(cfg, "Describe the image.", n_images=1, n_tiles=1)
    ids = tokenize(cfg, tok, render(cfg.llm.chat_format, [Message("user", content)], tok), first=True)
    want_emb = ref.inputs_embeds(ids, items)
    pipe = vila_edge.load(ps3_engine, device="cpu", threads=1)
    got_emb = pipe.prompt_embeds("Describe the image.", [img])
    np.testing.assert_allclose(got_emb, want_emb.numpy(), rtol=0, atol=1e-4)
    res = pipe.generate("Describe the image.", images=[img], max_new_tokens=8)
    assert res.token_ids == ref.greedy(want_emb, 8)
    assert pipe.describe()["vision"]["tower"] == "ps3"


def test_info_describes_the_ps3_tower(tiny_checkpoint):
    from typer.testing import CliRunner

    from vila_edge.cli import app

    out = CliRunner().invoke(app, ["info", str(tiny_checkpoint("ps3"))], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "scales [70, 140, 280]" in out.output and "20+80 patches/step x 2 step(s)" in out.output
    assert "bottom-up (after_image)" in out.output


def test_fixture_cli_writes_a_loadable_ps3_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.cli import app

    out = CliRunner().invoke(app, ["fixture", "ps3", str(tmp_path / "hd")])
    assert out.exit_code == 0, out.output
    assert load_checkpoint(tmp_path / "hd").config.vision.tower == "ps3"


def test_top_down_prompt_of_the_reference_reads_the_llm_at_the_prompt_end(ps3_reference):
    """after_prompt (VILA-HD's README default): the LLM position read is the user prompt's last token in the
    low-res-only sequence, and its prompt changes the selection."""
    from vila_edge.media.tiling import preprocess_image
    from vila_edge.prompt import Message, render, tokenize, user_content
    from vila_edge.reference.ps3 import project_low_res

    ref = ps3_reference
    cfg, tok = ref.cfg, ref.ckpt.tokenizer
    content = user_content(cfg, "What is written on the sign?", n_images=1, n_tiles=1)
    ids = tokenize(cfg, tok, render(cfg.llm.chat_format, [Message("user", content)], tok), first=True)
    end = ref.ps3_prompt_end(ids)
    assert tok.decode([ids[end]]).strip() == "?" and ids[end + 1] == tok.token_to_id("<|im_end|>")
    tiles = preprocess_image(_image(4), cfg.vision)
    outs, _ = ref.tower.enc.low_res(torch.as_tensor(np.asarray(tiles.pixels)), ref.tower.n_blocks)
    low = project_low_res(outs[-1][0], ref.projector, ref.projector_extras)
    embeds = ref.inputs_embeds(ids, [low])
    at = end + low.shape[0]  # one image before the prompt end
    torch.testing.assert_close(embeds[at], ref.embed([ids[end]])[0])
    prompt = ref.ps3_top_down_prompt(ids, [tiles])
    assert prompt.shape == (cfg.vision.hidden_size,)
    with torch.no_grad():
        _, maps_td, _ = ref.tower(torch.as_tensor(np.asarray(tiles.pixels)), prompt)
        _, maps_bu, _ = ref.tower(torch.as_tensor(np.asarray(tiles.pixels)))
    assert any(not torch.equal(a, b) for a, b in zip(maps_td, maps_bu, strict=True))


def test_runtime_refuses_after_prompt_in_one_line(ps3_engine, ps3_reference):
    from vila_edge.backends.ps3_vision import Ps3VisionEngine
    from vila_edge.engine_dir import read_manifest
    from vila_edge.errors import EngineError

    cfg = ps3_reference.cfg
    td = dataclasses.replace(cfg, vision=dataclasses.replace(
        cfg.vision, ps3=dataclasses.replace(cfg.vision.ps3, look_close_mode="after_prompt")))
    eng = Ps3VisionEngine(ps3_engine / "vision", read_manifest(ps3_engine).vision, td)
    pixels = np.zeros((1, 3, 280, 280), np.float32)
    with pytest.raises(EngineError, match="after_image"):
        eng.item(pixels)
    assert eng.item(pixels, np.ones(cfg.vision.hidden_size, np.float32)).shape[1] == cfg.llm.hidden_size


def test_planner_counts_ps3_weights_and_work(tiny_checkpoint):
    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.plan import vision_flops_per_tile, vision_params

    ckpt = load_checkpoint(tiny_checkpoint("ps3"))
    assert vision_params(ckpt.config)["tower"] == ckpt.param_counts()["vision_tower"]
    hd15 = _settings(num_look_close=6)
    from vila_edge.ps3_config import ps3_activation_values, ps3_flops

    one_step = _settings(num_look_close=1)
    # six look-close steps cost about six times one step's high-res work on top of the shared low-res pass
    low_and_one, low_and_six = ps3_flops(one_step, 26, 0, 2), ps3_flops(hd15, 26, 0, 2)
    assert 4.5 < low_and_six / low_and_one < 6.0
    assert ps3_activation_values(hd15, 26, 16, fused_attention=False) > ps3_activation_values(hd15, 26, 16, True)
    assert vision_flops_per_tile(ckpt.config) > 0
