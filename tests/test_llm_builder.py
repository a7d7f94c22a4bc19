"""ORT decoder build (onnxruntime-genai builder) parity against PyTorch, the SmolLM2 conversion,
and the TensorRT-LLM build plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vila_edge.builder.llm_onnx import build_llm_onnx, dequantized_weights, reference_model

PARITY_STEPS = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: the quantizer is faster on one thread


# ---- tiny HF checkpoints ----------------------------------------------------------------------

FAMILY_OF = {"llama": "vila1.5", "qwen2": "nvila-lite"}  # Llama untied; Qwen2 tied, with q/k/v biases


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """llm/ folders of the tiny fixtures (vila_edge.testing), one per architecture, made once."""
    from vila_edge.testing import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    made = {}

    def get(architecture: str) -> Path:
        if architecture not in made:
            family = FAMILY_OF[architecture]
            made[architecture] = make_tiny_checkpoint(family, root / f"tiny-{family}", seed=3) / "llm"
        return made[architecture]

    return get


# ---- drivers -----------------------------------------------------------------------------------


def ort_greedy(decoder_dir: Path, info: dict, prompt: list[int], steps: int):
    """Greedy decode with a plain InferenceSession (past fed back as separate tensors)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(decoder_dir / info["files"]["decoder"]), options,
                                   providers=["CPUExecutionProvider"])
    embed = np.load(decoder_dir / info["files"]["embed_tokens"]).astype(np.float32)
    names = [o.name for o in session.get_outputs()]
    past = {}
    # grouped attention scatters new rows into a buffer that holds the whole context (functionally here: each
    # run returns the updated buffer); GroupQueryAttention takes the past at its length
    rows = len(prompt) + steps if info.get("attention") == "grouped" else 0
    for layer in range(info["num_layers"]):
        for kind in ("key", "value"):
            past[info["inputs"][f"past_{kind}"] % layer] = np.zeros(
                (1, info["num_kv_heads"], rows, info["head_dim"]), info.get("kv_dtype", "float32"))
    ids, new, logits_per_step, tokens = list(prompt), list(prompt), [], []
    for _ in range(steps):
        feeds = {"inputs_embeds": embed[new][None], "attention_mask": np.ones((1, len(ids)), np.int64), **past}
        if info.get("logits_to_keep_input"):  # builder decoders slice the last k positions' logits
            feeds[info["logits_to_keep_input"]] = np.array([1], np.int64)
        outputs = dict(zip(names, session.run(None, feeds), strict=True))
        logits = outputs["logits"][0, -1]
        token = int(np.argmax(logits))
        logits_per_step.append(logits)
        tokens.append(token)
        ids.append(token)
        new = [token]
        past = {info["inputs"][f"past_{kind}"] % layer: outputs[info["outputs"][f"present_{kind}"] % layer]
                for layer in range(info["num_layers"]) for kind in ("key", "value")}
    return tokens, np.stack(logits_per_step)


@torch.no_grad()
def torch_greedy(model, embed: np.ndarray, prompt: list[int], steps: int):
    """Greedy decode recomputing the whole sequence each step (no cache: the simplest oracle)."""
    table = torch.from_numpy(embed.astype(np.float32))
    ids, logits_per_step, tokens = list(prompt), [], []
    for _ in range(steps):
        logits = model(inputs_embeds=table[ids][None]).logits[0, -1]
        token = int(torch.argmax(logits))
        logits_per_step.append(logits.numpy())
        tokens.append(token)
        ids.append(token)
    return tokens, np.stack(logits_per_step)


def assert_parity(decoder_dir: Path, info: dict, oracle, prompt: list[int], steps: int = PARITY_STEPS):
    embed = np.load(decoder_dir / info["files"]["embed_tokens"])
    ort_tokens, ort_logits = ort_greedy(decoder_dir, info, prompt, steps)
    ref_tokens, ref_logits = torch_greedy(oracle, embed, prompt, steps)
    # the first step compares prefill logits; later steps each run one cached decode step
    relative = np.abs(ort_logits - ref_logits).max(axis=1) / np.abs(ref_logits).max(axis=1)
    print(f"{decoder_dir.name}: max relative logit error {relative.max():.2e} over {steps} steps")
    assert relative.max() <= 1e-3, relative
    assert ort_tokens == ref_tokens
    return relative.max()


