"""TensorRT / TensorRT-LLM: what vila-edge passes, checked per supported release against tables of that
release's signatures written from the upstream sources, and our own logic around them (issue 20).

Neither package can be installed here (no NVIDIA GPU), so the fakes below stand in for them, built
from the tables: they accept exactly the upstream parameters / enum names and nothing else, and
emulate the upstream behaviour the bugs hinged on (a KeyError for a missing required build key, a
TypeError for an unknown keyword, a removed BuilderFlag, a refused timing cache, the "vila" path
switch). Real files, real ONNX graphs and the real vila-edge code run everywhere else.

Where a table cites a tag as UNVERIFIED, the file was read from a stored snapshot of that release
series, not at the tag itself (the TensorRT-LLM repository is too large to fetch whole here).

On a machine with the packages, `test_installed_*` run the same checks against the real ones, and
the GPU tests to run are named in GPU_TESTS.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from vila_edge.backends import trtllm_llm as trtllm_backend
from vila_edge.backends.base import ContextOverflow
from vila_edge.builder import tensorrt as trtb
from vila_edge.builder import trtllm
from vila_edge.builder.build import BuildOptions, build
from vila_edge.engine_dir import read_manifest
from vila_edge.errors import EngineError

GPU_TESTS = (
    "on a GPU machine with tensorrt (+ tensorrt_llm): PYTHONPATH=$PWD python -m pytest -q "
    "tests/test_tensorrt_conformance.py -k installed "
    "tests/test_vision_builder.py::test_tensorrt_engines_build_and_run "
    "tests/test_runtime.py::test_tensorrt_vision_engine_matches_onnxruntime "
    "tests/test_llm_builder.py::test_trtllm_engine_build "
    "tests/test_runtime.py::test_tensorrt_llm_engine_matches_onnxruntime"
)

# ---- TensorRT Python API, per release -------------------------------------------------------------
# NVIDIA/TensorRT python/src/infer/pyCore.cpp at each tag (`py::enum_<BuilderFlag>` and
# `py::enum_<NetworkDefinitionCreationFlag>`), read with git at v8.6.1, v10.3.0, v10.13.0, v11.0.
# Every method vila-edge calls (create_network(flags=0), create_builder_config, set_memory_pool_limit,
# set_flag, create_optimization_profile / set_shape, create_timing_cache(serialized_timing_cache),
# set_timing_cache(cache, ignore_mismatch) -> bool, get_timing_cache() -> cache or None,
# build_serialized_network, OnnxParser.parse_from_file, and the runtime's get_tensor_name /
# num_io_tensors / get_tensor_mode / get_tensor_dtype / get_tensor_profile_shape / set_input_shape /
# set_tensor_address / execute_async_v3) is bound at all four tags.
TENSORRT = {
    "8.6.1": {"BuilderFlag": {"FP16", "INT8", "FP8", "TF32", "REFIT"},
              "NetworkDefinitionCreationFlag": {"EXPLICIT_BATCH", "EXPLICIT_PRECISION"}},
    "10.3.0": {"BuilderFlag": {"FP16", "BF16", "INT8", "FP8", "TF32", "REFIT"},
               "NetworkDefinitionCreationFlag": {"EXPLICIT_BATCH", "STRONGLY_TYPED"}},
    # 10.12 deprecated FP16/BF16/INT8 ("Superseded by strong typing", python/docstrings/infer/pyCoreDoc.h)
    "10.13.0": {"BuilderFlag": {"FP16", "BF16", "INT8", "FP8", "TF32", "REFIT"},
                "NetworkDefinitionCreationFlag": {"EXPLICIT_BATCH", "STRONGLY_TYPED"}},
    # 11.0: no FP16/BF16/INT8/FP8 builder flags; STRONGLY_TYPED "Deprecated: always enabled"
    "11.0": {"BuilderFlag": {"TF32", "REFIT", "DEBUG"},
             "NetworkDefinitionCreationFlag": {"STRONGLY_TYPED"}},
}

# ---- TensorRT-LLM, per release ---------------------------------------------------------------------
# tensorrt_llm/builder.py BuildConfig.from_dict: keys popped without a default (KeyError when absent)
# and the keys it reads; plugin_config keys go to PluginConfig (tensorrt_llm/plugin/plugin.py).
BUILD_CONFIG_KEYS = {
    "max_input_len", "max_seq_len", "max_batch_size", "max_beam_width", "max_num_tokens", "opt_num_tokens",
    "opt_batch_size", "max_prompt_embedding_table_size", "gather_context_logits", "gather_generation_logits",
    "strongly_typed", "profiling_verbosity", "enable_debug_output", "max_draft_len", "speculative_decoding_mode",
    "use_refit", "input_timing_cache", "output_timing_cache", "lora_config", "max_encoder_input_len",
    "weight_streaming", "use_strip_plan", "weight_sparsity", "plugin_config", "dry_run", "visualize_network",
}
PLUGIN_KEYS = {"gemm_plugin", "use_paged_context_fmha", "context_fmha", "paged_kv_cache", "remove_input_padding"}

# tensorrt_llm/runtime/model_runner_cpp.py ModelRunnerCpp.from_dir / generate (keyword names).
FROM_DIR_0_12 = (
    "engine_dir, *, lora_dir=None, rank=0, max_batch_size=None, max_input_len=None, max_output_len=None, "
    "max_beam_width=None, max_attention_window_size=None, sink_token_length=None, "
    "kv_cache_free_gpu_memory_fraction=None, medusa_choices=None, lookahead_config=None, debug_mode=False, "
    "lora_ckpt_source='hf', gpu_weights_percent=1, max_tokens_in_paged_kv_cache=None, "
    "kv_cache_enable_block_reuse=False, enable_chunked_context=False, is_enc_dec=False, multi_block_mode=True, "
    "enable_context_fmha_fp32_acc=None")
GENERATE_0_12 = (
    "batch_input_ids, *, position_ids=None, encoder_input_ids=None, encoder_input_features=None, "
    "encoder_output_lengths=None, sampling_config=None, lora_uids=None, lookahead_config=None, streaming=False, "
    "stopping_criteria=None, logits_processor=None, max_new_tokens=1, end_id=None, pad_id=None, "
    "bad_words_list=None, stop_words_list=None, return_dict=False, output_sequence_lengths=False, "
    "output_log_probs=False, output_cum_log_probs=False, prompt_table=None, prompt_tasks=None, "
    "return_all_generated_tokens=False, **kwargs")
GENERATE_0_13 = GENERATE_0_12.replace("prompt_tasks=None, ", "prompt_tasks=None, input_token_extra_ids=None, ")
FROM_DIR_1_0 = FROM_DIR_0_12.replace(
    "kv_cache_free_gpu_memory_fraction=None, medusa_choices=None,",
    "kv_cache_free_gpu_memory_fraction=None, cross_kv_cache_fraction=None, medusa_choices=None, "
    "eagle_choices=None, eagle_posterior_threshold=None, eagle_use_dynamic_tree=False, "
    "eagle_dynamic_tree_max_top_k=None,") + (
    ", cuda_graph_mode=None, logits_processor_map=None, device_ids=None, is_orchestrator_mode=False, "
    "use_runtime_defaults=True, gather_generation_logits=False, use_variable_beam_width_search=False, "
    "mm_embedding_offloading=False, fail_fast_on_attention_window_too_large=False")
GENERATE_1_0 = GENERATE_0_13.replace("output_log_probs=False,", "output_generation_logits=False, output_log_probs=False,")

# tensorrt_llm/quantization/quantize_by_modelopt.py quantize_and_export (keyword-only, no **kwargs)
QUANTIZE_0_12 = (
    "*, model_dir, device, calib_dataset, dtype, qformat, kv_cache_dtype, calib_size, batch_size, "
    "calib_max_seq_length, awq_block_size, output_dir, tp_size, pp_size, seed, tokenizer_max_seq_length, "
    "num_medusa_heads=None, num_medusa_layers=None, max_draft_len=None, medusa_hidden_act=None, "
    "medusa_model_dir=None, quant_medusa_head=None")
QUANTIZE_CP = QUANTIZE_0_12.replace("pp_size, seed", "pp_size, cp_size, seed")
QUANTIZE_MODEL_NAME = QUANTIZE_CP.replace("*, model_dir,", "*, model_name,")

TRTLLM = {
    # v0.12.0 and v0.12.0-jetson (README4Jetson.md: JetPack 6.1, TensorRT 10.3). UNVERIFIED tag: builder.py
    # read from a 0.11/0.12-series snapshot (from_dict pops builder_opt, strongly_typed defaults False);
    # generate lacks input_token_extra_ids, which NVIDIA/TensorRT-LLM PR #2184 (2024-09-03, after 0.12.0)
    # added ("Supported KV cache reuse for P-Tuning"); quantize_and_export without cp_size UNVERIFIED.
    "0.12.0": {"required_build_keys": {"max_input_len", "max_seq_len", "max_batch_size", "max_beam_width",
                                       "max_num_tokens", "opt_num_tokens"},
               "from_dir": FROM_DIR_0_12, "generate": GENERATE_0_12, "quantize_and_export": QUANTIZE_0_12,
               "runner_attr": "session"},
    # 0.13 series (UNVERIFIED tag: a snapshot whose ModelRunnerCpp has `self.session = executor` and
    # generate(input_token_extra_ids=...), from_dir without gather_generation_logits)
    "0.13.0": {"required_build_keys": set(), "from_dir": FROM_DIR_0_12, "generate": GENERATE_0_13,
               "quantize_and_export": QUANTIZE_CP, "runner_attr": "session"},
    # 1.0 series (UNVERIFIED tag: builder.py where from_dict defaults every key from the dataclass, as in
    # the 1.0.0rc4 snapshot; from_dir with gather_generation_logits; a quantize_and_export naming
    # model_name). The executor attribute is UNVERIFIED there: both names are looked for.
    "1.0.0": {"required_build_keys": set(), "from_dir": FROM_DIR_1_0, "generate": GENERATE_1_0,
              "quantize_and_export": QUANTIZE_MODEL_NAME, "runner_attr": "executor"},
}


def signature_of(params: str) -> inspect.Signature:
    scope: dict = {}
    exec(f"def f({params}): pass", scope)  # noqa: S102 - a signature literal from the tables above
    return inspect.signature(scope["f"])


def with_signature(params: str, body):
    """A function with exactly the upstream signature (calls outside it raise TypeError like upstream)."""
    signature = signature_of(params)

    def function(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        return body(bound.arguments)

    function.__signature__ = signature
    return function


# ---- fakes of the packages (no NVIDIA GPU here), strict to the tables --------------------------------


def fake_tensorrt(version: str) -> types.ModuleType:
    """The parts of the TensorRT Python API the builder uses, with `version`'s enum names only."""
    table = TENSORRT[version]
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.CALLS = []
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.BuilderFlag = type("BuilderFlag", (), {name: name.lower() for name in table["BuilderFlag"]})
    trt.NetworkDefinitionCreationFlag = type(
        "NetworkDefinitionCreationFlag", (), {n: i for i, n in enumerate(sorted(table["NetworkDefinitionCreationFlag"]))})
    trt.MemoryPoolType = type("MemoryPoolType", (), {"WORKSPACE": "workspace"})

    class Network:
        inputs: dict = {}

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            graph = onnx.load(path, load_external_data=False).graph
            self.network.inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input}
            self.network.path = path
            return True

    class Cache:
        def __init__(self, blob):
            self.blob = bytes(blob)

        def serialize(self):
            return b"cache-of-this-gpu"

    class Config:
        def __init__(self):
            self.flags, self.cache = [], None

        def set_memory_pool_limit(self, pool, size):
            pass

        def set_flag(self, flag):
            self.flags.append(flag)

        def add_optimization_profile(self, profile):
            self.profile = profile

        def create_timing_cache(self, serialized_timing_cache):
            return Cache(serialized_timing_cache)

        def set_timing_cache(self, cache, ignore_mismatch):
            # a cache made on another GPU fails the header check unless ignore_mismatch (pyCoreDoc.h)
            if cache.blob.startswith(b"other-gpu") and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            self.shape = (name, mn, opt, mx)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags=0):
            trt.CALLS.append(("create_network", flags))
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.CALLS.append(("build", Path(network.path).name, sorted(config.flags)))
            return b"plan:" + Path(network.path).name.encode()

    trt.OnnxParser, trt.Builder = OnnxParser, Builder
    return trt


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """A real export with the combined graph (fp32 graphs; float32 I/O like every vila-edge graph)."""
    out = tmp_path_factory.mktemp("trt-conformance") / "vila15"
    return build(tiny_checkpoint("vila1.5"), out, options=BuildOptions(combined_vision=True, skip_llm=True),
                 stage="export", progress=False).path


