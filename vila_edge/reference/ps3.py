"""PS3 (VILA-HD's 4K tower) as VILA drives it for inference: the PyTorch oracle.

Upstream, read for this file: NVlabs/PS3 `ps3/modeling_ps3.py` (PS3VisionEncoder: forward_low_res,
get_selection_probs / _calculate_select_probs, get_selection_maps, forward_high_res with the low-res KV
cache, aggregate_features; SelectedPatchEmbed, selected_pos_embed, resample_abs_pos_embed,
Block_w_KVCache, ShallowConvNet) and NVlabs/VILA `llava/model/llava_arch.py::encode_images_ps3`,
`llava/model/multimodal_encoder/{ps3_encoder,vision_encoder}.py` (num_hidden_layers_to_return=2,
feature_select) and `llava/model/multimodal_projector/base_projector.py` (high_res_pos_embed).

One image, square (VILA's default; `ps3_dynamic_aspect_ratio` is refused elsewhere):
1. low-res pass: the image resized (bicubic) to scales[0], all trunk blocks, keeping each block's K/V;
2. selection probabilities from the low-res block outputs `select_based_on_layer` (+ the ShallowConvNet on
   the image at 1512) against a prompt: the learned `prior_prompt` (bottom-up, VILA's "after_image") or a
   prompt embedding (top-down, "after_prompt": VILA makes it from the LLM's hidden state);
3. `steps` high-res passes, each over the top `select_num_each_scale` not-yet-selected patches of every
   high-res scale; their tokens attend to themselves and the low-res K/V;
4. VILA's feature: hidden_states[select_layer] of [low-res tokens, selected high-res tokens in row-major
   order over the concatenated scale grids], then `project_ps3` (encode_images_ps3).

Deliberate deviation: upstream picks the top-k with `torch.topk`, whose choice among EQUAL probabilities is
unspecified (and differs between CPU and CUDA). Equal probabilities are the rule here, not the exception:
one low-res probability is copied (nearest) onto a 2x2 / 4x4 / 10x10 block of each high-res scale. The
oracle breaks ties by the lower row-major index (a stable descending sort), as `vila_edge.ps3` does.
UNVERIFIED: which of the tied patches upstream's CUDA topk keeps.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vila_edge.config import VisionConfig
from vila_edge.ps3_config import TRUNK_GEOMETRY, Ps3Settings, select_counts, step_token_budgets

HIGHRES_SELECTION_SIZE = 1512  # PS3VisionEncoder.forward resizes to 1512 for the ShallowConvNet, whatever the scales


# ---- trunk (timm VisionTransformer with PS3's KV-cache blocks) ------------------------------------------


class Mlp(nn.Module):
    """timm.layers.Mlp: fc1 -> GELU (erf) -> [norm] -> fc2."""

    def __init__(self, c_in: int, hidden: int, c_out: int, norm: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(c_in, hidden)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden) if norm else nn.Identity()  # selection_feature_proj: nn.LayerNorm, eps 1e-5
        self.fc2 = nn.Linear(hidden, c_out)

    def forward(self, x):
        return self.fc2(self.norm(self.act(self.fc1(x))))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, kv_cache=None):
        """x [B, N, C]; kv_cache (k, v) each [B, H, M, hd] are prepended to this pass's keys/values."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if kv_cache is not None:
            k = torch.cat([kv_cache[0], k], dim=2)
            v = torch.cat([kv_cache[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), (k, v)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp, dim)

    def forward(self, x, kv_cache=None):
        a, kv = self.attn(self.norm1(x), kv_cache)
        x = x + a
        return x + self.mlp(self.norm2(x)), kv


class AttnPool(nn.Module):
    """timm AttentionPoolLatent ('map' head): on disk, never used by VILA (it reads hidden states)."""

    def __init__(self, dim: int, mlp: int):
        super().__init__()
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp, dim)


class Trunk(nn.Module):
    def __init__(self, name: str):
        super().__init__()
        patch, dim, depth, heads, mlp, grid = TRUNK_GEOMETRY[name]
        self.patch, self.dim, self.heads = patch, dim, heads
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # after the last block: not part of VILA's hidden states
        self.attn_pool = AttnPool(dim, mlp)


