"""Vision export: ONNX Runtime against the PyTorch reference on every fixture family, dynamic batch,
fp16 / int8 variants, and the TensorRT plan as data (engines themselves need a GPU + tensorrt)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from vila_edge.builder import tensorrt as trtb
from vila_edge.builder import vision_onnx as vo
from vila_edge.builder.build import BuildOptions, build
from vila_edge.engine_dir import read_manifest
from vila_edge.errors import EngineError

FAMILY_LAYOUTS = [("vila1.5", "dev"), ("vila1.5-s2", "dev"), ("nvila", "dev"), ("nvila-lite", "dev"), ("nvila-lite", "hf"),
                  ("clip", "dev"), ("intern", "dev")]
# one extra build per feature, on the family where it matters
MAIN = {"vila1.5": BuildOptions(combined_vision=True, skip_llm=True), "nvila": BuildOptions(int8_vision=True, qdq_vision=True, skip_llm=True)}
VARIANTS = {"fp16": BuildOptions(precision="fp16", combined_vision=True, skip_llm=True)}


@pytest.fixture(scope="module", autouse=True)
def _reuse_onnx_registry():
    """Test speed only: torch.onnx rebuilds its op registry on every dynamo export (~1 s); build it once."""
    try:
        from torch.onnx._internal.exporter import _registration

        original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    except (ImportError, KeyError):
        yield
        return
    cache = {}

    def cached(cls, opset_version=18):
        if opset_version not in cache:
            cache[opset_version] = original.__func__(cls, opset_version=opset_version)
        return cache[opset_version]

    _registration.ONNXRegistry.from_torchlib = classmethod(cached)
    yield
    _registration.ONNXRegistry.from_torchlib = original


@pytest.fixture(scope="session")
def engines(tiny_checkpoint, tmp_path_factory):
    """engines(family, layout="dev", variant=None) -> engine dir built once per session (vision only)."""
    root = tmp_path_factory.mktemp("engines")
    cache = {}

    def get(family, layout="dev", variant=None):
        key = (family, layout, variant)
        if key not in cache:
            opts = VARIANTS[variant] if variant else MAIN.get(family, BuildOptions(skip_llm=True))
            out = root / f"{family}-{layout}-{variant or 'fp32'}"
            cache[key] = build(tiny_checkpoint(family, layout), out, options=opts, stage="export", progress=False).path
        return cache[key]

    return get


@pytest.fixture(scope="session")
def references(tiny_checkpoint):
    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.reference.model import ReferenceVILA

    cache = {}

    def get(family, layout="dev"):
        if (family, layout) not in cache:
            ckpt = load_checkpoint(tiny_checkpoint(family, layout))
            cache[(family, layout)] = ReferenceVILA(ckpt, llm=False)
        return cache[(family, layout)]

    return get


def _manifest(path):
    import json

    return json.loads((path / "manifest.json").read_text())


def _image_tiles(cfg, width=150, height=100, seed=3):
    from vila_edge.media.tiling import preprocess_image

    return preprocess_image(vo.synthetic_image(width, height, seed), cfg.vision)


def _merge(features: np.ndarray, cfg, tiles) -> np.ndarray:
    """Tower output of one image -> projector input, with the numpy merge (kernels_ref) when it exists."""
    v = cfg.vision
    if v.tiling not in ("s2", "dynamic_s2"):
        return features
    try:
        from vila_edge import kernels_ref

        merge = getattr(kernels_ref, "s2_merge_ref", None) or kernels_ref.s2_merge
    except (ImportError, AttributeError):  # fall back to the torch reference merge
        import torch

        from vila_edge.reference.s2 import dynamic_s2_merge, static_s2_merge

        f = torch.from_numpy(features)
        if v.tiling == "s2":
            per = [-(-s // v.s2_max_split_size) for s in v.s2_scales]
            return static_s2_merge(f, tiles_per_side=per, output_scale_idx=v.s2_output_scale_idx).numpy()
        return dynamic_s2_merge(f, block_size=tiles.block_size, scales=list(v.s2_scales),
                                output_scale_idx=v.s2_output_scale_idx).numpy()
    if v.tiling == "s2":
        grids = [(-(-s // v.s2_max_split_size),) * 2 for s in v.s2_scales]
    else:
        grids = [(s // v.s2_scales[0],) * 2 for s in v.s2_scales[:-1]] + [tuple(tiles.block_size)]
    return merge(features, tile_grids=grids, h=v.grid, w=v.grid, output_scale_idx=v.s2_output_scale_idx)


# ---- parity ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,layout", FAMILY_LAYOUTS)
def test_tower_matches_reference_at_batch_1_and_3(family, layout, engines, references):
    ref = references(family, layout)
    path = engines(family, layout)
    m = _manifest(path)
    sess = vo.ort_session(path / m["vision"]["files"]["tower"]["fp32"])
    rng = np.random.default_rng(0)
    s = ref.cfg.vision.image_size
    for batch in (1, 3):  # exported with a batch-2 example: 1 and 3 catch a silently fixed batch
        x = rng.uniform(-1, 1, (batch, 3, s, s)).astype(np.float32)
        got = vo.run_graph(sess, x)
        want = ref.encode_tiles(x).numpy()
        assert got.shape == want.shape == (batch, ref.cfg.vision.tokens_per_tile, ref.cfg.vision.hidden_size)
        assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("family,layout", FAMILY_LAYOUTS)
def test_projected_features_after_merge_match_reference(family, layout, engines, references):
    ref = references(family, layout)
    cfg = ref.cfg
    path = engines(family, layout)
    files = _manifest(path)["vision"]["files"]
    tower = vo.ort_session(path / files["tower"]["fp32"])
    projector = vo.ort_session(path / files["projector"]["fp32"])
    tiles = _image_tiles(cfg)
    feats = vo.run_graph(tower, tiles.pixels)
    merged = _merge(feats, cfg, tiles)
    got = vo.run_graph(projector, merged)
    with torch.no_grad():
        want = ref.projector(ref.projector_input(tiles)).numpy()
    assert got.shape == want.shape
    stats = vo.cosine_stats(want, got)
    assert stats["min"] >= 0.9999, stats
    # the projector alone, batch 1 and 3, against the reference module
    geom = vo.VisionGeometry.from_config(cfg)
    par = vo.check_parity(path / files["projector"]["fp32"], ref.projector, "projector", geom, batches=(1, 3))
    assert par["max_abs"] <= 1e-4


def test_graphs_are_portable_opset17_with_a_symbolic_batch_axis(engines):
    path = engines("nvila")
    m = _manifest(path)
    for name in ("tower", "projector"):
        model = onnx.load(str(path / m["vision"]["files"][name]["fp32"]))
        onnx.checker.check_model(model)
        assert {o.domain or "ai.onnx": o.version for o in model.opset_import} == {"ai.onnx": 17}
        assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # TensorRT parses standard ops only
        for v in list(model.graph.input) + list(model.graph.output):
            dims = v.type.tensor_type.shape.dim
            assert dims[0].dim_param and all(d.dim_value > 0 for d in dims[1:])
        io = vo.graph_io(path / m["vision"]["files"][name]["fp32"])
        want = vo.TOWER_IO if name == "tower" else vo.PROJECTOR_IO
        assert list(io["inputs"]) == [want[0]] and list(io["outputs"]) == [want[1]]


def test_a_fixed_batch_export_is_detected(tiny_checkpoint, tmp_path):
    """The trap the exporter sets: no dynamic_shapes -> batch silently fixed to the example's."""
    import torch

    from vila_edge.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint("nvila-lite"))
    _, projector = vo.load_modules(ckpt)
    geom = vo.VisionGeometry.from_config(ckpt.config)
    path = tmp_path / "fixed.onnx"
    with vo._quiet_exporter():
        torch.onnx.export(projector, (vo.example_input("projector", geom),), str(path), dynamo=True,
                          input_names=["features"], output_names=["embeds"], verbose=False)
    with pytest.raises(EngineError, match="fixed the batch axis"):
        vo.assert_dynamic_batch(path)