def manifest_of(path: Path, *, fp16_graphs: bool = False):
    manifest = read_manifest(path)
    if fp16_graphs:  # the fp16 variant's entries (pointing at the fp32 files: only names matter to the plan)
        for entry in manifest.vision["files"].values():
            entry["fp16"] = entry.get("fp16", entry.get("fp32"))
    return manifest


# ---- TensorRT: bug 7 (TensorRT 11 has no FP16 flag), bug 6 (config dtype), timing cache ----------------


@pytest.mark.parametrize("version", sorted(TENSORRT))
def test_engine_build_uses_only_names_the_release_has(version, exported, monkeypatch, tmp_path):
    trt = fake_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    manifest = manifest_of(exported, fp16_graphs=True)
    specs = trtb.plan_engines(manifest, precision="fp16", sm="8.7")  # the installed (fake) version decides
    built = trtb.build_engines(exported, specs, vision_meta=manifest.vision, log=lambda m: None)
    assert set(built) == {"tower", "projector", "combined"}
    creates = [flags for name, flags in [c[:2] for c in trt.CALLS] if name == "create_network"]
    builds = [c for c in trt.CALLS if c[0] == "build"]
    if version.startswith("8."):
        assert set(creates) == {1 << trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH}
    else:
        assert set(creates) == {0}  # explicit batch is implied from 10; 11 is always strongly typed
    if version.startswith("11"):
        # no precision flags exist: fp16 comes from the fp16 graphs themselves
        assert all(flags == [] for *_, flags in builds)
        assert all(s.onnx == manifest.vision["files"][s.name]["fp16"] for s in specs)
    else:
        assert all(flags == ["fp16"] for *_, flags in builds)


