"""Tiny checkpoints in the REAL on-disk formats, for tests and the offline default of the CLI.

`make_tiny_checkpoint(family, path, seed)` writes a dev-layout checkpoint (config.json + llm/ +
vision_tower/ + mm_projector/) or, with `layout="hf"`, the flat -hf layout. Weights are seeded and
nonzero (biases included); the tokenizer is trained locally with `tokenizers` on CPython's own
documentation text and carries the family's special and media tokens. No network. Needs torch and
transformers (the `export` extra).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vila_edge.staging import staged_dir

FAMILY_NAMES = {
    # family -> checkpoint folder name (the conversation mode is derived from it, as upstream)
    "vila1.5": "tiny-VILA1.5-3b",
    "vila1.5-s2": "tiny-VILA1.5-3b-s2",
    "nvila": "tiny-NVILA-8B",
    "nvila-lite": "tiny-NVILA-Lite-2B",
    "clip": "tiny-VILA-7b-clip",  # VILA 1.0 generation: CLIP ViT-L/14-336 geometry, LLaVA-style projector
    "intern": "tiny-VILA1.5-40b",  # InternViT-6B + mlp_downsample + hermes-2 chat (reference doc §2.1, §4.4)
    "ps3": "tiny-VILA-HD-8B-PS3-1.5K-SigLIP",
}

QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, patch_size=14,
                   hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3)
CLIP_PREPROCESSOR = {"crop_size": None, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
                     "do_rescale": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "CLIPImageProcessor",
                     "resample": 3, "rescale_factor": 1 / 255, "size": None}
TINY_LLM = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6)


def corpus_text(max_chars: int = 400_000) -> str:
    """English text that is on every machine: CPython's pydoc topics."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))[:max_chars]


# ---- tokenizers ------------------------------------------------------------------------------


def train_llama_tokenizer(vocab_size: int = 480):
    """SentencePiece-style BPE (Metaspace "▁", byte fallback, BOS added) like Llama's tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.train_from_iterator([corpus_text(200_000)], trainer)
    trained = json.loads(tok.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):  # byte-fallback pieces <0x00>..<0xFF> (Llama has them at ids 3..258)
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if t not in vocab:
            vocab[t] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    out = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    out.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    out.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    out.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    out.add_special_tokens(specials)
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
              "add_eos_token": False, "legacy": False, "model_max_length": 1024, "padding_side": "right",
              "tokenizer_class": "LlamaTokenizer"}
    return out, config


def train_qwen2_tokenizer(vocab_size: int = 480, media_tokens: bool = True):
    """Byte-level BPE with ChatML specials, like Qwen2's; NVILA's media tokens appended after."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus_text(200_000)], trainer)
    if media_tokens:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<vila/sentinel>", "<image>", "<vila/video>")])
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 1024,
              "chat_template": QWEN2_CHAT_TEMPLATE, "tokenizer_class": "Qwen2Tokenizer"}
    return tok, config


# ---- weights ---------------------------------------------------------------------------------


