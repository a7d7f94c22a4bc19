"""Config resolution and the worked token-count examples of the reference doc."""

import pytest

from vila_edge.config import config_from_dicts
from vila_edge.errors import CheckpointError
from vila_edge.media.tiling import image_layout

SIGLIP_448 = {"architectures": ["SiglipVisionModel"], "image_size": 448, "patch_size": 14, "hidden_size": 1152,
              "num_hidden_layers": 27, "num_attention_heads": 16, "intermediate_size": 4304}
SIGLIP_384 = {**SIGLIP_448, "image_size": 384}
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
         "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 151648,
         "model_max_length": 8192}
QWEN2_15B = {**QWEN2, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2, "model_max_length": 4096}
LLAMA_3B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 2560, "intermediate_size": 6912,
            "num_hidden_layers": 32, "num_attention_heads": 20, "vocab_size": 32000, "model_max_length": 4096}
NVILA_8B = {"dynamic_s2": True, "image_aspect_ratio": "dynamic_s2", "s2_scales": "448,896,1344",
            "s2_max_split_size": 448, "s2_resize_output_to_scale_idx": -1, "mm_hidden_size": 3456, "hidden_size": 3584,
            "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch"}
NVILA_LITE = {"image_aspect_ratio": "dynamic", "mm_hidden_size": 1152, "hidden_size": 1536}
VILA15_3B = {"image_aspect_ratio": "resize", "s2": False, "s2_scales": "336,672,1008", "mm_hidden_size": 1152,
             "hidden_size": 2560}


def make(top, llm, vision, ptype, name="ckpt", tokens=None, projector_extra=None):
    return config_from_dicts(top=top, llm=llm, vision=vision, projector={"mm_projector_type": ptype, **(projector_extra or {})},
                             preprocessor=None, name=name, has_chat_template=True, where="config.json",
                             tokens=tokens)


def test_nvila_1920x1080_worked_example():
    cfg = make(NVILA_8B, QWEN2, SIGLIP_448, "mlp_downsample", "NVILA-8B", tokens={"end_token_ids": (198,)})
    assert cfg.family == "nvila" and cfg.generation == "nvila" and cfg.projector.token_order == "row"
    lay = image_layout(cfg, 1920, 1080)
    assert lay.block_size == (3, 4)
    assert lay.n_tiles == 17
    assert lay.feature_tokens == 3072
    assert lay.positions == 3073  # + the "\n" end token


def test_nvila_lite_1000x500_worked_example():
    cfg = make(NVILA_LITE, QWEN2_15B, SIGLIP_448, "mlp_downsample_3x3_fix", "NVILA-Lite-2B", tokens={"end_token_ids": (198,)})
    lay = image_layout(cfg, 1000, 500)
    assert lay.block_size == (1, 2)  # (2,1) cols x rows; the (4,2) tie is rejected by the area rule
    assert lay.n_tiles == 3  # 2 tiles + thumbnail
    assert lay.feature_tokens == 121
    assert lay.positions == 369


@pytest.mark.parametrize("vision,ptype,expected", [
    (SIGLIP_384, "mlp_downsample", 196), (SIGLIP_384, "mlp_downsample_3x3_fix", 81),
    (SIGLIP_448, "mlp_downsample", 256), (SIGLIP_448, "mlp_downsample_3x3_fix", 121),
])
def test_tokens_per_grid(vision, ptype, expected):
    cfg = make(VILA15_3B, LLAMA_3B, vision, ptype, "VILA1.5-3b")
    assert cfg.vision.grid in (27, 32)
    assert cfg.projector.tokens_out(cfg.vision.grid) == expected


def test_vila15_resolves_v15_generation_and_vicuna():
    cfg = make(VILA15_3B, LLAMA_3B, SIGLIP_384, "mlp_downsample", "Efficient-Large-Model/VILA1.5-3b",
               projector_extra={"transformers_version": "4.36.2"})
    assert cfg.family == "vila1.5" and cfg.generation == "v15"
    assert cfg.projector.token_order == "col" and cfg.splice == "v15"
    assert cfg.llm.chat_format == "vicuna_v1"
    assert cfg.vision.layers_used == 26  # hidden_states[-2] of 27 layers
    assert cfg.with_overrides(token_order="row").projector.token_order == "row"
    lay = image_layout(cfg, 640, 480)
    assert (lay.feature_tokens, lay.end_tokens, lay.text_tokens) == (196, 0, 1)


def test_projector_written_by_new_transformers_is_nvila_generation():
    cfg = make(VILA15_3B, LLAMA_3B, SIGLIP_384, "mlp_downsample", "x", projector_extra={"transformers_version": "4.46.0"})
    assert cfg.projector.token_order == "row"


def test_static_s2_tokens():
    top = {"image_aspect_ratio": "resize", "s2": True, "s2_scales": "384,768", "s2_max_split_size": 384,
           "mm_hidden_size": 2304, "hidden_size": 2560}
    cfg = make(top, LLAMA_3B, SIGLIP_384, "mlp_downsample", "VILA1.5-3b-s2")
    assert cfg.family == "vila1.5-s2" and cfg.vision.feature_width == 2304
    lay = image_layout(cfg, 1000, 700)
    assert lay.n_tiles == 5 and lay.feature_tokens == 196


@pytest.mark.parametrize("top_patch,message", [
    ({"s2": True}, "both true"),
    ({"mm_hidden_size": 1000}, "mm_hidden_size=1000"),
    ({"hidden_size": 1234}, "hidden_size=1234"),
    ({"image_aspect_ratio": "dynamic"}, "NVILA checkpoints use"),  # dynamic_s2=true with another mode
    ({"s2_resize_output_to_scale_idx": 5}, "only 3 scales"),
    ({"s2_scales": "448,900,1344"}, "multiples"),
    ({"mm_vision_select_layer": -40}, "outside"),
])
def test_contradicting_config_keys(top_patch, message):
    with pytest.raises(CheckpointError, match=message):
        make({**NVILA_8B, **top_patch}, QWEN2, SIGLIP_448, "mlp_downsample")


def test_unknown_types():
    with pytest.raises(CheckpointError, match="not supported"):
        make(NVILA_8B, QWEN2, {**SIGLIP_448, "architectures": ["RADIOModel"]}, "mlp_downsample")
    with pytest.raises(CheckpointError, match="projector type"):
        make(NVILA_8B, QWEN2, SIGLIP_448, "mlp_downsample_9x9")
    with pytest.raises(CheckpointError, match="LLM architecture"):
        make(NVILA_8B, {**QWEN2, "architectures": ["MistralForCausalLM"]}, SIGLIP_448, "mlp_downsample")