def assert_graph_weights_match(decoder_dir: Path, oracle, atol: float = 0.0):
    """The decoder's own weights (read back from the graph) are the oracle's weights."""
    graph = dequantized_weights(decoder_dir)
    state = oracle.state_dict()
    expected = {k for k in state if k != "model.embed_tokens.weight" and "rotary" not in k}
    assert set(graph) == expected, set(graph) ^ expected
    for name, value in graph.items():
        np.testing.assert_allclose(value, state[name].numpy(), rtol=0, atol=atol, err_msg=name)


# ---- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,quant,lm_head", [
    ("llama", "awq", "int4"),  # our AWQ body + our asymmetric int4 head (vocab 736 packs by 8)
    ("qwen2", "rtn", "int8"),  # default int8 head (the builder's); tied embeddings, q/k/v biases
    ("qwen2", "builder", "int4"),  # the builder's own symmetric int4 everywhere (vocab 483: its head too)
])
def test_int4_decoder_matches_dequantized_pytorch(tmp_path, tiny_llm, family, quant, lm_head):
    llm = tiny_llm(family)
    config = json.loads((llm / "config.json").read_text())
    out = tmp_path / "decoder"
    info = build_llm_onnx(llm, out, precision="int4", quant=quant, group_size=64, accuracy_level=1, lm_head=lm_head,
                          progress=False, awq_dir=tmp_path / "awq", calib_samples=4, calib_seqlen=64)
    assert info["inputs"]["inputs_embeds"] == "inputs_embeds" and info["inputs"]["past_key"] == "past_key_values.%d.key"
    head_bits = 8 if lm_head == "int8" else 4
    assert info["matmulnbits"] == {"count": 2 * 5 + 1, "accuracy_levels": [1], "block_sizes": [64],
                                   "bits": sorted({4, head_bits})}
    expected_head = {("int4", "awq"): "rtn-int4", ("int8", "rtn"): "builder-rtn-int8-symmetric",
                     ("int4", "builder"): "builder-rtn-int4-symmetric"}[(lm_head, quant)]
    assert info["lm_head"]["quant"] == expected_head and info["lm_head"]["group_size"] == 64
    assert (info["num_layers"], info["num_kv_heads"], info["head_dim"], info["hidden"]) == (2, 2, 32, 128)
    assert info["vocab_size"] == config["vocab_size"]
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["session_options"]["intra_op_num_threads"] == info["threads"]
    assert genai["search"]["past_present_share_buffer"] is True
    embed = np.load(out / "embed_tokens.npy")
    assert embed.shape == (config["vocab_size"], 128) and embed.dtype in (np.float16, np.float32)
    if family == "qwen2":  # q/k/v biases survive into the decoder (the builder drops only all-zero biases)
        import onnx

        names = {i.name for i in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
        assert any("qkv_proj.Add.bias" in n or "q_proj.Add.bias" in n for n in names)
    source = tmp_path / "awq" if quant in ("awq", "rtn") else llm
    oracle = reference_model(source, info, decoder_dir=out)
    if quant != "builder":  # (the builder's own codes exist only in the graph: nothing independent to compare)
        assert_graph_weights_match(out, oracle)
    assert_parity(out, info, oracle, prompt=[5, 17, 99, 250, 3, 42, 7])


def test_fp16_kv_cache_decoder(tmp_path, tiny_llm):
    """kv_dtype="float16": past/present and GroupQueryAttention in fp16 (two Casts a layer), the same
    quantized weights as the fp32-cache build. Tolerance vs the float oracle on those weights: 2e-3 relative
    logits (K and V rounded to fp16 carry ~5e-4 relative error into attention; the fp32 cache stays under
    1e-3, assert_parity) and the same 16 greedy tokens; the runtime engine runs it with an fp16 cache."""
    from vila_edge.backends.ort_llm import OrtLLMEngine

    llm = tiny_llm("qwen2")
    common = dict(precision="int4", quant="rtn", group_size=64, accuracy_level=1, progress=False)
    info = build_llm_onnx(llm, tmp_path / "fp16kv", kv_dtype="float16", awq_dir=tmp_path / "awq", **common)
    info32 = build_llm_onnx(llm, tmp_path / "fp32kv", **common)
    assert info["kv_dtype"] == "float16" and info["io_dtype"] == "float32" and info32["kv_dtype"] == "float32"
    graph, graph32 = dequantized_weights(tmp_path / "fp16kv"), dequantized_weights(tmp_path / "fp32kv")
    assert graph.keys() == graph32.keys()
    for name in graph:
        np.testing.assert_array_equal(graph[name], graph32[name], err_msg=name)
    oracle = reference_model(tmp_path / "awq", info, decoder_dir=tmp_path / "fp16kv")
    embed = np.load(tmp_path / "fp16kv" / info["files"]["embed_tokens"])
    prompt = [5, 17, 99, 250, 3, 42, 7]
    tokens, logits = ort_greedy(tmp_path / "fp16kv", info, prompt, PARITY_STEPS)
    tokens32, logits32 = ort_greedy(tmp_path / "fp32kv", info32, prompt, PARITY_STEPS)
    ref_tokens, ref_logits = torch_greedy(oracle, embed, prompt, PARITY_STEPS)
    relative = np.abs(logits - ref_logits).max(axis=1) / np.abs(ref_logits).max(axis=1)
    assert relative.max() <= 2e-3, relative
    assert tokens == ref_tokens == tokens32
    assert not np.array_equal(logits, logits32)  # the cache really is fp16
    engine = OrtLLMEngine(tmp_path / "fp16kv", threads=1, max_context=64)
    assert engine.kv_dtype == np.float16
    first = engine.forward(engine.embed(prompt))
    np.testing.assert_allclose(first, logits[0], rtol=0, atol=1e-5 * np.abs(logits[0]).max())
    with pytest.raises(ValueError, match="kv_dtype"):
        build_llm_onnx(llm, tmp_path / "bad", kv_dtype="bfloat16", **common)
    with pytest.raises(ValueError, match="onnxruntime-genai"):
        build_llm_onnx(llm, tmp_path / "bad", kv_dtype="float16", **{**common, "quant": "builder"})


def test_prequantized_autoawq_folder_builds_as_is(tmp_path, tiny_llm):
    from vila_edge.builder.awq import quantize_checkpoint
    from vila_edge.builder.awq_formats import dequantize_awq_checkpoint

    quantize_checkpoint(tiny_llm("qwen2"), tmp_path / "awq", group_size=32, method="rtn", progress=False)
    info = build_llm_onnx(tmp_path / "awq", tmp_path / "decoder", group_size=128, lm_head="float", progress=False)
    assert info["quant"] == "prequantized-autoawq" and info["group_size"] == 32  # the checkpoint's group wins
    assert info["matmulnbits"]["block_sizes"] == [32] and info["lm_head"] == {"quant": "float"}
    graph, expected = dequantized_weights(tmp_path / "decoder"), dequantize_awq_checkpoint(tmp_path / "awq")
    expected.setdefault("lm_head.weight", expected["model.embed_tokens.weight"])  # tied head
    for name, value in graph.items():
        np.testing.assert_allclose(value, expected[name].numpy(), rtol=0, atol=0, err_msg=name)


def test_fp32_decoder_matches_float_pytorch(tmp_path, tiny_llm):
    llm = tiny_llm("qwen2")
    info = build_llm_onnx(llm, tmp_path / "decoder", precision="fp32", progress=False, threads=1)
    assert info["matmulnbits"]["count"] == 0 and info["embed_dtype"] == "float32"
    oracle = reference_model(llm, info)
    assert_graph_weights_match(tmp_path / "decoder", oracle)
    assert_parity(tmp_path / "decoder", info, oracle, prompt=[11, 200, 33, 4])


def test_int4_build_rejects_unsupported_group_size(tmp_path, tiny_llm):
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128"):
        build_llm_onnx(tiny_llm("llama"), tmp_path / "decoder", group_size=96, progress=False)


# ---- streamed build (llm_stream) ----------------------------------------------------------------


def graph_contents(decoder_dir: Path):
    """(initializers by name, nodes as comparable tuples) of a built decoder."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(decoder_dir / "model.onnx"), load_external_data=True)
    tensors = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = [(n.op_type, n.domain, n.name, list(n.input), list(n.output),
              sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute)) for n in model.graph.node]
    return tensors, nodes


@pytest.mark.parametrize("family,quant,lm_head", [("llama", "awq", "int4"), ("qwen2", "rtn", "int8")])
def test_streamed_build_equals_genai_builder(tmp_path, tiny_llm, family, quant, lm_head):
    """The layer-streamed build writes the graph onnxruntime-genai's builder makes from the in-memory
    quantizer's checkpoint: same nodes, every initializer equal bit for bit, same embedding table."""
    options = dict(precision="int4", quant=quant, group_size=64, accuracy_level=1, lm_head=lm_head, progress=False,
                   calib_samples=4, calib_seqlen=64, threads=1)
    genai = build_llm_onnx(tiny_llm(family), tmp_path / "genai", writer="genai", **options)
    streamed = build_llm_onnx(tiny_llm(family), tmp_path / "stream", writer="stream", **options)
    (genai_tensors, genai_nodes), (stream_tensors, stream_nodes) = (graph_contents(tmp_path / d)
                                                                    for d in ("genai", "stream"))
    assert stream_nodes == genai_nodes
    assert set(stream_tensors) == set(genai_tensors)
    for name, value in genai_tensors.items():
        assert value.dtype == stream_tensors[name].dtype and np.array_equal(value, stream_tensors[name]), name
    assert np.array_equal(np.load(tmp_path / "genai" / "embed_tokens.npy"), np.load(tmp_path / "stream" / "embed_tokens.npy"))
    assert json.loads((tmp_path / "genai" / "genai_config.json").read_text()) == \
        json.loads((tmp_path / "stream" / "genai_config.json").read_text())
    for key in ("quant", "group_size", "lm_head", "matmulnbits", "inputs", "outputs", "embed_dtype", "eos_token_id"):
        assert streamed[key] == genai[key], key
    if quant == "awq":
        assert streamed["awq"]["mean_block_error_vs_rtn"] == genai["awq"]["mean_block_error_vs_rtn"]


def _write_wide_llm(folder: Path, layers: int, hidden: int = 1024, intermediate: int = 4096, vocab: int = 512) -> int:
    """A Llama llm/ folder of float16 random weights (no tokenizer: RTN needs none); returns one layer's bytes."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
              "num_key_value_heads": hidden // 64, "vocab_size": vocab, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": "float16"}
    (folder / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)

    def weight(*shape):
        return (torch.rand(*shape, generator=generator) * 0.04 - 0.02).to(torch.float16)

    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
              "mlp.down_proj": (hidden, intermediate)}
    for index in range(layers):  # one shard per layer, with an index: the sharded layout of real checkpoints
        tensors = {f"model.layers.{index}.{name}.weight": weight(*shape) for name, shape in shapes.items()}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{index}.{norm}.weight"] = torch.ones(hidden, dtype=torch.float16)
        save_file(tensors, str(folder / f"model-{index:05d}.safetensors"))
    save_file({"model.embed_tokens.weight": weight(vocab, hidden), "lm_head.weight": weight(vocab, hidden),
               "model.norm.weight": torch.ones(hidden, dtype=torch.float16)}, str(folder / "model-head.safetensors"))
    weight_map = {}
    for file in folder.glob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            weight_map.update(dict.fromkeys(handle.keys(), file.name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(2 * a * b for a, b in shapes.values())


PEAK_SCRIPT = """
import resource, sys
from vila_edge.builder.llm_onnx import build_llm_onnx
build_llm_onnx(sys.argv[1], sys.argv[2], quant="rtn", group_size=128, progress=False, threads=1, lm_head="int8")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_streamed_build_peak_memory_does_not_grow_with_layers(tmp_path):
    """2 vs 8 layers of the same width (one layer: 32 MiB of float16, 64 MiB as float32), each built in a fresh
    process: the peak RSS grows by less than one layer's bytes (the in-memory build grows by several per layer)."""
    import subprocess
    import sys

    peaks = {}
    for layers in (2, 8):
        layer_bytes = _write_wide_llm(tmp_path / f"llm{layers}", layers)
        result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / f"llm{layers}"),
                                 str(tmp_path / f"out{layers}")], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[layers] = int(result.stdout.split()[-1])
        info = json.loads((tmp_path / f"out{layers}" / "decoder_info.json").read_text())
        assert info["num_layers"] == layers and info["matmulnbits"]["count"] == 5 * layers + 1
    growth = peaks[8] - peaks[2]
    print(f"peak RSS: 2 layers {peaks[2] / 2**20:.0f} MiB, 8 layers {peaks[8] / 2**20:.0f} MiB, "
          f"one layer {layer_bytes / 2**20:.0f} MiB")
    assert growth < layer_bytes, peaks