def test_tensorrt_11_fp16_without_an_fp16_graph_is_one_line(exported, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.0"))
    manifest = manifest_of(exported)
    assert all("fp16" not in e for e in manifest.vision["files"].values())
    with pytest.raises(EngineError, match="strongly typed.*--precision fp16, or use --trt-precision fp32"):
        trtb.plan_engines(manifest, precision="fp16", sm="9.0")
    fp32 = trtb.plan_engines(manifest, precision="fp32", sm="9.0")
    assert {s.flags for s in fp32} == {()}


def test_a_flag_the_installed_tensorrt_lacks_is_an_engine_error(exported, monkeypatch):
    """An fp16 plan made for TensorRT 10 but built by TensorRT 11: one clear line, not AttributeError."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("11.0"))
    spec = trtb.plan_engines(manifest_of(exported), precision="fp16", sm="8.7", trt_version="10.3.0")[0]
    assert spec.flags == ("fp16",)
    with pytest.raises(EngineError, match=r"no BuilderFlag.FP16 \(removed in TensorRT 11"):
        trtb.build_engine(spec, exported, log=lambda m: None)


def test_combined_config_dtype_is_the_graph_io_dtype(exported, monkeypatch, tmp_path):
    """TensorRT-LLM's multimodal runner casts the image to builder_config.precision and declares that
    dtype for the engine input: it must be the graph's I/O dtype (float32), not the fp16 math."""
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0"))
    manifest = manifest_of(exported)
    specs = [s for s in trtb.plan_engines(manifest, precision="fp16", sm="8.7") if s.name == "combined"]
    assert specs[0].flags == ("fp16",)
    trtb.build_engines(exported, specs, vision_meta=manifest.vision, log=lambda m: None)
    config = json.loads((exported / "vision/trtllm/config.json").read_text())["builder_config"]
    graph = onnx.load(str(exported / specs[0].onnx), load_external_data=False).graph
    assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert config["precision"] == "float32"
    # and a graph with float16 I/O says float16 (real ONNX files)
    for elem, name in ((TensorProto.FLOAT16, "float16"), (TensorProto.FLOAT, "float32")):
        x = helper.make_tensor_value_info("input", elem, [None, 3])
        y = helper.make_tensor_value_info("encoder_output", elem, [None, 3])
        model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["input"], ["encoder_output"])],
                                                    "g", [x], [y]))
        onnx.save(model, tmp_path / f"{name}.onnx")
        assert trtb.graph_io_dtype(tmp_path / f"{name}.onnx") == name


