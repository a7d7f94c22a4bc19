"""PS3 (VILA-HD's 4K vision tower): what a checkpoint's config says about it, resolved once.

Upstream: NVlabs/PS3 `ps3/configuration_ps3.py` (`PS3VisionConfig`, model_type "ps3_vision_model") is
what `vision_tower/config.json` holds; NVlabs/VILA `llava/model/configuration_llava.py` adds the
top-level `ps3`, `look_close_mode`, `num_look_close`, `num_token_look_close`, `high_res_pos_embed`.

The trunk is a timm ViT named by `model_name`; its geometry is not in the config file, so it comes from
`TRUNK_GEOMETRY` (values of timm's `vision_transformer.py` registrations). No torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vila_edge.errors import CheckpointError

# timm model name -> (patch, width, depth, heads, mlp hidden, pos-embed grid side). timm's registrations
# give mlp_ratio=3.7362 -> int(1152 * 3.7362) = 4304 and img_size 384 -> 27x27 position embeddings.
TRUNK_GEOMETRY = {
    "vit_so400m_patch14_siglip_384": (14, 1152, 27, 16, 4304, 27),
    "vit_so400m_patch14_siglip_378": (14, 1152, 27, 16, 4304, 27),
    # vila-edge's tiny test geometry (`vila-edge fixture ps3`), not a timm model
    "vila_edge_tiny_ps3": (14, 32, 3, 2, 64, 5),
}
LOOK_CLOSE_MODES = ("after_image", "after_prompt")


@dataclass(frozen=True)
class Ps3Settings:
    model_name: str  # the timm trunk (TRUNK_GEOMETRY)
    scales: tuple[int, ...]  # ps3_scales, sorted: scales[0] is the low-res pass, the rest are selected from
    select_based_on_layer: tuple[int, ...]  # low-res block outputs concatenated for the selection features
    select_num_each_scale: tuple[int, ...]  # patches selected per high-res scale per look-close step
    pos_grid: int  # side of the trunk's position-embedding grid
    separate_pos_emb: bool  # pos_emb_residual per high-res scale
    highres_selection_feature: bool  # the ShallowConvNet on the 1512 image joins the selection logits
    sel_hidden_dim: int
    sel_out_dim: int
    sel_depth: int
    sel_kernel: int
    look_close_mode: str  # "after_image": bottom-up (prior prompt); "after_prompt": top-down (LLM prompt)
    num_look_close: int  # high-res passes (each selects sum(select_num_each_scale) patches)
    num_token_look_close: int | None  # overrides num_look_close when set
    high_res_pos_embed: bool  # the projector adds high_res_pos_embed / high_res_scale_embed

    @property
    def low_res_grid(self) -> int:
        return self.scales[0] // TRUNK_GEOMETRY[self.model_name][0]

    @property
    def low_res_tokens(self) -> int:
        return self.low_res_grid ** 2

    def grid(self, scale_idx: int) -> int:
        """Feature-map side at scale `scale_idx` (square images: VILA's default, no dynamic aspect ratio)."""
        return self.low_res_grid * (self.scales[scale_idx] // self.scales[0])

    @property
    def high_res_grids(self) -> tuple[int, ...]:
        return tuple(self.grid(i) for i in range(1, len(self.scales)))

    @property
    def max_high_res_tokens(self) -> int:
        return sum(g * g for g in self.high_res_grids)

    @property
    def per_step(self) -> int:
        return sum(self.select_num_each_scale)

    def look_close_steps(self) -> tuple[int, int]:
        """(steps, tokens selected in total) as PS3VisionEncoder.forward computes them for VILA's call."""
        if self.num_token_look_close is not None:
            total = min(self.num_token_look_close, self.max_high_res_tokens)
            return -(-total // self.per_step), total
        steps = min(self.num_look_close, -(-self.max_high_res_tokens // self.per_step))
        return steps, min(steps * self.per_step, self.max_high_res_tokens)


def select_counts(s: Ps3Settings, available: list[int], n_tokens: int | None) -> list[int]:
    """get_selection_maps' per-scale counts for one step: split, then spill what a scale lacks to the next."""
    nums = list(s.select_num_each_scale)
    if n_tokens is not None:
        total = sum(s.select_num_each_scale)
        nums = [int(x * n_tokens / total) for x in s.select_num_each_scale]
        nums[-1] += n_tokens - sum(nums)
    for i, avail in enumerate(available):
        if avail < nums[i]:
            if i < len(nums) - 1:
                nums[i + 1] += nums[i] - avail
            nums[i] = avail
    return nums


def step_token_budgets(s: Ps3Settings) -> list[int | None]:
    """num_select_token per look-close step (None: the full per-step split), as PS3VisionEncoder.forward."""
    steps, total = s.look_close_steps()
    if s.num_token_look_close is None:
        return [None] * steps
    last = total % s.per_step or s.per_step
    first = total if total <= s.per_step else None
    return [first] + [None] * (steps - 2) + [last] if steps > 1 else [first]


def is_ps3(top: dict, vision: dict) -> bool:
    return bool(top.get("ps3")) or str(vision.get("model_type", "")).startswith("ps3")


def _default_select_nums(scales: tuple[int, ...], max_select_num: int) -> tuple[int, ...]:
    # PS3VisionEncoder.__init__: the budget split by each high-res scale's pixel count, remainder to the last
    pixels = [s * s for s in scales]
    nums = [int(max_select_num * pixels[i] / sum(pixels[1:])) for i in range(1, len(pixels))]
    nums[-1] += max_select_num - sum(nums)
    return tuple(nums)


def ps3_settings(top: dict, vision: dict, where: str) -> Ps3Settings:
    vw = f"{where} (vision_tower, PS3)"
    if vision.get("model_type") == "ps3":  # a whole PS3Config (text + vision): VILA loads its vision part
        vision = dict(vision.get("vision_config") or {})
    name = vision.get("model_name")
    if name not in TRUNK_GEOMETRY:
        raise CheckpointError(f"{vw}: PS3 trunk model_name={name!r} is not known; known: {', '.join(TRUNK_GEOMETRY)}")
    if vision.get("radio"):
        raise CheckpointError(f"{vw}: PS3 with a RADIO trunk (radio=true) is not supported; the SigLIP trunks are")
    scales = tuple(sorted(int(s) for s in vision.get("ps3_scales", (378, 756, 1512))))
    patch = TRUNK_GEOMETRY[name][0]
    if len(scales) < 2 or any(s % scales[0] for s in scales) or scales[0] % patch:
        raise CheckpointError(f"{vw}: ps3_scales={list(scales)} must be >= 2 multiples of the first, which is a "
                              f"multiple of the patch size {patch}")
    raw_nums = vision.get("max_select_num_each_scale")
    if raw_nums is None:
        nums = _default_select_nums(scales, int(vision.get("max_select_num", 1280)))
    else:
        nums = tuple(int(x) for x in raw_nums)
    if len(nums) != len(scales) - 1 or min(nums) < 0 or sum(nums) < 1:
        raise CheckpointError(f"{vw}: max_select_num_each_scale={list(nums)} needs {len(scales) - 1} counts >= 0")
    layers = tuple(int(i) for i in vision.get("select_based_on_layer", (0, 9, 18, 26)))
    depth = TRUNK_GEOMETRY[name][2]
    if not layers or any(not 0 <= i < depth for i in layers):
        raise CheckpointError(f"{vw}: select_based_on_layer={list(layers)} must index the trunk's {depth} blocks")
    mode = top.get("look_close_mode") or "after_prompt"  # VILA-HD's README: LOOK_CLOSE_MODE defaults to after_prompt
    if mode not in LOOK_CLOSE_MODES:
        raise CheckpointError(f"{where}: look_close_mode={mode!r} is not one of {', '.join(LOOK_CLOSE_MODES)}")
    ntok = top.get("num_token_look_close")
    settings = Ps3Settings(
        model_name=name,
        scales=scales,
        select_based_on_layer=layers,
        select_num_each_scale=nums,
        pos_grid=TRUNK_GEOMETRY[name][5],
        separate_pos_emb=bool(vision.get("separate_pos_emb", True)),
        highres_selection_feature=bool(vision.get("highres_selection_feature", True)),
        sel_hidden_dim=int(vision.get("highres_selection_module_hidden_dim", 512)),
        sel_out_dim=int(vision.get("highres_selection_module_out_dim", 512)),
        sel_depth=int(vision.get("highres_selection_module_depth", 3)),
        sel_kernel=int(vision.get("highres_selection_module_kernel_size", 28)),
        look_close_mode=mode,
        num_look_close=int(1 if top.get("num_look_close") is None else top["num_look_close"]),
        num_token_look_close=None if ntok is None else int(ntok),
        high_res_pos_embed=bool(top.get("high_res_pos_embed", False)),
    )
    if settings.num_look_close < 1 and settings.num_token_look_close is None:
        raise CheckpointError(f"{where}: num_look_close={settings.num_look_close}; VILA-HD runs 1 or more high-res passes")
    if settings.num_token_look_close is not None and settings.num_token_look_close < 1:
        raise CheckpointError(f"{where}: num_token_look_close={settings.num_token_look_close} must be >= 1")
    return settings


def ps3_tower_dict(settings: Ps3Settings, vision: dict) -> dict:
    """The trunk's geometry under the key names the rest of the config reads (SigLIP's)."""
    patch, width, depth, heads, mlp, _ = TRUNK_GEOMETRY[settings.model_name]
    hidden = int(vision.get("hidden_size", width))
    if hidden != width:
        raise CheckpointError(f"PS3 hidden_size={hidden} contradicts trunk {settings.model_name} width {width}")
    return {"image_size": settings.scales[-1], "patch_size": patch, "hidden_size": width, "num_hidden_layers": depth,
            "num_attention_heads": heads, "intermediate_size": mlp, "layer_norm_eps": 1e-6}


def expected_ps3_tensors(s: Ps3Settings) -> dict[str, tuple[int, ...]]:
    """`vision_tower/model.safetensors` of a PS3VisionModel (names from modeling_ps3.py's module tree)."""
    patch, c, depth, _, mlp, grid = TRUNK_GEOMETRY[s.model_name]
    exp: dict[str, tuple[int, ...]] = {}

    def lin(name, i, o):
        exp[name + ".weight"], exp[name + ".bias"] = (o, i), (o,)

    def norm(name, n):
        exp[name + ".weight"], exp[name + ".bias"] = (n,), (n,)

    t = "vision_model.trunk."
    exp[t + "patch_embed.proj.weight"], exp[t + "patch_embed.proj.bias"] = (c, 3, patch, patch), (c,)
    exp[t + "pos_embed"] = (1, grid * grid, c)
    for k in range(depth):
        b = f"{t}blocks.{k}."
        norm(b + "norm1", c)
        norm(b + "norm2", c)
        lin(b + "attn.qkv", c, 3 * c)
        lin(b + "attn.proj", c, c)
        lin(b + "mlp.fc1", c, mlp)
        lin(b + "mlp.fc2", mlp, c)
    norm(t + "norm", c)
    exp[t + "attn_pool.latent"] = (1, 1, c)
    lin(t + "attn_pool.q", c, c)
    lin(t + "attn_pool.kv", c, 2 * c)
    lin(t + "attn_pool.proj", c, c)
    norm(t + "attn_pool.norm", c)
    lin(t + "attn_pool.mlp.fc1", c, mlp)
    lin(t + "attn_pool.mlp.fc2", mlp, c)
    v = "vision_model."
    n_sel, n_high = c * len(s.select_based_on_layer), len(s.scales) - 1
    lin(v + "selection_feature_proj.fc1", n_sel, n_sel)
    norm(v + "selection_feature_proj.norm", n_sel)
    lin(v + "selection_feature_proj.fc2", n_sel, c * n_high)
    exp[v + "prior_prompt"] = (c,)
    if s.separate_pos_emb:
        for i, scale in enumerate(s.scales[1:]):
            exp[f"{v}pos_emb_residual.{i}"] = (1, (scale // patch) ** 2, c)
    if s.highres_selection_feature:
        h, m = v + "highres_selection_feature_module.", s.sel_hidden_dim
        exp[h + "stem.0.weight"], exp[h + "stem.0.bias"] = (m, 3, s.sel_kernel, s.sel_kernel), (m,)
        norm(h + "stem.1", m)
        for k in range(s.sel_depth):
            b = f"{h}blocks.{k}."
            exp[b + "conv_dw.weight"], exp[b + "conv_dw.bias"] = (m, 1, 7, 7), (m,)
            norm(b + "norm", m)
            lin(b + "mlp.fc1", m, 4 * m)
            lin(b + "mlp.fc2", 4 * m, m)
            exp[b + "weight"] = (m,)
        exp[h + "out_proj.weight"], exp[h + "out_proj.bias"] = (s.sel_out_dim, m, 1, 1), (s.sel_out_dim,)
        lin(v + "prompt_proj_for_highres", c, s.sel_out_dim * n_high)
    return exp


def expected_ps3_projector_extras(s: Ps3Settings, llm_hidden: int) -> dict[str, tuple[int, ...]]:
    """base_projector.py: high_res_pos_embed [1, low-res tokens, D] and one [1, 1, D] per scale."""
    if not s.high_res_pos_embed:
        return {}
    exp = {"high_res_pos_embed": (1, s.low_res_tokens, llm_hidden)}
    for i in range(len(s.scales)):
        exp[f"high_res_scale_embed.{i}"] = (1, 1, llm_hidden)
    return exp


def max_item_tokens(s: Ps3Settings, k: int) -> int:
    """Upper bound of one image's projector rows (encode_images_ps3): the low-res cells plus every high-res cell
    that could be fully selected. Exact when the look-close steps select every patch (e.g. 1.5K, 6 steps);
    with grids divisible by k a kept cell needs k*k selected patches of its own, which bounds the rest."""
    low = math.ceil(s.low_res_grid / k) ** 2
    cells = sum(math.ceil(g / k) ** 2 for g in s.high_res_grids)
    if all(g % k == 0 for g in s.high_res_grids):
        cells = min(cells, s.look_close_steps()[1] // (k * k))
    return low + max(cells, 1)


def ps3_flops(s: Ps3Settings, layers_used: int, projector_flops_per_row: int, k: int) -> int:
    """FLOPs (multiply-add = 2) of one image through PS3 as VILA runs it: the low-res pass (every block: the
    selection reads the last ones), each look-close step's selected tokens attending to themselves and the
    low-res K/V through the blocks up to the select layer, the patch embedding of every high-res grid per step
    (the graph embeds all patches, then gathers), and the projector over every grid's cells."""
    patch, h, depth, _, i, _ = TRUNK_GEOMETRY[s.model_name]
    t0 = s.low_res_tokens
    steps, total = s.look_close_steps()

    def layer(n: int, keys: int) -> int:
        return 8 * n * h * h + 4 * n * h * i + 4 * n * keys * h

    embed = 2 * 3 * patch * patch * h
    low = t0 * embed + depth * layer(t0, t0)
    n = -(-total // steps)
    high = steps * (s.max_high_res_tokens * embed + layers_used * layer(n, t0 + n))
    cells = math.ceil(s.low_res_grid / k) ** 2 + sum(math.ceil(g / k) ** 2 for g in s.high_res_grids)
    return low + high + cells * projector_flops_per_row


def ps3_activation_values(s: Ps3Settings, layers_used: int, heads: int, fused_attention: bool) -> int:
    """Values alive at PS3's peak: the low-res K/V cache, one step's tokens through a block (with the score
    matrix unless attention is fused), and the zero-filled full grids the projector reads."""
    _, h, _, _, i, _ = TRUNK_GEOMETRY[s.model_name]
    t0 = s.low_res_tokens
    steps, total = s.look_close_steps()
    n = -(-total // steps)
    scores = 0 if fused_attention else heads * (t0 + n)
    kv = layers_used * 2 * t0 * h
    return kv + n * (2 * h + max(3 * h + scores, i)) + (t0 + s.max_high_res_tokens) * h