@pytest.mark.slow
def test_smollm2_conversion_answers_paris():
    from transformers import AutoTokenizer, LlamaForCausalLM

    from vila_edge.models import smollm2_hf_checkpoint

    folder = smollm2_hf_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 3
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
    output = model.generate(prompt["input_ids"], max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_int4_decoder_parity(tmp_path):
    """SmolLM2 (GQA 9/3, tied head) int4 g64 through the builder vs the same weights in PyTorch."""
    from transformers import AutoTokenizer

    from vila_edge.models import smollm2_hf_checkpoint

    folder = smollm2_hf_checkpoint()
    # RTN keeps the test short; AWQ's folded scales go through the same loader (tiny-model tests)
    info = build_llm_onnx(folder, tmp_path / "decoder", precision="int4", quant="rtn", group_size=64,
                          accuracy_level=1, progress=False, awq_dir=tmp_path / "awq")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_dict=True)["input_ids"]
    assert info["lm_head"]["quant"] == "builder-rtn-int8-symmetric"  # the default head
    oracle = reference_model(tmp_path / "awq", info, decoder_dir=tmp_path / "decoder")
    assert_graph_weights_match(tmp_path / "decoder", oracle)
    assert_parity(tmp_path / "decoder", info, oracle, prompt=list(prompt))