def test_timing_cache_from_another_gpu_starts_a_new_one(exported, monkeypatch):
    trt = fake_tensorrt("10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cache_path = exported / trtb.TIMING_CACHE
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(b"other-gpu timing cache")
    spec = trtb.plan_engines(manifest_of(exported), precision="fp16", sm="8.7")[0]
    logs = []
    trtb.build_engines(exported, [spec], log=logs.append)
    assert any("another GPU or TensorRT version" in m for m in logs)
    assert cache_path.read_bytes() == b"cache-of-this-gpu"
    # a TensorRT that returns no cache (get_timing_cache() -> None) leaves the file alone, no crash
    Config = type(trt.Builder(None).create_builder_config())
    monkeypatch.setattr(Config, "get_timing_cache", lambda self: None)
    cache_path.write_bytes(b"kept")
    plan, cache = trtb.build_engine(spec, exported, b"kept", log=logs.append)
    assert plan.startswith(b"plan:") and cache is None
    trtb.build_engines(exported, [spec], log=logs.append)
    assert cache_path.read_bytes() == b"kept"


# ---- TensorRT-LLM: conformance of what we pass, per release ---------------------------------------


def _llm_dir(root: Path, **overrides) -> Path:
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
              "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000,
              "max_position_embeddings": 2048, "model_max_length": 2048}
    config.update(overrides)
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture
def plan(tmp_path):
    # the demo checkpoint's name contains "vila", like the real ones (bug 5)
    return trtllm.plan_trtllm_build(_llm_dir(tmp_path / "VILA1.5-demo" / "llm"), tokens_per_image=64, max_images=4)


@pytest.mark.parametrize("version", sorted(TRTLLM))
def test_build_config_has_every_key_the_release_requires(version, plan):
    """Bug 1: 0.12's BuildConfig.from_dict pops opt_num_tokens without a default (KeyError)."""
    config = plan.build_config()
    assert TRTLLM[version]["required_build_keys"] <= set(config)
    assert set(config) <= BUILD_CONFIG_KEYS and set(config["plugin_config"]) <= PLUGIN_KEYS
    # the logged trtllm-build command says what the API build does: the same keys
    command = plan.trtllm_build_command("ckpt", "out")
    flags = {c[2:] for c in command if c.startswith("--")} - {"checkpoint_dir", "output_dir"}
    assert flags == {k for k, v in config.items() if v is not None and k != "plugin_config"} | set(config["plugin_config"])
    assert "--opt_num_tokens" not in command  # None: trtllm-build's own default