def test_int8_tower_cosine_is_recorded_and_close(engines, references, record_property):
    path = engines("nvila")
    m = _manifest(path)
    stats = m["vision"]["checks"]["tower_int8_vs_fp32"]
    record_property("int8_tower_cosine", stats)
    assert stats["mean"] >= 0.999 and stats["min"] >= 0.99
    # and against the reference, on real preprocessed tiles
    ref = references("nvila")
    tiles = _image_tiles(ref.cfg)
    got = vo.run_graph(vo.ort_session(path / m["vision"]["files"]["tower"]["int8"]), tiles.pixels)
    cos = vo.cosine_stats(ref.encode_tiles(tiles.pixels).numpy(), got)
    record_property("int8_tower_cosine_vs_reference", cos)
    print(f"int8 tower vs reference: cosine mean {cos['mean']:.6f} min {cos['min']:.6f}")
    assert cos["mean"] >= 0.999


def test_qdq_tower_for_tensorrt_int8(engines):
    path = engines("nvila")
    m = _manifest(path)
    model = onnx.load(str(path / m["vision"]["files"]["tower"]["qdq"]))
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import} == {"ai.onnx": 17}
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    inits = {t.name: t for t in model.graph.initializer}
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert zps and all(z.data_type == onnx.TensorProto.INT8 for z in zps)  # symmetric int8: what TensorRT takes
    assert all(not onnx.numpy_helper.to_array(z).any() for z in zps)
    assert sum(n.op_type == "MatMul" for n in model.graph.node) == sum(
        n.op_type == "MatMul" for n in onnx.load(str(path / m["vision"]["files"]["tower"]["fp32"])).graph.node)
    stats = m["vision"]["checks"]["tower_qdq_vs_fp32"]
    assert stats["mean"] >= 0.999