# ---- TensorRT-LLM plan -------------------------------------------------------------------------


def _write_llm_config(folder: Path, **overrides) -> Path:
    """A VILA1.5-3b-like llm/config.json (doc §1.3) without weights: the plan needs only the config."""
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 2560, "intermediate_size": 6912,
              "num_hidden_layers": 32, "num_attention_heads": 20, "vocab_size": 32000,
              "max_position_embeddings": 4096, "model_max_length": 4096}
    config.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_trtllm_plan_for_vila15_3b(tmp_path):
    from vila_edge.builder.trtllm import plan_trtllm_build

    plan = plan_trtllm_build(_write_llm_config(tmp_path / "llm"), tokens_per_image=196, max_images=1)
    assert (plan.quant_algo, plan.qformat, plan.group_size, plan.dtype) == ("W4A16_AWQ", "int4_awq", 128, "float16")
    # every step re-sends the conversation as input: the engine takes inputs up to the context - 1 (issue 20, bug 4)
    assert plan.max_multimodal_len == 196 and plan.max_seq_len == 4096 and plan.max_input_len == 4096 - 1
    assert plan.max_num_tokens == plan.max_input_len
    build = plan.build_config()
    assert build["max_prompt_embedding_table_size"] == 196 and build["max_batch_size"] == 1
    # the TensorRT-LLM backend reads generation logits (it samples itself): without them it cannot run
    assert build["gather_generation_logits"] is True
    quant = plan.quantize_kwargs(tmp_path / "ckpt", tmp_path / "calib")
    assert quant["qformat"] == "int4_awq" and quant["awq_block_size"] == 128 and quant["model_dir"] == str(tmp_path / "llm")
    # trtllm-build spells it --max_prompt_embedding_table_size (alias --max_multimodal_len)
    assert {"--max_prompt_embedding_table_size", "--gather_generation_logits"} <= set(plan.trtllm_build_command("c", "e"))
    json.dumps(plan.to_json())