@pytest.mark.parametrize("version", sorted(TRTLLM))
def test_quantize_arguments_fit_each_release(version, plan, tmp_path):
    signature = signature_of(TRTLLM[version]["quantize_and_export"])
    chosen, missing = trtllm.signature_arguments(signature, plan.quantize_kwargs(tmp_path / "c", tmp_path / "d"),
                                                 aliases={"model_dir": "model_name"})
    assert missing == []
    signature.bind(**chosen)  # no unknown keyword
    assert str(plan.llm_dir) in (chosen.get("model_dir"), chosen.get("model_name"))
    # a required parameter we cannot fill is one clear line, not a TypeError inside TensorRT-LLM
    strict = with_signature("*, model_dir, new_required_thing", lambda args: args)
    with pytest.raises(trtllm.TrtLlmUnavailable, match="needs new_required_thing"):
        trtllm.call_with_signature(strict, {"model_dir": "x"}, what="quantize_and_export")


@pytest.mark.parametrize("version", sorted(TRTLLM))
def test_runner_arguments_fit_each_release(version):
    """Bug 2: 0.12/0.13's from_dir has no gather_generation_logits (keyword-only, no **kwargs)."""
    runner = types.SimpleNamespace(from_dir=with_signature(TRTLLM[version]["from_dir"], dict),
                                   generate=with_signature(TRTLLM[version]["generate"], dict))
    kwargs, extra_ids = trtllm_backend.runner_options(runner, 0.5)
    signature_of(TRTLLM[version]["from_dir"]).bind("engine", **kwargs)
    generate = signature_of(TRTLLM[version]["generate"])
    # input_token_extra_ids only where it is a real parameter (0.12 would swallow it in **kwargs)
    assert extra_ids == ("input_token_extra_ids" in generate.parameters)
    assert kwargs["kv_cache_enable_block_reuse"] is extra_ids
    assert ("gather_generation_logits" in kwargs) == ("gather_generation_logits" in signature_of(
        TRTLLM[version]["from_dir"]).parameters)


@pytest.mark.parametrize(("trtllm_version", "trt_version", "refused"), [
    ("0.12.0", "8.6.2", "JetPack 6.0"),  # JetPack 6.0 ships TensorRT 8.6
    ("0.12.0", "10.3.0", None),  # JetPack 6.1 / 6.2, v0.12.0-jetson
    ("0.11.0", "10.1.0", "older than 0.12"),
    ("0.16.0", "10.7.0", None),
    ("1.0.0rc4", "10.11.0", None),
    ("1.3.0rc23", "10.13.0", "no TensorRT engine backend"),
])
def test_version_switches(trtllm_version, trt_version, refused):
    reason = trtllm.trtllm_version_error(trtllm_version, trt_version)
    assert (reason is None) if refused is None else (refused in reason)