def test_fp16_graphs_and_the_combined_trtllm_graph(engines, references):
    path = engines("nvila-lite", variant="fp16")
    m = _manifest(path)
    files = m["vision"]["files"]
    assert set(files["tower"]) == {"fp16"} and set(files["projector"]) == {"fp16"}  # fp32 intermediates removed
    assert not list((path / "vision").glob("*.fp32.onnx"))
    ref = references("nvila-lite")
    tiles = _image_tiles(ref.cfg)
    with torch.no_grad():
        want = torch.stack(ref.image_items(tiles)).numpy()
    # combined graph: TensorRT-LLM naming, tower + projector in one (fp32 graph checked at build time; fp16 here)
    assert files["combined"] == {"fp16": "vision/combined.fp16.onnx"}
    io = vo.graph_io(path / files["combined"]["fp16"])
    assert list(io["inputs"]) == ["input"] and list(io["outputs"]) == ["encoder_output"]
    assert io["inputs"]["input"][0] == "tiles"
    combined = vo.run_graph(vo.ort_session(path / files["combined"]["fp16"]), tiles.pixels)
    assert vo.cosine_stats(want, combined)["min"] >= 0.999
    two_graphs = vo.run_graph(vo.ort_session(path / files["projector"]["fp16"]),
                              vo.run_graph(vo.ort_session(path / files["tower"]["fp16"]), tiles.pixels))
    assert vo.cosine_stats(want, two_graphs)["min"] >= 0.999
    assert m["vision"]["checks"]["combined_fp32_vs_reference"]["max_abs"] <= 1e-4
    # the fp32 combined graph (vila1.5 build) matches the reference's projected items
    path32 = engines("vila1.5")
    ref15 = references("vila1.5")
    tiles15 = _image_tiles(ref15.cfg)
    got32 = vo.run_graph(vo.ort_session(path32 / _manifest(path32)["vision"]["files"]["combined"]["fp32"]), tiles15.pixels)
    with torch.no_grad():
        want32 = ref15.image_items(tiles15)[0].numpy()
    assert np.abs(got32[0] - want32).max() <= 1e-4