def test_trtllm_plan_scales_with_tiles_and_batch(tmp_path):
    from vila_edge.builder.trtllm import plan_trtllm_build

    # NVILA-8B-like: Qwen2, 8192 context, dynamic-S2 tiles of 256 tokens
    llm = _write_llm_config(tmp_path / "llm", architectures=["Qwen2ForCausalLM"], hidden_size=3584,
                            intermediate_size=18944, vocab_size=151648, max_position_embeddings=32768,
                            model_max_length=8192)
    plan = plan_trtllm_build(llm, tokens_per_image=256, max_images=12, max_batch_size=2, max_output_len=1024)
    assert plan.max_multimodal_len == 2 * 12 * 256 and plan.max_seq_len == 8192 and plan.max_input_len == 8191
    assert plan.max_num_tokens == 2 * 8191
    with pytest.raises(ValueError, match="do not fit the 8192-token context"):
        plan_trtllm_build(llm, tokens_per_image=256, max_images=40)
    with pytest.raises(ValueError, match="group size"):
        plan_trtllm_build(llm, tokens_per_image=256, group_size=32)


def test_trtllm_calibration_set_is_offline_jsonl(tmp_path):
    from vila_edge.builder.trtllm import write_calibration_dataset

    folder = write_calibration_dataset(tmp_path / "calib", n_samples=8)
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(len(r["text"]) > 200 for r in rows)


