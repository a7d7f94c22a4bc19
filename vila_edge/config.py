"""One typed, frozen description of a VILA / NVILA checkpoint: everything downstream needs.

Built from the raw JSON of a checkpoint (`config_from_dicts`); the tokenizer-dependent fields (media
token ids, stop tokens) are resolved by `vila_edge.checkpoint` and passed in.

Two upstream code generations disagree on two output-changing details (reference doc §4.3, §5.5):
- the `mlp_downsample` token order: column-major in the VILA1.5 code (V15), row-major since NVILA;
- the splice: V15 replaces a `-200` placeholder and keeps the literal text "\\n"; NVILA/HEAD replaces
  an `<image>` token with `features ++ embed(tokenizer("\\n"))`.
`generation` records which code the checkpoint was trained with; `token_order` and `splice` follow it
unless the user overrides them.

`VisionConfig.tiling` only names the tiling; what it means (tiles, media items, LLM positions, merges,
engine profiles) is asked of its scheme, `vila_edge.media.tiling.tiling_scheme(config.vision)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from vila_edge.errors import CheckpointError
from vila_edge.ps3_config import Ps3Settings, is_ps3, ps3_settings, ps3_tower_dict
from vila_edge.towers import tower_for

FAMILIES = ("vila1.5", "vila1.5-s2", "nvila", "nvila-lite", "vila-hd")
TILINGS = ("resize", "pad", "crop", "s2", "dynamic", "dynamic_s2")
PROJECTOR_TYPES = (
    "identity",
    "linear",
    "mlp2x_gelu",
    "mlp_downsample",
    "mlp_downsample_2x2_fix",
    "mlp_downsample_3x3_fix",
)
CHAT_FORMATS = ("vicuna_v1", "llama_3", "hermes-2", "auto")

# llava/conversation.py::auto_set_conversation_mode: checkpoint-name substring -> conversation mode.
# Order matters (first match wins), as upstream.
_CONV_MODE_BY_NAME = (
    ("vila1.5-3b", "vicuna_v1"),
    ("vila1.5-8b", "llama_3"),
    ("vila1.5-13b", "vicuna_v1"),
    ("vila1.5-40b", "hermes-2"),
    ("nvila15b", "vicuna_v1"),
    ("llama-3", "llama_3"),
    ("llama3", "llama_3"),
)


@dataclass(frozen=True)
class VisionConfig:
    tower: str  # a name in vila_edge.towers.TOWERS: "siglip" | "clip" | "intern" | "ps3"
    image_size: int  # one tile's side in pixels (what the tower was trained on)
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    select_layer: int  # index into hidden_states (embeddings, layer0, ..., layerN-1)
    select_feature: str  # "cls_patch" keeps all tokens, "patch" drops token 0
    tiling: str  # one of TILINGS
    s2_scales: tuple[int, ...] = ()  # empty unless the tiling is multi-scale (s2, dynamic_s2)
    s2_max_split_size: int = 0
    s2_output_scale_idx: int = 0
    min_tiles: int = 1
    max_tiles: int = 12
    video_max_tiles: int = 1
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    qkv_bias: bool = True  # InternViT: its config's qkv_bias (HF SigLIP / CLIP always have q/k/v biases)
    qk_normalization: bool = False  # InternViT: RMSNorm over q and k before attention
    ps3: Ps3Settings | None = None  # tower == "ps3" (VILA-HD): scales, selection, look-close settings

    @property
    def grid(self) -> int:
        """Tokens per side of one tile's feature map (valid conv: 384/14 -> 27)."""
        return self.image_size // self.patch_size

    @property
    def class_token(self) -> bool:
        """Token 0 is a class token (CLIP, InternViT); SigLIP has none."""
        from vila_edge.towers import tower_named

        return tower_named(self.tower).class_token

    @property
    def sequence_length(self) -> int:
        """Tokens through the encoder per tile: the patches, plus the class token when there is one."""
        return self.grid * self.grid + int(self.class_token)

    @property
    def tokens_per_tile(self) -> int:
        """Tokens out of the tower per tile: "patch" drops token 0 (the class token, or SigLIP's first patch)."""
        n = self.sequence_length
        return n - 1 if self.select_feature == "patch" else n

    @property
    def layers_used(self) -> int:
        """Encoder layers that run: hidden_states[k] is the output of layer k-1 (k=0: embeddings)."""
        k = self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer
        if not 0 <= k <= self.num_layers:
            raise CheckpointError(
                f"mm_vision_select_layer={self.select_layer} is outside the tower's {self.num_layers} layers"
            )
        return k

    @property
    def num_scales(self) -> int:
        return max(1, len(self.s2_scales))

    @property
    def feature_width(self) -> int:
        """Channels entering the projector (multi-scale features are concatenated)."""
        return self.hidden_size * self.num_scales