def test_combined_graph_is_only_planned_for_non_s2(tiny_checkpoint, tmp_path):
    opts = BuildOptions(combined_vision=True, skip_llm=True)
    s2 = build(tiny_checkpoint("vila1.5-s2"), tmp_path / "a", options=opts, dry_run=True, progress=False)
    plain = build(tiny_checkpoint("vila1.5"), tmp_path / "b", options=opts, dry_run=True, progress=False)
    assert not any("combined" in s["output"] for s in s2.plan["steps"])
    assert any(s["output"] == "vision/combined.fp32.onnx" for s in plain.plan["steps"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- TensorRT plan (data; the build itself needs tensorrt + a GPU) --------------------------------------------


def _cfg(top_extra, vision_size=448, llm=None, ptype="mlp_downsample", vision_layers=27):
    from vila_edge.config import config_from_dicts

    vision = {"architectures": ["SiglipVisionModel"], "image_size": vision_size, "patch_size": 14, "hidden_size": 1152,
              "num_hidden_layers": vision_layers, "num_attention_heads": 16, "intermediate_size": 4304}
    llm = llm or {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 1536, "intermediate_size": 8960,
                  "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151648}
    top = {"hidden_size": llm["hidden_size"], "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch",
           **top_extra}
    return config_from_dicts(top=top, llm=llm, vision=vision, projector={"mm_projector_type": ptype}, preprocessor=None,
                             name="x", has_chat_template=True, where="config.json")


def test_tile_batch_profiles_per_family():
    nvila = _cfg({"dynamic_s2": True, "image_aspect_ratio": "dynamic_s2", "s2_scales": "448,896,1344",
                  "s2_max_split_size": 448, "s2_resize_output_to_scale_idx": -1, "mm_hidden_size": 3456})
    assert trtb.tile_batch_profile(nvila) == trtb.Profile(1, 14, 17)  # 1 + 4 + 9..12
    assert trtb.chunk_batch_profile(nvila) == trtb.Profile(1, 9, 12)
    lite = _cfg({"image_aspect_ratio": "dynamic", "max_tiles": 12}, ptype="mlp_downsample_3x3_fix")
    assert trtb.tile_batch_profile(lite) == trtb.Profile(1, 13, 13)  # 12 tiles + thumbnail
    assert trtb.chunk_batch_profile(lite) == trtb.Profile(1, 13, 13)
    s2 = _cfg({"s2": True, "s2_scales": "384,768", "s2_max_split_size": 384, "mm_hidden_size": 2304}, vision_size=384)
    assert trtb.tile_batch_profile(s2) == trtb.Profile(1, 5, 5)
    assert trtb.chunk_batch_profile(s2) == trtb.Profile(1, 1, 8)
    plain = _cfg({"image_aspect_ratio": "resize", "num_video_frames": 8}, vision_size=384)
    assert trtb.tile_batch_profile(plain) == trtb.Profile(1, 1, 8)


def test_engine_plan_as_data(engines):
    m = read_manifest(engines("nvila"))
    cfg = m.config
    specs = {s.name: s for s in trtb.plan_engines(m, precision="fp16", workspace_gb=1.5, sm="8.7")}
    assert set(specs) == {"tower", "projector"}
    t, p = specs["tower"], specs["projector"]
    s, tok, width = cfg.vision.image_size, cfg.vision.tokens_per_tile, cfg.vision.feature_width
    assert (t.input, t.output, t.onnx, t.plan) == ("pixel_values", "features", "vision/tower.fp32.onnx",
                                                   "vision/tower.fp16.plan")
    assert t.min_shape == (1, 3, s, s) and t.opt_shape == (14, 3, s, s) and t.max_shape == (17, 3, s, s)
    assert p.min_shape == (1, tok, width) and p.max_shape == (12, tok, width)
    assert t.flags == ("fp16",) and t.workspace_bytes == int(1.5 * (1 << 30))
    assert trtb.builder_flags("fp32", None) == ()
    assert trtb.builder_flags("int8", "8.7") == ("fp16", "int8")
    with pytest.raises(EngineError, match="sm_89"):
        trtb.builder_flags("fp8", "8.7")  # Orin has no FP8
    assert trtb.builder_flags("fp8", "8.9") == ("fp16", "fp8")
    # int8: the tower from the QDQ graph (explicit quantization), the projector stays fp16
    int8 = {s.name: s for s in trtb.plan_engines(m, precision="int8", sm="8.7")}
    assert (int8["tower"].onnx, int8["tower"].flags, int8["tower"].plan) == (
        "vision/tower.qdq.onnx", ("fp16", "int8"), "vision/tower.int8.plan")
    assert (int8["projector"].flags, int8["projector"].plan) == (("fp16",), "vision/projector.fp16.plan")
    with pytest.raises(EngineError, match="--qdq-vision"):
        trtb.plan_engines(read_manifest(engines("vila1.5")), precision="int8", sm="8.7")
    with pytest.raises(EngineError, match="opset 19"):
        trtb.plan_engines(m, precision="fp8", sm="8.9")
    # the combined engine goes where TensorRT-LLM's runner looks for it
    m2 = read_manifest(engines("nvila-lite", variant="fp16"))
    combined = {s.name: s for s in trtb.plan_engines(m2)}["combined"]
    assert (combined.input, combined.output, combined.plan) == ("input", "encoder_output", "vision/trtllm/model.engine")
    assert combined.onnx == "vision/combined.fp16.onnx"  # fp16 graph when there is no fp32 one


def test_stage_engines_without_tensorrt_says_so(engines, tmp_path):
    if trtb.trt_available()[0]:
        pytest.skip("TensorRT and a GPU are present: the refusal path does not apply")
    with pytest.raises(EngineError, match="runs on the target GPU"):
        build(engines("nvila"), tmp_path / "compiled", stage="engines", progress=False)


def test_tensorrt_engines_build_and_run(engines, tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (GPU targets only)")
    if trtb.detect_sm() is None:
        pytest.skip("tensorrt imports but there is no CUDA GPU")
    import shutil

    src = tmp_path / "nvila"
    shutil.copytree(engines("nvila"), src)
    res = build(src, stage="engines", progress=False)
    m = res.manifest
    assert m.stage == "engines" and m.target.device == "cuda" and m.target.sm
    for rel in m.plans.values():
        assert (src / rel).stat().st_size > 0
    assert (src / trtb.TIMING_CACHE).is_file()


# ---- `--stage engines` orchestration against a stand-in TensorRT (the real one needs a GPU) ---------------------

FAKE_TENSORRT = '''
"""Stand-in for the parts of the TensorRT Python API the builder uses; strict about names and shapes."""
import json, os
import onnx

__version__ = "10.3.0"
CALLS = []

class Logger:
    WARNING = 2
    def __init__(self, level): pass

class NetworkDefinitionCreationFlag:
    EXPLICIT_BATCH = 0

class MemoryPoolType:
    WORKSPACE = "workspace"

class BuilderFlag:
    FP16 = "fp16"; INT8 = "int8"; FP8 = "fp8"

class _Network:
    def __init__(self): self.inputs = {}

class OnnxParser:
    def __init__(self, network, logger): self.network = network; self.num_errors = 0
    def parse_from_file(self, path):
        m = onnx.load(path, load_external_data=False)
        assert {o.version for o in m.opset_import if o.domain in ("", "ai.onnx")} == {17}
        self.network.inputs = {i.name: [d.dim_value or -1 for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
        self.network.path = path
        return True
    def get_error(self, i): return ""

class _Profile:
    def __init__(self): self.shapes = {}
    def set_shape(self, name, mn, opt, mx): self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))

class _Cache:
    def __init__(self, blob): self.blob = bytes(blob)
    def serialize(self): return self.blob + b"+"

class _Config:
    def __init__(self): self.flags = set(); self.pool = {}; self.profiles = []; self.cache = None
    def set_memory_pool_limit(self, pool, n): self.pool[pool] = n
    def set_flag(self, f): self.flags.add(f)
    def add_optimization_profile(self, p): self.profiles.append(p)
    def create_timing_cache(self, blob): return _Cache(blob)
    def set_timing_cache(self, cache, ignore_mismatch): self.cache = cache; return True
    def get_timing_cache(self): return self.cache

class Builder:
    def __init__(self, logger): pass
    def create_network(self, flags): assert flags == 0; return _Network()
    def create_builder_config(self): return _Config()
    def create_optimization_profile(self): return _Profile()
    def build_serialized_network(self, network, config):
        (p,) = config.profiles
        assert set(p.shapes) == set(network.inputs), (p.shapes, network.inputs)
        for name, (mn, opt, mx) in p.shapes.items():
            static = network.inputs[name]
            assert len(mn) == len(static) and all(s in (-1, a) for s, a in zip(static[1:], mn[1:]))
            assert mn[0] <= opt[0] <= mx[0] and mn[1:] == opt[1:] == mx[1:]
        CALLS.append({"onnx": os.path.basename(network.path), "shapes": p.shapes, "flags": sorted(config.flags),
                      "workspace": config.pool[MemoryPoolType.WORKSPACE]})
        return json.dumps(CALLS[-1], default=list).encode()
'''


def test_stage_engines_on_the_target_needs_no_torch(engines, tmp_path):
    """Jetson flow: the exported dir is copied over and compiled there, with tensorrt and without torch."""
    import json
    import shutil
    import subprocess
    import sys

    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "tensorrt.py").write_text(FAKE_TENSORRT)
    exported = shutil.copytree(engines("vila1.5"), tmp_path / "jetson" / "vila15")
    script = (
        "import sys, json\n"
        "for mod in ('torch', 'transformers'): sys.modules[mod] = None  # must not be needed\n"
        "import vila_edge.builder.tensorrt as t\n"
        "t.detect_sm = lambda: '8.7'\n"
        "from vila_edge.builder.build import build\n"
        f"res = build({str(exported)!r}, stage='engines', progress=False)\n"
        "again = build(res.path, stage='engines', progress=False)\n"
        "import tensorrt\n"
        "print(json.dumps({'status': [res.status, again.status], 'calls': tensorrt.CALLS}, default=list))\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "fake")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == ["built", "up-to-date"]
    calls = {c["onnx"]: c for c in out["calls"]}
    assert set(calls) == {"tower.fp32.onnx", "projector.fp32.onnx", "combined.fp32.onnx"}
    assert calls["tower.fp32.onnx"]["flags"] == ["fp16"]
    assert calls["tower.fp32.onnx"]["shapes"]["pixel_values"][2][0] == 8  # 1..num_video_frames for resize
    m = json.loads((exported / "manifest.json").read_text())
    assert m["stage"] == "engines" and m["target"] == {"device": "cuda", "sm": "8.7"}
    assert m["versions"]["tensorrt"] == "10.3.0"
    assert m["vision"]["plans"] == {"tower": "vision/tower.fp16.plan", "projector": "vision/projector.fp16.plan",
                                    "combined": "vision/trtllm/model.engine"}
    for rel in [*m["vision"]["plans"].values(), "vision/timing.cache", "vision/trtllm/config.json"]:
        assert (exported / rel).is_file() and rel in m["files"]
    trtllm = json.loads((exported / "vision/trtllm/config.json").read_text())["builder_config"]
    # the runner casts images to `precision`: the graph's float32 I/O, not the fp16 math (issue 20, bug 6)
    assert trtllm["precision"] == "float32" and trtllm["output_shape"][1:] == [m["vision"]["projector_tokens"],
                                                                               m["vision"]["embed_dim"]]
    check_engine_dir = __import__("vila_edge.engine_dir", fromlist=["x"]).check_engine_dir
    assert check_engine_dir(exported, sm="8.7").stage == "engines"
    with pytest.raises(EngineError, match="sm_8.7"):
        check_engine_dir(exported, sm="8.9")
    assert not [p for p in exported.parent.iterdir() if p.name != "vila15"]  # no temp dirs or locks left


def test_stage_all_adds_engines_to_an_up_to_date_export(engines, tiny_checkpoint, tmp_path, monkeypatch):
    """On a GPU machine, `build` (stage all) over an existing export only compiles the engines."""
    import importlib.machinery
    import shutil
    import sys
    import types

    fake = types.ModuleType("tensorrt")
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch._dynamo find_spec()s it
    exec(FAKE_TENSORRT, fake.__dict__)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trtb, "detect_sm", lambda: "8.9")
    out = shutil.copytree(engines("nvila"), tmp_path / "nvila")
    opts = MAIN["nvila"]
    msgs = []
    res = build(tiny_checkpoint("nvila"), out, options=opts, progress=msgs.append)
    assert res.status == "built" and any("export is up to date" in m for m in msgs)
    assert [c["onnx"] for c in fake.CALLS] == ["tower.fp32.onnx", "projector.fp32.onnx"]  # no re-export
    m = res.manifest
    assert m.stage == "engines" and m.target.sm == "8.9" and "int8" in m.vision["files"]["tower"]
    assert build(tiny_checkpoint("nvila"), out, options=opts, progress=False).status == "up-to-date"
    # the chat command's entry point: keyword options, a callable for progress, returns the directory
    from vila_edge.builder.build import build_engine_dir

    assert build_engine_dir(tiny_checkpoint("nvila"), out, progress=msgs.append, **dataclasses_asdict(opts)) == out


def dataclasses_asdict(opts):
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(opts).items() if k != "llm_precision"}


def test_cpu_tower_defaults_to_int8_only_when_its_recorded_cosine_allows(engines):
    from vila_edge.backends.ort_vision import INT8_MIN_COSINE, OrtVisionEngine

    path = engines("nvila")
    info = _manifest(path)["vision"]
    recorded = info["checks"]["tower_int8_vs_fp32"]["min"]

    def tower(checks_min, precision=None):
        stats = {**info["checks"]["tower_int8_vs_fp32"], "min": checks_min}
        given = {**info, "checks": {**info["checks"], "tower_int8_vs_fp32": stats}}
        eng = OrtVisionEngine(path / "vision", given, device="cpu", threads=1, precision=precision)
        return eng.describe()["tower"], eng.describe()["projector"]

    assert tower(0.999) == ("tower.int8.onnx", "projector.fp32.onnx")
    assert tower(0.99) == ("tower.fp32.onnx", "projector.fp32.onnx")
    assert tower(0.999, "fp32")[0] == "tower.fp32.onnx"  # --vision-precision fp32 wins
    assert tower(recorded)[0] == ("tower.int8.onnx" if recorded >= INT8_MIN_COSINE else "tower.fp32.onnx")
    no_check = {**info, "checks": {k: v for k, v in info["checks"].items() if k != "tower_int8_vs_fp32"}}
    assert OrtVisionEngine(path / "vision", no_check, device="cpu", threads=1).describe()["tower"] == "tower.fp32.onnx"


def test_cpu_tower_runs_tiles_one_batch_at_a_time_with_the_same_features(engines):
    """CPU default: CPU_TILE_BATCH tiles per tower run, no arena (bounded activations, issue 19 P6); the
    features equal those of one run over all tiles."""
    from vila_edge.backends.ort_vision import CPU_TILE_BATCH, OrtVisionEngine

    path = engines("nvila")
    info = _manifest(path)["vision"]
    default = OrtVisionEngine(path / "vision", info, device="cpu", threads=1, precision="fp32")
    at_once = OrtVisionEngine(path / "vision", info, device="cpu", threads=1, precision="fp32", tile_batch=0, arena=True)
    assert default.max_batch == CPU_TILE_BATCH and at_once.max_batch == 0
    size = info["image_size"]
    x = np.random.default_rng(3).standard_normal((3, 3, size, size)).astype(np.float32)
    a, b = default.encode(x), at_once.encode(x)
    assert a.shape == b.shape and a.shape[0] == 3
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