def test_readme_version_table_matches_the_code():
    """README "TensorRT / TensorRT-LLM versions": each row's verdict is what the code decides."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## TensorRT / TensorRT-LLM versions", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("| ") and not r.startswith("| Platform")
            and not r.startswith("| ---")]
    assert len(rows) >= 6
    for row in rows:
        _, _platform, trt, trt_llm, vision, llm, _ = [c.strip() for c in row.split("|")]
        trt_v = re.search(r"\d+(\.\d+)+", trt).group(0)
        assert vision.startswith("fp16 from the fp16 graph") == trtb.strongly_typed(trt_v), row
        llm_v = re.search(r"\d+(\.\d+)+\S*", trt_llm)
        if llm_v is None:
            assert llm.startswith("refused"), row
            continue
        reason = trtllm.trtllm_version_error(llm_v.group(0), trt_v)
        assert llm.startswith("refused") == (reason is not None), (row, reason)


# ---- TensorRT-LLM build: behaviour with a fake package --------------------------------------------


def fake_tensorrt_llm(version: str, calls: dict) -> dict[str, types.ModuleType]:
    """tensorrt_llm modules whose functions have `version`'s signatures and upstream's failure modes."""
    table = TRTLLM[version]
    mods = {name: types.ModuleType(name) for name in (
        "tensorrt_llm", "tensorrt_llm.builder", "tensorrt_llm.models", "tensorrt_llm.models.modeling_utils",
        "tensorrt_llm.quantization", "tensorrt_llm.quantization.quantize_by_modelopt", "tensorrt_llm.runtime")}
    mods["tensorrt_llm"].__version__ = version

    def quantize(args):
        model_dir = args.get("model_dir") or args["model_name"]
        if "vila" in model_dir:  # get_model: `if "vila" in ckpt_path: model = _get_vila_model(ckpt_path)`
            raise ModuleNotFoundError("No module named 'llava' (TensorRT-LLM took the path for a VILA repo)")
        if "vila" in model_dir.lower():  # get_tokenizer: `if "vila" in ckpt_path.lower(): ckpt_path += "/llm"`
            raise OSError(f"{model_dir}/llm: no tokenizer there")
        calls["quantize"], calls["quantized_dir"] = args, Path(model_dir).resolve()
        out = Path(args["output_dir"])
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"architecture": "LlamaForCausalLM"}))

    mods["tensorrt_llm.quantization.quantize_by_modelopt"].quantize_and_export = with_signature(
        table["quantize_and_export"], quantize)
    # the package-level re-exports some releases have (the builder no longer relies on them)
    mods["tensorrt_llm.quantization"].quantize_and_export = \
        mods["tensorrt_llm.quantization.quantize_by_modelopt"].quantize_and_export

    class BuildConfig:
        @classmethod
        def from_dict(cls, config, plugin_config=None):
            config = dict(config)
            for key in table["required_build_keys"]:
                config.pop(key)  # KeyError, as upstream
            assert set(config) <= BUILD_CONFIG_KEYS and set(config.get("plugin_config", {})) <= PLUGIN_KEYS
            calls["build_config"] = config
            return cls()

    class Engine:
        def save(self, path):
            Path(path).mkdir(parents=True)
            (Path(path) / "config.json").write_text("{}")

    def build_engine(model, build_config):
        calls["built"] = model
        return Engine()

    mods["tensorrt_llm.builder"].BuildConfig = BuildConfig
    mods["tensorrt_llm.builder"].build = mods["tensorrt_llm"].build = build_engine

    class Model:
        @classmethod
        def from_checkpoint(cls, ckpt_dir, config=None):
            return ("checkpoint", ckpt_dir)

        @classmethod
        def from_hugging_face(cls, hf_model_or_dir, dtype="auto", mapping=None, quant_config=None, **kwargs):
            if "vila" in str(hf_model_or_dir).lower():
                raise ModuleNotFoundError("No module named 'llava'")
            calls["from_hugging_face"] = (str(hf_model_or_dir), dtype, quant_config.quant_algo)
            return ("hf", cls.__name__)

    pretrained = types.SimpleNamespace(from_json_file=lambda p: types.SimpleNamespace(
        architecture=json.loads(Path(p).read_text())["architecture"]))
    mods["tensorrt_llm.models"].MODEL_MAP = {"LlamaForCausalLM": Model}
    mods["tensorrt_llm.models"].PretrainedConfig = pretrained
    mods["tensorrt_llm.models"].LLaMAForCausalLM = type("LLaMAForCausalLM", (Model,), {})
    mods["tensorrt_llm.models"].QWenForCausalLM = type("QWenForCausalLM", (Model,), {})
    mods["tensorrt_llm.models.modeling_utils"].QuantConfig = lambda quant_algo=None: types.SimpleNamespace(
        quant_algo=quant_algo)
    mods["tensorrt_llm.quantization"].QuantAlgo = types.SimpleNamespace(W4A16="W4A16", W4A16_AWQ="W4A16_AWQ")
    mods["tensorrt_llm.runtime"].ModelRunnerCpp = fake_runner_class(version, calls)
    for name, mod in mods.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
    return mods


@pytest.mark.parametrize("version", sorted(TRTLLM))
def test_llm_build_runs_through_each_release(version, plan, tmp_path, monkeypatch):
    """Bugs 1 and 5 end to end: the ModelOpt route, a checkpoint path with "vila" in it."""
    if getattr(plan, "quant_route", "modelopt_awq") != "modelopt_awq":
        plan.quant_route = "modelopt_awq"  # on a Jetson: test the x86 route all the same
    calls: dict = {}
    for name, mod in fake_tensorrt_llm(version, calls).items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0"))
    assert "vila" in plan.llm_dir.lower()
    info = trtllm.build_trtllm_engine(plan, tmp_path / "engine")
    model_dir = calls["quantize"].get("model_dir") or calls["quantize"]["model_name"]
    assert "vila" not in model_dir.lower() and calls["quantized_dir"] == Path(plan.llm_dir).resolve()
    assert calls["build_config"]["max_prompt_embedding_table_size"] == plan.max_multimodal_len
    assert info["versions"] == {"tensorrt_llm": version, "tensorrt": "10.3.0"}
    assert (tmp_path / "engine/llm/config.json").is_file() and not (tmp_path / "engine/trtllm_checkpoint").exists()
    assert not Path(model_dir).exists()  # the staging symlink is gone


def test_jetson_route_is_the_release_recipe(tmp_path, monkeypatch):
    """v0.12.0-jetson (README4Jetson.md): weight-only int4 via from_hugging_face, no ModelOpt calibration."""
    calls: dict = {}
    for name, mod in fake_tensorrt_llm("0.12.0", calls).items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0"))
    plan = trtllm.plan_trtllm_build(_llm_dir(tmp_path / "nvila-lite" / "llm"), tokens_per_image=64, jetson=True)
    assert (plan.quant_route, plan.quant_algo) == ("weight_only_int4", "W4A16")
    trtllm.build_trtllm_engine(plan, tmp_path / "engine", log=lambda m: None)
    path, dtype, algo = calls["from_hugging_face"]
    assert "quantize" not in calls and (dtype, algo) == ("float16", "W4A16") and "vila" not in path.lower()
    assert not (tmp_path / "engine" / "calibration").exists()


def test_llm_build_refuses_jetpack_60_and_removed_backends(plan, tmp_path, monkeypatch):
    calls: dict = {}
    for name, mod in fake_tensorrt_llm("0.12.0", calls).items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("8.6.1"))
    with pytest.raises(trtllm.TrtLlmUnavailable, match="JetPack 6.0"):
        trtllm.build_trtllm_engine(plan, tmp_path / "a", log=lambda m: None)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0"))
    monkeypatch.delattr(sys.modules["tensorrt_llm.runtime"], "ModelRunnerCpp")
    with pytest.raises(trtllm.TrtLlmUnavailable, match="no tensorrt_llm.runtime.ModelRunnerCpp"):
        trtllm.build_trtllm_engine(plan, tmp_path / "b", log=lambda m: None)
    assert calls == {}


# ---- TensorRT-LLM runtime: behaviour with a fake runner ----------------------------------------------

VOCAB, HIDDEN = 1000, 16


def fake_runner_class(version: str, calls: dict):
    """ModelRunnerCpp with `version`'s from_dir / generate signatures and upstream's input checks; its
    KV "cache" reuses blocks by the token ids (and extra ids when given), like the Executor."""
    table = TRTLLM[version]

    class Executor:
        def __init__(self):
            self.shut = False

        def shutdown(self):
            self.shut = True

    class ModelRunnerCpp:
        def __init__(self, args):
            self.args = args
            cfg = json.loads((Path(args["engine_dir"]) / "config.json").read_text())["build_config"]
            self.max_input_len = cfg["max_input_len"]
            setattr(self, table["runner_attr"], Executor())
            calls.setdefault("runners", []).append(self)
            self.requests = []

        def generate(self, *args, **kwargs):
            bound = signature_of(table["generate"]).bind(*args, **kwargs).arguments
            (seq,) = bound["batch_input_ids"]
            if len(seq) > self.max_input_len:  # _check_inputs
                raise RuntimeError(f"Maximum input length ({len(seq)}) exceeds the engine or specified limit "
                                   f"({self.max_input_len})")
            self.requests.append(bound)
            import torch

            return {"generation_logits": torch.zeros((1, 1, 1, VOCAB))}

    # the exact upstream signatures, as `inspect` sees them on the class
    ModelRunnerCpp.from_dir = staticmethod(with_signature(table["from_dir"], ModelRunnerCpp))
    ModelRunnerCpp.generate.__signature__ = signature_of("self, " + table["generate"])
    return ModelRunnerCpp


def _engine(tmp_path, monkeypatch, version: str, plan=None, **kwargs):
    torch = pytest.importorskip("torch")  # the backend holds its prompt table in torch
    zeros = torch.zeros
    # no CUDA here: the prompt table the backend puts on the GPU stays on the CPU
    monkeypatch.setattr(torch, "zeros", lambda *a, device=None, **k: zeros(*a, **k))
    calls: dict = {}
    for name, mod in fake_tensorrt_llm(version, calls).items():
        monkeypatch.setitem(sys.modules, name, mod)
    build = plan.build_config() if plan else {"max_input_len": 2047, "max_seq_len": 2048,
                                              "max_prompt_embedding_table_size": 64}
    engine_dir = tmp_path / f"engine-{version}"
    engine_dir.mkdir()
    (engine_dir / "config.json").write_text(json.dumps({
        "build_config": build, "pretrained_config": {"vocab_size": VOCAB, "hidden_size": HIDDEN, "dtype": "float16"}}))
    np.save(tmp_path / "embed.npy", np.zeros((VOCAB, HIDDEN), np.float32))
    engine = trtllm_backend.TensorRTLLMEngine(engine_dir, tmp_path / "embed.npy", {}, **kwargs)
    return engine, calls["runners"][0]


def _image(rows=4, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, HIDDEN)).astype(np.float32)


@pytest.mark.parametrize("version", sorted(TRTLLM))
def test_runtime_starts_on_each_release(version, tmp_path, monkeypatch):
    """Bug 2: the runner is created with keywords the release has; close() shuts its executor down."""
    engine, runner = _engine(tmp_path, monkeypatch, version)
    engine.forward_ids([5, 6, -1, -1, 7], np.concatenate([np.zeros((2, HIDDEN), np.float32), _image(2),
                                                          np.zeros((1, HIDDEN), np.float32)]))
    executor = getattr(runner, TRTLLM[version]["runner_attr"])
    engine.close()
    assert executor.shut


@pytest.mark.parametrize("version", ["0.13.0", "1.0.0"])
def test_a_new_image_never_reuses_the_old_images_kv(version, tmp_path, monkeypatch):
    """Bug 3: after reset()/truncate() a new image gets the same fake ids; its extra ids must differ."""
    engine, runner = _engine(tmp_path, monkeypatch, version)
    assert runner.args["kv_cache_enable_block_reuse"] is True
    text = np.zeros((2, HIDDEN), np.float32)
    engine.forward_ids([1, 2, -1, -1, -1], np.concatenate([text, _image(3, 1)]))
    engine.forward_ids([3], text[:1])  # a generated token: the image keeps its ids
    first, second = runner.requests
    assert second["input_token_extra_ids"][0][:5] == first["input_token_extra_ids"][0]
    engine.reset()
    engine.forward_ids([1, 2, -1, -1, -1], np.concatenate([text, _image(3, 2)]))
    engine.truncate(2)
    engine.forward_ids([-1, -1, -1, 4], np.concatenate([_image(3, 3), text[:1]]))
    a, b, c = (r["input_token_extra_ids"][0] for r in (first, runner.requests[2], runner.requests[3]))
    ids = [list(r["batch_input_ids"][0].tolist()) for r in (first, runner.requests[2], runner.requests[3])]
    assert ids[0][:5] == ids[1][:5] == ids[2][:5]  # same fake ids each time ...
    image_extra = [a[2], b[2], c[2]]
    assert len(set(image_extra)) == 3 and 0 not in image_extra  # ... told apart by the extra ids
    assert a[:2] == b[:2] == c[:2] == [0, 0] and c[5] == 0
    assert len(set(a[2:5])) == 1  # one image, one id


def test_release_without_extra_ids_runs_without_block_reuse(tmp_path, monkeypatch):
    """0.12 (v0.12.0-jetson): no input_token_extra_ids, so reuse would mix images: off, and said so."""
    engine, runner = _engine(tmp_path, monkeypatch, "0.12.0")
    assert runner.args["kv_cache_enable_block_reuse"] is False and "gather_generation_logits" not in runner.args
    engine.forward_ids([1, -1], np.zeros((2, HIDDEN), np.float32))
    assert "input_token_extra_ids" not in runner.requests[0]
    assert "no block reuse" in engine.describe()["kv_cache"]


def test_context_limits_agree_between_build_and_runtime(tmp_path, monkeypatch):
    """Bug 4: each step re-sends the conversation, so the runtime may hold what the build accepts as input."""
    plan = trtllm.plan_trtllm_build(_llm_dir(tmp_path / "llm"), tokens_per_image=64, max_images=4, max_output_len=512)
    engine, runner = _engine(tmp_path, monkeypatch, "1.0.0", plan)
    assert engine.max_context == plan.max_seq_len - 1 == plan.max_input_len == runner.max_input_len
    assert trtllm_backend.runtime_context_limit(plan.build_config(), 1000) == 1000
    # a conversation longer than context - max_output_len (the old input cap) still runs ...
    long = plan.max_seq_len - 100
    engine.forward_ids([i % VOCAB for i in range(long)], np.zeros((long, HIDDEN), np.float32))
    for _ in range(engine.max_context - long):
        engine.forward_ids([7], np.zeros((1, HIDDEN), np.float32))
    assert engine.length == engine.max_context and len(runner.requests[-1]["batch_input_ids"][0]) == engine.max_context
    # ... and one past the limit is the pipeline's ContextOverflow, not a generate error
    with pytest.raises(ContextOverflow):
        engine.forward_ids([7], np.zeros((1, HIDDEN), np.float32))


def test_build_staging_path_is_free_of_vila(tmp_path):
    """Bug 5 in isolation: the symlink TensorRT-LLM gets resolves to the checkpoint, without "vila"."""
    llm = _llm_dir(tmp_path / "NVILA-Lite-2B" / "llm")
    staging = tmp_path.parent / "staging-x"
    staging.mkdir(exist_ok=True)
    if "vila" in str(staging).lower():
        pytest.skip("the test's temp folder itself contains 'vila'")
    neutral = trtllm.neutral_model_dir(llm, staging)
    assert "vila" not in str(neutral).lower() and (neutral / "config.json").read_text() == (llm / "config.json").read_text()
    assert trtllm.neutral_model_dir(staging, staging) == staging.resolve()  # nothing to hide: unchanged
    with pytest.raises(trtllm.TrtLlmUnavailable, match="TMPDIR"):
        trtllm.neutral_model_dir(llm, tmp_path / "vila-tmp")


# ---- the real packages, where they exist ---------------------------------------------------------------


def test_installed_tensorrt_has_what_we_use():
    trt = pytest.importorskip("tensorrt", reason=f"TensorRT is not installed here; {GPU_TESTS}")
    flags = trtb.builder_flags("fp16", None, trt.__version__)
    assert all(hasattr(trt.BuilderFlag, f.upper()) for f in flags)
    for name in ("create_timing_cache", "set_timing_cache", "get_timing_cache", "set_memory_pool_limit"):
        assert hasattr(trt.IBuilderConfig, name)


def test_installed_tensorrt_llm_takes_our_arguments(plan, tmp_path):
    reason = trtllm.trtllm_import_error()
    if reason is not None:
        pytest.skip(f"{reason}; {GPU_TESTS}")
    trtllm_version, trt_version = trtllm.installed_versions()
    if trtllm.trtllm_version_error(trtllm_version, trt_version) or trtllm.trtllm_capability_error():
        pytest.skip(trtllm.trtllm_version_error(trtllm_version, trt_version) or trtllm.trtllm_capability_error())
    from tensorrt_llm.builder import BuildConfig
    from tensorrt_llm.runtime import ModelRunnerCpp

    BuildConfig.from_dict(plan.build_config())
    kwargs, _ = trtllm_backend.runner_options(ModelRunnerCpp, 0.5)
    inspect.signature(ModelRunnerCpp.from_dir).bind("engine", **kwargs)