def test_trtllm_engine_build(tmp_path, tiny_llm):
    from vila_edge.builder.trtllm import TrtLlmUnavailable, build_trtllm_engine, plan_trtllm_build, trtllm_import_error

    plan = plan_trtllm_build(tiny_llm("llama"), tokens_per_image=16, max_images=2, max_output_len=64)
    if trtllm_import_error() is not None:
        with pytest.raises(TrtLlmUnavailable, match="tensorrt_llm is not importable"):
            build_trtllm_engine(plan, tmp_path / "engine")
        pytest.skip(trtllm_import_error())
    info = build_trtllm_engine(plan, tmp_path / "engine")
    assert (tmp_path / "engine" / "llm" / "config.json").is_file()
    assert info["prompt_table"]["max_rows"] == 32 and info["plan"]["max_seq_len"] == 1024


def test_build_options_awq_calibration():
    from vila_edge.builder.build import BuildOptions
    from vila_edge.errors import VilaEdgeError

    assert BuildOptions(awq_calib="32x512").validate().awq_calibration() == (32, 512)
    for bad in ("32", "ax512", "0x512"):
        with pytest.raises(VilaEdgeError, match="--awq-calib"):
            BuildOptions(awq_calib=bad).validate()
    with pytest.raises(VilaEdgeError, match="--awq-grid"):
        BuildOptions(awq_grid=0).validate()


def test_build_options_kv_dtype():
    from vila_edge.builder.build import BuildOptions
    from vila_edge.errors import VilaEdgeError

    assert BuildOptions(kv_dtype="float16", llm_quant="rtn").validate().kv_dtype == "float16"
    assert BuildOptions(kv_dtype="float16", llm_precision="fp8").validate().kv_dtype == "float16"
    with pytest.raises(VilaEdgeError, match="--kv-dtype 'bfloat16' is not one of"):
        BuildOptions(kv_dtype="bfloat16").validate()
    with pytest.raises(VilaEdgeError, match="--kv-dtype float16 needs --llm-precision int4"):
        BuildOptions(kv_dtype="float16", llm_precision="int8").validate()