def _seeded_(module, seed: int, std: float = 0.08) -> None:
    """Overwrite every parameter with seeded nonzero values (norm weights around 1)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=g) * std
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def _family_top(family: str, vision_size: int) -> dict:
    if family == "vila1.5":
        return {"image_aspect_ratio": "resize", "s2": False}
    if family == "vila1.5-s2":
        return {"image_aspect_ratio": "resize", "s2": True, "s2_scales": f"{vision_size},{2 * vision_size}",
                "s2_max_split_size": vision_size, "s2_resize_output_to_scale_idx": 0}
    if family == "nvila":
        return {"image_aspect_ratio": "dynamic_s2", "dynamic_s2": True,
                "s2_scales": f"{vision_size},{2 * vision_size},{3 * vision_size}", "s2_max_split_size": vision_size,
                "s2_resize_output_to_scale_idx": -1, "max_tiles": 12, "num_video_frames": 8, "fps": 0.0}
    if family == "nvila-lite":
        return {"image_aspect_ratio": "dynamic", "min_tiles": 1, "max_tiles": 12, "num_video_frames": 8}
    if family == "clip":  # LLaVA's / VILA 1.0's default aspect name: CLIPImageProcessor's shortest side + crop
        return {"image_aspect_ratio": "square", "mm_vision_select_feature": "patch"}
    if family == "intern":  # scripts/v1_5/release/40b/*.sh: --mm_vision_select_layer -1, feature default "patch"
        return {"image_aspect_ratio": "resize", "mm_vision_select_layer": -1, "mm_vision_select_feature": "patch"}
    if family == "ps3":  # VILA-HD: llava_arch.py LlavaTopDown; its released values UNVERIFIED (no config read)
        return {"image_aspect_ratio": "resize", "ps3": True, "look_close_mode": "after_image", "num_look_close": 2,
                "num_token_look_close": None, "high_res_pos_embed": True, "top_down_prompt_head_type": "linear"}
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILY_NAMES)}")


def _tiny_tower(family: str, size: int, seed: int) -> tuple[dict, dict, dict]:
    """(vision_tower/config.json, its weights as stored, preprocessor_config.json) of the family's tower."""
    from vila_edge.reference.vision import hf_state_dict_on_disk

    if family == "clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel

        cfg = CLIPVisionConfig(image_size=size, hidden_act="quick_gelu", projection_dim=32, layer_norm_eps=1e-5,
                               **{k: v for k, v in TINY_VISION.items() if k not in ("hidden_act", "layer_norm_eps")})
        model = CLIPVisionModel(cfg)
        _seeded_(model, seed)
        vision = cfg.to_dict()
        vision.update(architectures=["CLIPVisionModel"], model_type="clip_vision_model")
        pre = {**CLIP_PREPROCESSOR, "crop_size": {"height": size, "width": size}, "size": {"shortest_edge": size}}
        return vision, hf_state_dict_on_disk(model), pre
    if family == "ps3":
        weights, vision, pre = tiny_ps3_tower(seed)
        return vision, weights, pre
    if family == "intern":
        from vila_edge.config import VisionConfig
        from vila_edge.reference.intern import InternVisionModel

        # InternViT-6B-448px-V1-2's config.json keys [UNVERIFIED: VILA1.5-40b's own vision_tower/config.json]
        vision = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "image_size": size,
                  "patch_size": TINY_VISION["patch_size"], "hidden_size": TINY_VISION["hidden_size"],
                  "intermediate_size": TINY_VISION["intermediate_size"], "num_attention_heads": 2,
                  "num_hidden_layers": TINY_VISION["num_hidden_layers"], "num_channels": 3, "qkv_bias": False,
                  "qk_normalization": True, "norm_type": "rms", "hidden_act": "gelu", "layer_norm_eps": 1e-6,
                  "use_flash_attn": True, "dropout": 0.0, "drop_path_rate": 0.0, "attention_dropout": 0.0,
                  "initializer_range": 0.02, "initializer_factor": 0.1}
        v = VisionConfig(tower="intern", image_size=size, patch_size=vision["patch_size"], hidden_size=vision["hidden_size"],
                         num_layers=vision["num_hidden_layers"], num_heads=2, intermediate_size=vision["intermediate_size"],
                         layer_norm_eps=1e-6, select_layer=-1, select_feature="patch", tiling="resize", qkv_bias=False,
                         qk_normalization=True)
        model = InternVisionModel(v, "gelu")
        _seeded_(model, seed)
        # InternViT's own preprocessor_config.json (VILA ignores it: InternVisionPreprocessor is hard-coded)
        pre = {"crop_size": size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
               "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.485, 0.456, 0.406],
               "image_std": [0.229, 0.224, 0.225], "resample": 3, "size": size}
        return vision, {k: t.contiguous().clone() for k, t in model.state_dict().items()}, pre
    from transformers import SiglipVisionConfig, SiglipVisionModel

    # VILA1.5's tower file still holds the unused attention-pooling head; NVILA's does not (doc §1.3)
    siglip_cfg = SiglipVisionConfig(image_size=size, vision_use_head=family.startswith("vila1.5"), **TINY_VISION)
    siglip = SiglipVisionModel(siglip_cfg)
    _seeded_(siglip, seed)
    vision = siglip_cfg.to_dict()
    vision.update(architectures=["SiglipVisionModel"], model_type="siglip_vision_model")
    pre = {"do_resize": True, "size": {"height": size, "width": size}, "resample": 3, "do_rescale": True,
           "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
           "image_processor_type": "SiglipImageProcessor"}
    return vision, hf_state_dict_on_disk(siglip), pre