def resampled_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """PS3's resample_abs_pos_embed for a square grid: [1, G*G, C] -> [grid*grid, C] (bicubic, antialias)."""
    old = math.isqrt(pos_embed.shape[1])
    if old == grid:
        return pos_embed[0]
    c = pos_embed.shape[-1]
    x = pos_embed.float().reshape(1, old, old, c).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", antialias=True)
    return x.permute(0, 2, 3, 1).reshape(grid * grid, c)


def adaptive_max_pool(x: torch.Tensor, out: int) -> torch.Tensor:
    """F.adaptive_max_pool2d(x, out) on a square map, spelled with static windows (ONNX has no adaptive
    pooling): window i is [floor(i*n/out), ceil((i+1)*n/out)); max is exact, so the result is identical."""
    n = x.shape[-1]
    if n % out == 0:
        return F.max_pool2d(x, n // out)
    win = [(i * n // out, -(-(i + 1) * n // out)) for i in range(out)]
    rows = [torch.cat([x[..., r0:r1, c0:c1].amax(dim=(-2, -1), keepdim=True) for c0, c1 in win], dim=-1)
            for r0, r1 in win]
    return torch.cat(rows, dim=-2)


# ---- the selection ConvNet (ShallowConvNet, timm ConvNeXt blocks) --------------------------------------


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """timm ConvNeXtBlock (conv_mlp=False, ls_init_value set); PS3 renames its `gamma` to `weight`."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim, dim)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = self.mlp(self.norm(self.conv_dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x + y * self.weight.reshape(1, -1, 1, 1)


class ShallowConvNet(nn.Module):
    def __init__(self, s: Ps3Settings):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, s.sel_hidden_dim, s.sel_kernel, stride=s.sel_kernel),
                                  LayerNorm2d(s.sel_hidden_dim, eps=1e-6))
        self.blocks = nn.Sequential(*(ConvNeXtBlock(s.sel_hidden_dim) for _ in range(s.sel_depth)))
        self.out_proj = nn.Conv2d(s.sel_hidden_dim, s.sel_out_dim, 1)

    def forward(self, x):
        return self.out_proj(self.blocks(self.stem(x)))


# ---- the encoder -----------------------------------------------------------------------------------------


class PS3Encoder(nn.Module):
    """Parameter names = `vision_tower/model.safetensors` without its "vision_model." prefix."""

    def __init__(self, s: Ps3Settings):
        super().__init__()
        self.s = s
        self.trunk = Trunk(s.model_name)
        dim, n_high = self.trunk.dim, len(s.scales) - 1
        n_sel = dim * len(s.select_based_on_layer)
        self.selection_feature_proj = Mlp(n_sel, n_sel, dim * n_high, norm=True)
        self.prior_prompt = nn.Parameter(torch.zeros(dim))
        if s.separate_pos_emb:
            self.pos_emb_residual = nn.ParameterList(
                nn.Parameter(torch.zeros(1, (s.scales[i] // self.trunk.patch) ** 2, dim)) for i in range(1, len(s.scales)))
        if s.highres_selection_feature:
            self.highres_selection_feature_module = ShallowConvNet(s)
            self.prompt_proj_for_highres = nn.Linear(dim, s.sel_out_dim * n_high)

    # -- 1. low-res pass
    def low_res(self, pixels: torch.Tensor, n_blocks: int | None = None):
        """pixels [1,3,S,S] at scales[-1] -> (block outputs [1, T0, C] each, K/V per block)."""
        s0 = self.s.scales[0]
        x = F.interpolate(pixels.float(), size=(s0, s0), mode="bicubic")
        x = self.trunk.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = x + resampled_pos_embed(self.trunk.pos_embed, self.s.low_res_grid)
        outs, kvs = [], []
        for blk in self.trunk.blocks[:n_blocks]:
            x, kv = blk(x)
            outs.append(x)
            kvs.append(kv)
        return outs, kvs

    # -- 2. selection probabilities
    def _select_probs(self, fmap, hmap, prompt):
        """_calculate_select_probs: fmap [B, S-1, C, h, w], hmap [B, C', H', W'] or None, prompt [B, C]."""
        logits = (F.normalize(fmap, dim=2) * F.normalize(prompt, dim=-1)[..., None, None].unsqueeze(1)).sum(dim=2)
        if hmap is not None:
            hp = self.prompt_proj_for_highres(prompt).reshape(prompt.shape[0], len(self.s.scales) - 1, -1)
            hl = (F.normalize(hmap, dim=1).unsqueeze(1) * F.normalize(hp, dim=-1)[..., None, None]).sum(dim=2)
            logits = (logits + adaptive_max_pool(hl, logits.shape[-1])) / 2
        logits = (logits * 5.0).clamp(-10, 10)
        probs = F.softmax(F.pad(logits[..., None], (0, 1)), dim=-1)[..., 0]
        probs = probs * 0 + probs[:, :1]  # upstream: every scale uses the first scale's probabilities
        return [F.interpolate(probs[:, i:i + 1], size=(g, g), mode="nearest")[:, 0]
                for i, g in enumerate(self.s.high_res_grids)]

    def selection_maps_in(self, pixels: torch.Tensor, block_outputs):
        """(feature map [1, S-1, C, h, w], ShallowConvNet map or None): what every prompt is compared with."""
        feats = torch.cat([block_outputs[i] for i in self.s.select_based_on_layer], dim=-1)
        g0 = self.s.low_res_grid
        fmap = self.selection_feature_proj(feats.reshape(1, g0, g0, -1))  # B, h, w, (S-1)*C
        fmap = fmap.reshape(1, g0, g0, len(self.s.scales) - 1, -1).permute(0, 3, 4, 1, 2)
        hmap = None
        if self.s.highres_selection_feature:
            big = F.interpolate(pixels.float(), size=HIGHRES_SELECTION_SIZE, mode="bicubic")
            hmap = self.highres_selection_feature_module(big)
        return fmap, hmap

    def selection_probs(self, pixels: torch.Tensor, block_outputs, prompt: torch.Tensor | None = None):
        """Per high-res scale [1, g, g] probabilities; prompt None = bottom-up (prior_prompt)."""
        fmap, hmap = self.selection_maps_in(pixels, block_outputs)
        prompt = self.prior_prompt[None] if prompt is None else prompt.reshape(1, -1).float()
        return self._select_probs(fmap, hmap, prompt)

    # -- 3. one high-res pass over selected patches
    def high_res_tokens(self, pixels: torch.Tensor, maps: list[torch.Tensor]) -> torch.Tensor:
        """tokenize_high_res: [1, N, C] for the selected patches, scale by scale, row-major within a scale."""
        w = self.trunk.patch_embed.proj.weight.reshape(self.trunk.dim, -1)
        b = self.trunk.patch_embed.proj.bias
        out = []
        for i, (scale, g) in enumerate(zip(self.s.scales[1:], self.s.high_res_grids, strict=True)):
            sel = maps[i].reshape(-1).bool()
            if not sel.any():
                continue
            x = F.interpolate(pixels.float(), size=(scale, scale), mode="bicubic")
            patches = F.unfold(x, kernel_size=self.trunk.patch, stride=self.trunk.patch)[0].T  # [g*g, 3*p*p]
            tok = patches[sel] @ w.T + b
            tok = tok + resampled_pos_embed(self.trunk.pos_embed, g)[sel]
            if self.s.separate_pos_emb:
                tok = tok + self.pos_emb_residual[i][0][sel]
            out.append(tok)
        return torch.cat(out)[None]

    def high_res(self, pixels, maps, kvs, n_blocks: int):
        x = self.high_res_tokens(pixels, maps)
        outs = []
        for blk, kv in zip(self.trunk.blocks[:n_blocks], kvs[:n_blocks], strict=True):
            x, _ = blk(x, kv)
            outs.append(x)
        return outs


# ---- selection (get_selection_maps / update / aggregate, one image) -------------------------------------


def selection_steps(s: Ps3Settings, probs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Each step's new selection maps ([g, g] 0/1 per scale), ties broken by the lower row-major index."""
    taken = [torch.zeros_like(p[0]) for p in probs]
    steps = []
    for budget in step_token_budgets(s):
        masked = [p[0] * (1 - t) + (-1) * t for p, t in zip(probs, taken, strict=True)]
        flat = [m.reshape(-1) for m in masked]
        nums = select_counts(s, [int((f != -1).sum()) for f in flat], budget)
        new = []
        for f, m, k in zip(flat, masked, nums, strict=True):
            sel = torch.zeros_like(f)
            sel[torch.sort(f, descending=True, stable=True).indices[:k]] = 1
            new.append(sel.reshape(m.shape))
        steps.append(new)
        taken = [t + n for t, n in zip(taken, new, strict=True)]
    return steps


def aggregate(step_maps: list[list[torch.Tensor]], step_feats: list[torch.Tensor]) -> torch.Tensor:
    """aggregate_features: every step's tokens in row-major order of the union of the maps -> [N, C]."""
    flat = [torch.cat([m.reshape(-1) for m in maps]) for maps in step_maps]
    full = torch.zeros(flat[0].shape[0], step_feats[0].shape[-1])
    for f, x in zip(flat, step_feats, strict=True):
        full[f.bool()] = x[0]
    return full[sum(flat).bool()]


def union(step_maps: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [sum(maps[i] for maps in step_maps) for i in range(len(step_maps[0]))]


class PS3Tower(nn.Module):
    """What VILA's PS3VisionTower returns for one image: (features [T0 + N, C], union selection maps)."""

    def __init__(self, encoder: PS3Encoder, vision: VisionConfig):
        super().__init__()
        self.enc = encoder
        if vision.select_layer not in (-1, -2):
            raise ValueError("PS3 returns 2 hidden states to VILA: mm_vision_select_layer must be -1 or -2")
        self.n_blocks = vision.layers_used

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, prompt: torch.Tensor | None = None):
        s = self.enc.s
        outs, kvs = self.enc.low_res(pixels)
        probs = self.enc.selection_probs(pixels, outs, prompt)
        step_maps = selection_steps(s, probs)
        step_feats = [self.enc.high_res(pixels, maps, kvs, self.n_blocks)[-1] for maps in step_maps]
        high = aggregate(step_maps, step_feats)
        return torch.cat([outs[self.n_blocks - 1][0], high]), union(step_maps), probs


# ---- VILA's encode_images_ps3: projector, high-res position embeddings, kept cells ----------------------


def _pos_grid(pos: dict | None):
    if pos is None:
        return None
    g = math.isqrt(pos["high_res_pos_embed"].shape[1])
    return pos["high_res_pos_embed"].reshape(1, g, g, -1).permute(0, 3, 1, 2)


def project_low_res(low: torch.Tensor, projector, pos: dict | None = None) -> torch.Tensor:
    """[T0, C] low-res features -> [T0', D]: the projector, plus the area-resized high_res_pos_embed and
    high_res_scale_embed.0 (what VILA-HD's after_prompt pre-pass feeds the LLM for each image)."""
    out = projector(low[None])[0]
    pe = _pos_grid(pos)
    if pe is not None:
        side = math.isqrt(out.shape[0])
        out = out + F.interpolate(pe, size=(side, side), mode="area").flatten(2).transpose(1, 2)[0] \
            + pos["high_res_scale_embed.0"][0]
    return out


def top_down_prompt_head(extras: dict, hidden: torch.Tensor) -> torch.Tensor:
    """base_projector.py's top_down_prompt_head: LLM hidden [D] -> prompt [C] (linear, or timm Mlp with LayerNorm)."""
    if "top_down_prompt_head.weight" in extras:
        return F.linear(hidden, extras["top_down_prompt_head.weight"], extras["top_down_prompt_head.bias"])
    if "top_down_prompt_head.fc1.weight" in extras:
        p = "top_down_prompt_head."
        x = F.gelu(F.linear(hidden, extras[p + "fc1.weight"], extras[p + "fc1.bias"]))
        x = F.layer_norm(x, x.shape[-1:], extras[p + "norm.weight"], extras[p + "norm.bias"])
        return F.linear(x, extras[p + "fc2.weight"], extras[p + "fc2.bias"])
    raise ValueError("look_close_mode=after_prompt needs the projector's top_down_prompt_head weights")


def projected_cells(full: torch.Tensor, s: Ps3Settings, projector, pos: dict | None = None) -> torch.Tensor:
    """[T0 + M, C] (low-res tokens, then every high-res grid with zeros where nothing was selected) ->
    [T0' + sum cells, D]: the projector per grid, plus high_res_pos_embed / high_res_scale_embed.<i> (`pos`)."""
    k = projector.cfg.downsample
    if k == 1:  # upstream's non-downsample branch ends in a NameError (processed_high_res_features)
        raise ValueError("PS3 features need an mlp_downsample projector (as encode_images_ps3)")
    t0 = s.low_res_tokens
    pe = _pos_grid(pos)
    out, start = [], t0
    low = project_low_res(full[:t0], projector, pos)
    for i, g in enumerate(s.high_res_grids):
        cur = projector(full[None, start:start + g * g])[0]
        start += g * g
        if pe is not None:
            cells = math.ceil(g / k)
            cur = cur + F.interpolate(pe, size=(cells, cells), mode="area").flatten(2).transpose(1, 2)[0] \
                + pos[f"high_res_scale_embed.{i + 1}"][0]
        out.append(cur)
    return torch.cat([low, *out])


def kept_cells(maps: list[torch.Tensor], k: int) -> torch.Tensor:
    """encode_images_ps3 keeps a high-res cell when its area-downsampled selection map is exactly 1."""
    keep = []
    for m in maps:
        cells = math.ceil(m.shape[-1] / k)
        keep.append(F.interpolate(m.reshape(1, 1, *m.shape[-2:]).float(), size=(cells, cells), mode="area").reshape(-1) == 1)
    return torch.cat(keep)


def project_ps3(feats: torch.Tensor, maps: list[torch.Tensor], s: Ps3Settings, projector,
                pos: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """encode_images_ps3 for one image: [T0 + N, C] + union maps -> [tokens, D]: the low-res tokens, then
    the high-res cells whose every patch was selected (none: the first low-res token, as upstream)."""
    t0 = s.low_res_tokens
    flat_sel = torch.cat([m.reshape(-1) for m in maps]).bool()
    full = torch.zeros(t0 + flat_sel.shape[0], feats.shape[-1])
    full[:t0] = feats[:t0]
    full[t0:][flat_sel] = feats[t0:]
    cells = projected_cells(full, s, projector, pos)
    n_low = projector.cfg.tokens_out(s.low_res_grid)
    low, high = cells[:n_low], cells[n_low:][kept_cells(maps, projector.cfg.downsample)]
    if high.shape[0] == 0:
        high = low[:1]
    return torch.cat([low, high])


def load_ps3_encoder(s: Ps3Settings, state_dict: dict) -> PS3Encoder:
    enc = PS3Encoder(s)
    bare = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v.float() for k, v in state_dict.items()}
    enc.load_state_dict(bare, strict=True)
    return enc.eval()


def ps3_state_dict_on_disk(enc: PS3Encoder) -> dict:
    return {"vision_model." + k: v.contiguous().clone() for k, v in enc.state_dict().items()}


def split_projector_state(state_dict: dict) -> tuple[dict, dict]:
    """mm_projector weights -> (the MLP's `layers.*`, PS3 extras: high_res_pos_embed, scale embeds, prompt head)."""
    layers = {k: v for k, v in state_dict.items() if k.startswith("layers")}
    extras = {k: v.float() for k, v in state_dict.items() if not k.startswith("layers")}
    return layers, extras