def test_grouped_attention_decoder(tmp_path, tiny_llm, monkeypatch):
    """attention="grouped": rotary + in-place ScatterND cache update + one GEMM per KV head instead of
    GroupQueryAttention. Against the float oracle on the same weights: logits within 1e-3 relative and the
    same greedy tokens (assert_parity's bounds); against the GQA build of the same weights within 1e-5
    (fp32 summation order). The engine starts with a 16-position buffer here, so the prompt's chunks and
    the decode steps grow it (16 -> 32 -> 64) and the rows cached before each growth must survive it;
    forward_all (prompt lookup) and truncate (its rollback) run on it too."""
    from vila_edge.backends import ort_llm

    monkeypatch.setattr(ort_llm, "GROUPED_FIRST_CAPACITY", 16)
    llm = tiny_llm("qwen2")
    common = dict(precision="int4", quant="rtn", group_size=64, accuracy_level=1, progress=False, threads=1)
    info = build_llm_onnx(llm, tmp_path / "grouped", attention="grouped", awq_dir=tmp_path / "awq", **common)
    info_gqa = build_llm_onnx(llm, tmp_path / "gqa", **common)
    assert info["attention"] == "grouped" and info_gqa["attention"] == "gqa"
    graph, graph_gqa = dequantized_weights(tmp_path / "grouped"), dequantized_weights(tmp_path / "gqa")
    assert graph.keys() == graph_gqa.keys()
    for name in graph:
        np.testing.assert_array_equal(graph[name], graph_gqa[name], err_msg=name)
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "grouped" / "model.onnx"), load_external_data=False).graph.node}
    assert "GroupQueryAttention" not in ops and {"ScatterND", "FusedMatMul", "RotaryEmbedding"} <= ops

    prompt = [5, 17, 99, 250, 3, 42, 7, 11, 13, 200, 8, 9, 31, 64, 2, 77, 90, 120, 6, 1]
    steps = 30
    runs = {}
    for name in ("grouped", "gqa"):
        eng = ort_llm.OrtLLMEngine(tmp_path / name, threads=1, max_context=128, prefill_chunk=8)
        assert eng.grouped == (name == "grouped")
        logits = [eng.forward(eng.embed(prompt))]
        tokens = []
        for _ in range(steps - 1):
            tokens.append(int(np.argmax(logits[-1])))
            logits.append(eng.forward(eng.embed([tokens[-1]])))
        tokens.append(int(np.argmax(logits[-1])))
        runs[name] = (tokens, np.stack(logits), eng)
    tokens, logits, eng = runs["grouped"]
    assert eng.capacity == 64 and runs["gqa"][2].capacity == 128
    np.testing.assert_allclose(logits, runs["gqa"][1], rtol=0, atol=1e-5 * np.abs(runs["gqa"][1]).max())
    oracle = reference_model(tmp_path / "awq", info, decoder_dir=tmp_path / "grouped")
    ref_tokens, ref_logits = torch_greedy(oracle, np.load(tmp_path / "grouped" / info["files"]["embed_tokens"]),
                                          prompt, steps)
    relative = np.abs(logits - ref_logits).max(axis=1) / np.abs(ref_logits).max(axis=1)
    assert relative.max() <= 1e-3, relative
    assert tokens == ref_tokens == runs["gqa"][0]
    assert_parity(tmp_path / "grouped", info, oracle, prompt=prompt[:7])  # plain session.run, no IO binding

    # a verification run of 4 positions (all logits) and a rollback, as prompt lookup runs them
    length = eng.length
    batch = tokens[-4:]
    rows = eng.forward_all(batch, eng.embed(batch))
    eng.truncate(length)
    one = [eng.forward(eng.embed([t])) for t in batch]
    np.testing.assert_allclose(rows, np.stack(one), rtol=0, atol=1e-5 * np.abs(rows).max())


def test_build_options_attention():
    from vila_edge.builder.build import BuildOptions
    from vila_edge.errors import VilaEdgeError

    assert BuildOptions(attention="grouped").validate().attention == "grouped"
    with pytest.raises(VilaEdgeError, match="--attention 'flash' is not one of"):
        BuildOptions(attention="flash").validate()
    with pytest.raises(VilaEdgeError, match="--attention grouped needs --llm-precision int4"):
        BuildOptions(attention="grouped", llm_precision="int8").validate()
    with pytest.raises(VilaEdgeError, match="fp32 KV cache"):
        BuildOptions(attention="grouped", kv_dtype="float16").validate()