def make_tiny_checkpoint(family: str, path, seed: int = 0, *, layout: str = "dev", overwrite: bool = False) -> Path:
    """Write a tiny, seeded checkpoint of `family` to `path` (atomically). Returns the path."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from vila_edge.config import ProjectorConfig
    from vila_edge.reference.projector import Projector

    path = Path(path)
    if path.exists():
        if not overwrite:
            return path
        shutil.rmtree(path)
    if layout == "hf" and family in ("clip", "intern", "ps3"):
        raise ValueError(f"the flat -hf layout exists for NVILA-era checkpoints, not the {family} family; use layout='dev'")
    qwen = family in ("nvila", "nvila-lite", "ps3")
    vision_size = 70 if family.startswith("vila1.5") else 56  # grids 5x5 (odd: exercises padding) / 4x4
    top_extra = _family_top(family, vision_size)

    tok, tok_cfg = train_qwen2_tokenizer() if qwen else train_llama_tokenizer()
    if family == "intern":  # Nous-Hermes-2-Yi's ChatML tokens, for the hermes-2 template [UNVERIFIED base LLM]
        tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if qwen:
        llm_cfg = Qwen2Config(vocab_size=vocab, bos_token_id=None, eos_token_id=tok.token_to_id("<|im_end|>"),
                              rope_theta=1e6, tie_word_embeddings=family == "nvila-lite", **TINY_LLM)
        llm = Qwen2ForCausalLM(llm_cfg)
    else:
        llm_cfg = LlamaConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, rope_theta=1e4,
                              tie_word_embeddings=False, **TINY_LLM)
        llm = LlamaForCausalLM(llm_cfg)
    _seeded_(llm, seed)
    vision_dict, vision_weights, pre_json = _tiny_tower(family, vision_size, seed + 1)

    n_scales = len(top_extra["s2_scales"].split(",")) if "s2_scales" in top_extra else 1
    ptype = {"nvila-lite": "mlp_downsample_3x3_fix", "ps3": "mlp_downsample_3x3_fix", "clip": "mlp2x_gelu"}.get(
        family, "mlp_downsample")
    pcfg = ProjectorConfig(type=ptype, in_features=TINY_VISION["hidden_size"] * n_scales,
                           out_features=TINY_LLM["hidden_size"], token_order="row")
    projector = Projector(pcfg)
    _seeded_(projector, seed + 2)
    projector_sd = {k: v.contiguous() for k, v in projector.state_dict().items()}
    if family == "ps3":
        projector_sd.update(tiny_ps3_projector_extras(seed + 3, TINY_LLM["hidden_size"]))
    proj_json = {"architectures": ["MultimodalProjector"], "mm_projector_type": ptype, "model_type": "v2l_projector",
                 "torch_dtype": "float32",
                 # V15-era projector configs were written by transformers 4.36-4.44 (§4.3 heuristic)
                 "transformers_version": "4.47.0" if qwen else "4.38.2"}

    llm_dict = llm_cfg.to_dict()
    llm_dict["architectures"] = [type(llm).__name__]
    llm_dict["model_max_length"] = 1024
    top = {
        "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
        "_name_or_path": FAMILY_NAMES[family],
        "hidden_size": TINY_LLM["hidden_size"], "mm_hidden_size": pcfg.in_features,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "num_video_frames": 8, "model_dtype": "torch.float32", **top_extra,
    }

    with staged_dir(path) as tmp:
        if layout == "dev":
            top.update(llm_cfg=llm_dict, vision_tower_cfg=vision_dict, mm_projector_cfg=proj_json)
            llm.save_pretrained(tmp / "llm", safe_serialization=True)
            cfg_file = tmp / "llm" / "config.json"
            saved = json.loads(cfg_file.read_text())
            saved["model_max_length"] = 1024
            cfg_file.write_text(json.dumps(saved, indent=2))
            tok.save(str(tmp / "llm" / "tokenizer.json"))
            (tmp / "llm" / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
            (tmp / "vision_tower").mkdir()
            save_file(vision_weights, str(tmp / "vision_tower" / "model.safetensors"))
            (tmp / "vision_tower" / "config.json").write_text(json.dumps(vision_dict, indent=2))
            (tmp / "vision_tower" / "preprocessor_config.json").write_text(json.dumps(pre_json, indent=2))
            (tmp / "mm_projector").mkdir()
            (tmp / "mm_projector" / "config.json").write_text(json.dumps(proj_json, indent=2))
            save_file(projector_sd, str(tmp / "mm_projector" / "model.safetensors"))
        elif layout == "hf":
            top.update(model_type="nvila_lite" if family == "nvila-lite" else "vila", architectures=["VILAForCausalLM"],
                       text_config=llm_dict, vision_config=vision_dict, mm_projector_type=ptype)
            tensors = {}
            parts = (("llm.", llm.state_dict()), ("vision_tower.", vision_weights), ("mm_projector.", projector_sd))
            for prefix, state in parts:
                for k, v in state.items():
                    if prefix == "llm." and k == "lm_head.weight" and llm_cfg.tie_word_embeddings:
                        continue
                    tensors[prefix + k] = v.contiguous().clone()
            save_file(tensors, str(tmp / "model.safetensors"))
            tok.save(str(tmp / "tokenizer.json"))
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
            (tmp / "preprocessor_config.json").write_text(json.dumps(pre_json, indent=2))
        else:
            raise ValueError(f"layout must be 'dev' or 'hf', got {layout!r}")
        (tmp / "config.json").write_text(json.dumps(top, indent=2))
    return path


# ---- PS3 (VILA-HD) ---------------------------------------------------------------------------

TINY_PS3 = dict(model_name="vila_edge_tiny_ps3", hidden_size=32, pool="map", ps3_scales=[70, 140, 280],
                select_based_on_layer=[0, 1, 2], max_select_num=100, max_select_num_each_scale=None,
                separate_pos_emb=True, highres_selection_feature=True, highres_selection_module_hidden_dim=8,
                highres_selection_module_out_dim=8, highres_selection_module_depth=1,
                highres_selection_module_kernel_size=28, radio=False, dynamic_img_size=True)


def tiny_ps3_tower(seed: int):
    """(weights named as on disk, vision_tower/config.json, preprocessor_config.json) of a tiny PS3VisionModel.

    The config carries PS3VisionConfig's fields as `save_pretrained` writes them (configuration_ps3.py); the
    trunk's geometry is vila-edge's test entry in ps3_config.TRUNK_GEOMETRY.
    """
    from vila_edge.ps3_config import ps3_settings
    from vila_edge.reference.ps3 import PS3Encoder, ps3_state_dict_on_disk

    vision = dict(TINY_PS3, architectures=["PS3VisionModel"], model_type="ps3_vision_model",
                  vision_tower_name=TINY_PS3["model_name"], image_size=TINY_PS3["ps3_scales"][-1], patch_size=14,
                  torch_dtype="float32")
    enc = PS3Encoder(ps3_settings({"ps3": True, "look_close_mode": "after_image"}, vision, "tiny ps3"))
    _seeded_(enc, seed)
    side = vision["image_size"]
    pre = {"image_processor_type": "PS3ImageProcessor", "image_size": [side, side], "mean": [0.5, 0.5, 0.5],
           "std": [0.5, 0.5, 0.5], "resize_mode": "squash", "interpolation": "bicubic",
           "size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side},
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    return ps3_state_dict_on_disk(enc), vision, pre


def tiny_ps3_projector_extras(seed: int, llm_hidden: int) -> dict:
    """base_projector.py's high_res_pos_embed / high_res_scale_embed and the linear top_down_prompt_head."""
    import torch

    g = torch.Generator().manual_seed(seed)
    low = (TINY_PS3["ps3_scales"][0] // 14) ** 2
    out = {"high_res_pos_embed": torch.randn(1, low, llm_hidden, generator=g) * 0.08}
    for i in range(len(TINY_PS3["ps3_scales"])):
        out[f"high_res_scale_embed.{i}"] = torch.randn(1, 1, llm_hidden, generator=g) * 0.08
    out["top_down_prompt_head.weight"] = torch.randn(TINY_PS3["hidden_size"], llm_hidden, generator=g) * 0.08
    out["top_down_prompt_head.bias"] = torch.randn(TINY_PS3["hidden_size"], generator=g) * 0.08
    return out