@dataclass(frozen=True)
class ProjectorConfig:
    type: str  # one of PROJECTOR_TYPES
    in_features: int  # mm_hidden_size
    out_features: int  # LLM hidden size
    token_order: str  # "row" | "col": cell order of mlp_downsample (§4.3)

    @property
    def downsample(self) -> int:
        if self.type == "mlp_downsample_3x3_fix":
            return 3
        if self.type.startswith("mlp_downsample"):
            return 2
        return 1

    def tokens_out(self, grid_h: int, grid_w: int | None = None) -> int:
        k = self.downsample
        grid_w = grid_h if grid_w is None else grid_w
        return math.ceil(grid_h / k) * math.ceil(grid_w / k)


@dataclass(frozen=True)
class LLMConfig:
    architecture: str  # "LlamaForCausalLM" | "Qwen2ForCausalLM"
    family: str  # "llama" | "qwen2"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # trained rows of the LM head; logits at or beyond this index are masked
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    max_length: int
    chat_format: str  # one of CHAT_FORMATS
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    media_token_ids: dict[str, int] = field(default_factory=dict)  # "image"/"video" -> id (HEAD splice)
    end_token_ids: tuple[int, ...] = ()  # tokenizer("\n").input_ids, appended after media (HEAD splice)
    extra_masked_ids: tuple[int, ...] = ()  # added special tokens below vocab_size that were never trained
    newline_tokens: int = 1  # tokens the "\n" after <image> costs in a V15 prompt (SentencePiece Llama: "▁" + "<0x0A>")
    rope_scaling: dict | None = None

    @property
    def kv_bytes_per_token_fp16(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2


@dataclass(frozen=True)
class VilaConfig:
    family: str  # one of FAMILIES
    generation: str  # "v15" (VILA1.5 code) | "nvila" (NVILA release and later)
    splice: str  # "v15" | "head"
    vision: VisionConfig
    projector: ProjectorConfig
    llm: LLMConfig
    num_video_frames: int = 8
    video_fps: float = 0.0
    video_pool_sizes: tuple[tuple[int, int, int], ...] = ()  # TSPVideoEncoder pool_sizes; () = basic encoder

    @property
    def tokens_per_tile(self) -> int:
        """Projector rows of one plain tile: the tower's tokens, fewer when the projector downsamples."""
        v, p = self.vision, self.projector
        return p.tokens_out(v.grid) if p.downsample > 1 else v.tokens_per_tile

    def with_overrides(self, *, token_order: str | None = None, splice: str | None = None) -> VilaConfig:
        cfg = self
        if token_order is not None:
            if token_order not in ("row", "col"):
                raise CheckpointError(f"token order {token_order!r} is not one of: row, col")
            cfg = replace(cfg, projector=replace(cfg.projector, token_order=token_order))
        if splice is not None:
            if splice not in ("v15", "head"):
                raise CheckpointError(f"splice layout {splice!r} is not one of: v15, head")
            cfg = replace(cfg, splice=splice)
        return cfg


# ---------------------------------------------------------------------------------------------
# Construction from raw JSON
# ---------------------------------------------------------------------------------------------


def _require(d: dict, key: str, where: str):
    if key not in d:
        raise CheckpointError(f"{where}: required key {key!r} is missing")
    return d[key]


def detect_family(top: dict, where: str) -> tuple[str, str]:
    """(family, tiling) from the top-level config, refusing contradictions."""
    aspect = top.get("image_aspect_ratio", "resize") or "resize"
    s2 = bool(top.get("s2", False))
    dyn_s2 = bool(top.get("dynamic_s2", False))
    if dyn_s2 and s2:
        raise CheckpointError(f"{where}: 's2' and 'dynamic_s2' are both true; a checkpoint uses at most one")
    if dyn_s2:
        if aspect != "dynamic_s2":
            raise CheckpointError(
                f"{where}: dynamic_s2=true but image_aspect_ratio={aspect!r}; NVILA checkpoints use 'dynamic_s2'"
            )
        return "nvila", "dynamic_s2"
    if aspect == "dynamic_s2":
        raise CheckpointError(f"{where}: image_aspect_ratio='dynamic_s2' needs dynamic_s2=true")
    if aspect == "dynamic":
        if s2:
            raise CheckpointError(f"{where}: s2=true cannot be combined with image_aspect_ratio='dynamic'")
        return "nvila-lite", "dynamic"
    if aspect == "square":
        # LLaVA's / VILA 1.0's default name: neither resize nor pad, so process_image hands the image to the
        # tower's own processor ("crop": CLIP centre-crops; config_from_dicts makes it "resize" for the others)
        aspect = "crop"
    if aspect not in ("resize", "pad", "crop"):
        raise CheckpointError(f"{where}: image_aspect_ratio={aspect!r} is not one of resize, pad, square, dynamic, "
                              "dynamic_s2")
    if s2:
        if aspect == "crop":
            raise CheckpointError(f"{where}: s2=true needs image_aspect_ratio 'resize' or 'pad', not 'square'")
        return "vila1.5-s2", "s2"
    return "vila1.5", aspect


def _is_nvila_generation(top: dict, projector_cfg: dict, tiling: str) -> bool:
    """Was this checkpoint trained with the NVILA-era code (row-major downsample, HEAD splice)?

    Rule [UNVERIFIED heuristic from reference doc §4.3]: NVILA-era if it uses dynamic tiling, or has
    `image_encoder`/`video_encoder` keys (added with NVILA), or a projector type that only exists since
    NVILA (`*_fix`), or its projector config was written by transformers >= 4.46. Otherwise V15.
    """
    if tiling in ("dynamic", "dynamic_s2") or top.get("ps3"):  # VILA-HD runs HEAD's LlavaTopDown code
        return True
    if "image_encoder" in top or "video_encoder" in top:
        return True
    if projector_cfg.get("mm_projector_type", "").endswith("_fix"):
        return True
    version = str(projector_cfg.get("transformers_version", "0"))
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (4, 46)


def conv_mode_for(name: str, has_chat_template: bool) -> str:
    low = name.lower()
    for needle, mode in _CONV_MODE_BY_NAME:
        if needle in low:
            return mode
    return "auto" if has_chat_template else "vicuna_v1"


def _tower_tiling(tower: str, tiling: str, where: str) -> str:
    """The tiling a tower runs. "crop" (the processor's own default) is CLIP's shortest-side resize + centre crop;
    SigLIP's and InternViT's processors just resize (process_image's comment), which is "resize". CLIP and
    InternViT run the single-tile tilings only: no released VILA checkpoint pairs them with S2 or dynamic tiles."""
    if tower == "siglip":
        return "resize" if tiling == "crop" else tiling
    if tiling not in ("resize", "pad", "crop"):
        raise CheckpointError(f"{where}: the {tower} tower runs with image_aspect_ratio resize, pad or square here, "
                              f"not the {tiling!r} tiling (no VILA checkpoint combines them)")
    if tower == "intern" and tiling == "pad":
        raise CheckpointError(f"{where}: image_aspect_ratio='pad' with InternViT fails upstream (its "
                              "InternVisionPreprocessor has no image_mean to pad with); use 'resize'")
    return "resize" if tower == "intern" and tiling == "crop" else tiling


def _s2_scales(top: dict, where: str) -> tuple[int, ...]:
    raw = top.get("s2_scales", "")
    try:
        scales = sorted(int(s) for s in str(raw).split(",") if s.strip())
    except ValueError:
        raise CheckpointError(f"{where}: s2_scales={raw!r} is not a comma-separated list of integers") from None
    if not scales:
        raise CheckpointError(f"{where}: S2 is enabled but s2_scales is empty")
    return tuple(scales)


def _video_pool_sizes(top: dict) -> tuple[tuple[int, int, int], ...]:
    enc = top.get("video_encoder")
    if isinstance(enc, str):
        import json

        try:
            enc = json.loads(enc)
        except ValueError:
            return ()
    if isinstance(enc, dict) and "TSPVideoEncoder" in str(enc.get("_target_", "")):
        return tuple(tuple(int(x) for x in p) for p in enc.get("pool_sizes", [[8, 1, 1]]))
    return ()


def _ps3_vision(vcfg: VisionConfig, ps3: Ps3Settings, top: dict, projector: dict, where: str) -> VisionConfig:
    """The checks VILA's PS3 path implies (llava_arch.py::encode_images_ps3, vision_encoder.py)."""
    if vcfg.tiling != "resize":
        raise CheckpointError(f"{where}: PS3 takes one square image (image_aspect_ratio 'resize'), not {vcfg.tiling!r}")
    if top.get("ps3_dynamic_aspect_ratio"):
        raise CheckpointError(f"{where}: ps3_dynamic_aspect_ratio=true is not supported (square images only)")
    if vcfg.select_layer not in (-1, -2):
        raise CheckpointError(f"{where}: PS3 returns its last 2 hidden states; mm_vision_select_layer must be -1 or -2, "
                              f"not {vcfg.select_layer}")
    if vcfg.select_feature != "cls_patch":
        raise CheckpointError(f"{where}: PS3 has no class token; mm_vision_select_feature must be 'cls_patch'")
    ptype = projector.get("mm_projector_type") or top.get("mm_projector_type") or ""
    if not str(ptype).startswith("mlp_downsample"):
        raise CheckpointError(f"{where}: PS3 features need an mlp_downsample projector (encode_images_ps3), not {ptype!r}")
    return replace(vcfg, tower="ps3", ps3=ps3)


def config_from_dicts(
    *,
    top: dict,
    llm: dict,
    vision: dict,
    projector: dict,
    preprocessor: dict | None,
    name: str,
    has_chat_template: bool,
    where: str,
    tokens: dict | None = None,
    chat_format: str | None = None,
) -> VilaConfig:
    """Build the frozen config. `tokens` carries tokenizer-derived ids (see checkpoint.resolve_tokens)."""
    tokens = tokens or {}
    family, tiling = detect_family(top, where)

    ps3 = ps3_settings(top, vision, where) if is_ps3(top, vision) else None
    if ps3 is not None:  # PS3's trunk is a SigLIP ViT; its geometry comes from the timm name (ps3_config)
        vision = {**vision, **ps3_tower_dict(ps3, vision), "architectures": ["SiglipVisionModel"]}
    tower = tower_for(top, vision, where)  # PS3 runs as its SigLIP trunk here; _ps3_vision names it "ps3"
    vw = f"{where} (vision_tower)"
    tiling = _tower_tiling(tower.name, tiling, where)
    image_size = int(_require(vision, "image_size", vw))
    patch = int(_require(vision, "patch_size", vw))
    v_hidden = int(_require(vision, "hidden_size", vw))
    scales: tuple[int, ...] = ()
    split = 0
    out_idx = 0
    if tiling in ("s2", "dynamic_s2"):
        scales = _s2_scales(top, where)
        split = int(top.get("s2_max_split_size", scales[0]))
        out_idx = int(top.get("s2_resize_output_to_scale_idx", 0))
        if not -len(scales) <= out_idx < len(scales):
            raise CheckpointError(f"{where}: s2_resize_output_to_scale_idx={out_idx} but only {len(scales)} scales")
        if tiling == "s2" and split != image_size:
            raise CheckpointError(
                f"{where}: s2_max_split_size={split} differs from the tower's image_size={image_size}"
            )
        if tiling == "dynamic_s2" and scales[0] != image_size:
            raise CheckpointError(f"{where}: first S2 scale {scales[0]} differs from the tower's image_size={image_size}")
        if any(s % scales[0] for s in scales):
            raise CheckpointError(f"{where}: S2 scales {scales} must be multiples of the smallest")

    pre = {} if tower.fixed_normalisation else (preprocessor or {})
    mean = tuple(float(x) for x in pre.get("image_mean", tower.mean))
    std = tuple(float(x) for x in pre.get("image_std", tower.std))
    if tower.name == "intern" and vision.get("norm_type", "rms") != "rms":
        # VILA's copy of InternVisionModel always builds InternRMSNorm (later InternVL code reads norm_type)
        raise CheckpointError(f"{vw}: norm_type={vision.get('norm_type')!r}, but VILA's InternVisionModel only has "
                              "RMSNorm ('rms'); this is not a VILA InternViT checkpoint")
    vcfg = VisionConfig(
        tower=tower.name,
        image_size=image_size,
        patch_size=patch,
        hidden_size=v_hidden,
        num_layers=int(_require(vision, "num_hidden_layers", vw)),
        num_heads=int(_require(vision, "num_attention_heads", vw)),
        intermediate_size=int(_require(vision, "intermediate_size", vw)),
        layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5 if tower.name == "clip" else 1e-6)),
        select_layer=int(top.get("mm_vision_select_layer", -2)),
        select_feature=str(top.get("mm_vision_select_feature", "cls_patch")),
        tiling=tiling,
        s2_scales=scales,
        s2_max_split_size=split,
        s2_output_scale_idx=out_idx,
        min_tiles=int(top.get("min_tiles", 1) or 1),
        max_tiles=int(top.get("max_tiles", 12) or 12),
        video_max_tiles=int(top.get("video_max_tiles", 1) or 1),
        image_mean=mean,  # type: ignore[arg-type]
        image_std=std,  # type: ignore[arg-type]
        # InternVisionConfig's defaults: qkv_bias False, qk_normalization True
        qkv_bias=bool(vision.get("qkv_bias", False)) if tower.name == "intern" else True,
        qk_normalization=bool(vision.get("qk_normalization", True)) if tower.name == "intern" else False,
    )
    if vcfg.select_feature not in ("cls_patch", "patch"):
        raise CheckpointError(f"{where}: mm_vision_select_feature={vcfg.select_feature!r} is not cls_patch or patch")
    _ = vcfg.layers_used  # validates select_layer
    if ps3 is not None:
        vcfg = _ps3_vision(vcfg, ps3, top, projector, where)

    lw = f"{where} (llm)"
    l_arch = _require(llm, "architectures", lw)[0]
    if l_arch == "LlamaForCausalLM":
        l_family = "llama"
    elif l_arch == "Qwen2ForCausalLM":
        l_family = "qwen2"
    else:
        raise CheckpointError(f"{where}: LLM architecture {l_arch!r} is not supported (Llama and Qwen2 are)")
    hidden = int(_require(llm, "hidden_size", lw))
    heads = int(_require(llm, "num_attention_heads", lw))
    max_len = int(llm.get("model_max_length") or llm.get("tokenizer_model_max_length") or llm.get("max_position_embeddings", 4096))
    top_hidden = top.get("hidden_size")
    if top_hidden is not None and int(top_hidden) != hidden:
        raise CheckpointError(f"{where}: hidden_size={top_hidden} contradicts llm hidden_size={hidden}")

    mm_hidden = int(top.get("mm_hidden_size", vcfg.feature_width))
    if mm_hidden != vcfg.feature_width:
        raise CheckpointError(
            f"{where}: mm_hidden_size={mm_hidden} but the tower gives {v_hidden} x {vcfg.num_scales} scale(s) "
            f"= {vcfg.feature_width}"
        )
    ptype = projector.get("mm_projector_type") or top.get("mm_projector_type")
    if ptype is None:
        raise CheckpointError(f"{where}: mm_projector_type is missing (mm_projector/config.json)")
    if ptype not in PROJECTOR_TYPES:
        raise CheckpointError(f"{where}: projector type {ptype!r} is not supported; supported: {', '.join(PROJECTOR_TYPES)}")
    if tiling == "dynamic_s2" and ptype not in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        raise CheckpointError(f"{where}: dynamic_s2 needs a 2x2 mlp_downsample projector, not {ptype!r}")
    if ptype.startswith("mlp_downsample") and vcfg.tokens_per_tile != vcfg.grid * vcfg.grid:
        raise CheckpointError(
            f"{where}: {ptype} needs a square token grid, but mm_vision_select_feature={vcfg.select_feature!r} gives "
            f"{vcfg.tokens_per_tile} tokens ({vcfg.grid}x{vcfg.grid} patches"
            f"{' + a class token' if vcfg.class_token else ''}); VILA1.5-40b uses 'patch'")
    nvila_gen = _is_nvila_generation(top, projector, tiling)
    pcfg = ProjectorConfig(
        type=ptype, in_features=mm_hidden, out_features=hidden, token_order="row" if nvila_gen else "col"
    )

    fmt = chat_format or conv_mode_for(name, has_chat_template)
    if fmt not in CHAT_FORMATS:
        raise CheckpointError(f"chat format {fmt!r} is not one of: {', '.join(CHAT_FORMATS)}")
    vocab = int(_require(llm, "vocab_size", lw))
    lcfg = LLMConfig(
        architecture=l_arch,
        family=l_family,
        hidden_size=hidden,
        intermediate_size=int(_require(llm, "intermediate_size", lw)),
        num_layers=int(_require(llm, "num_hidden_layers", lw)),
        num_heads=heads,
        num_kv_heads=int(llm.get("num_key_value_heads") or heads),
        head_dim=int(llm.get("head_dim") or hidden // heads),
        vocab_size=int(tokens.get("trained_vocab", vocab)),
        rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
        rope_theta=float(llm.get("rope_theta", 10000.0)),
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
        max_length=max_len,
        chat_format=fmt,
        bos_token_id=tokens.get("bos_token_id", llm.get("bos_token_id")),
        eos_token_id=tokens.get("eos_token_id", llm.get("eos_token_id")),
        stop_token_ids=tuple(tokens.get("stop_token_ids", ())),
        media_token_ids=dict(tokens.get("media_token_ids", {})),
        end_token_ids=tuple(tokens.get("end_token_ids", ())),
        extra_masked_ids=tuple(tokens.get("extra_masked_ids", ())),
        newline_tokens=int(tokens.get("newline_tokens", 1)),
        rope_scaling=llm.get("rope_scaling"),
    )
    return VilaConfig(
        family="vila-hd" if ps3 is not None else family,
        generation="nvila" if nvila_gen else "v15",
        splice="head" if nvila_gen else "v15",
        vision=vcfg,
        projector=pcfg,
        llm=lcfg,
        num_video_frames=int(top.get("num_video_frames", 8) or 8),
        video_fps=float(top.get("fps", 0.0) or 0.0),
        video_pool_sizes=_video_pool_sizes(top),
    )


def config_from_json(data: dict) -> VilaConfig:
    """Inverse of `dataclasses.asdict(VilaConfig)`: engine manifests store the resolved config this way."""

    def tup(x):
        return tuple(tup(i) for i in x) if isinstance(x, list) else x

    v = {k: tup(val) for k, val in data["vision"].items()}
    if v.get("ps3") is not None:
        v["ps3"] = Ps3Settings(**{k: tup(val) for k, val in v["ps3"].items()})
    llm = {k: tup(val) for k, val in data["llm"].items()}
    llm["media_token_ids"] = dict(data["llm"].get("media_token_ids") or {})
    llm["rope_scaling"] = data["llm"].get("rope_scaling")
    rest = {k: tup(val) for k, val in data.items() if k not in ("vision", "projector", "llm")}
    return VilaConfig(vision=VisionConfig(**v), projector=ProjectorConfig(**data["projector"]), llm=LLMConfig(**llm), **rest)
