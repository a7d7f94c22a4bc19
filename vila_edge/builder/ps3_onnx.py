"""PS3 (VILA-HD) vision -> three ONNX graphs; the patch selection stays in numpy (`vila_edge.ps3` says why).

    ps3_low_res    pixel_values [1,3,S,S], prompt [1,C] -> low_res_features [T0,C], kv_cache [L,2,H,T0,hd],
                   prior_probs [M], prompt_probs [M]        (L = blocks up to VILA's select layer)
    ps3_high_res   pixel_values, kv_cache, indices [N] (dynamic) -> features [N,C]
    ps3_projector  features [T0+M, C] -> cells [T0'+sum cells, D]  (projector per grid + high-res pos embeds)

The modules are the reference's own (`reference.ps3`); the high-res graph holds each scale's position table
(the trunk's bicubic-antialiased resample + `pos_emb_residual`) as a constant, computed by the reference.
Opset 18 (Resize-18, from the bicubic resizes), not lowered to 17: ONNX Runtime runs it; TensorRT 8.6
(JetPack 6.0) would need Resize-13 (UNVERIFIED whether the dynamo exporter can emit it for these graphs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vila_edge.builder.vision_onnx import _quiet_exporter
from vila_edge.errors import EngineError

OPSET = 18


def load_ps3(ckpt):
    """(PS3Tower, projector, projector extras) of a checkpoint, float32, eval."""
    import torch

    from vila_edge.reference.projector import load_projector
    from vila_edge.reference.ps3 import PS3Tower, load_ps3_encoder, split_projector_state

    cfg = ckpt.config
    enc = load_ps3_encoder(cfg.vision.ps3, ckpt.state_dict("vision_tower", torch.float32))
    layers, extras = split_projector_state(ckpt.state_dict("mm_projector", torch.float32))
    return PS3Tower(enc, cfg.vision).eval(), load_projector(cfg.projector, layers), extras


def graph_modules(tower, projector, extras):
    """{name: (module, example inputs, input names, output names, dynamic shapes)} for the three graphs."""
    import torch
    import torch.nn as nn

    from vila_edge.reference.ps3 import projected_cells, resampled_pos_embed

    enc, n_blocks = tower.enc, tower.n_blocks
    s = enc.s
    pos = extras if s.high_res_pos_embed else None

    class LowRes(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc

        def forward(self, pixels, prompt):
            outs, kvs = self.enc.low_res(pixels)
            fmap, hmap = self.enc.selection_maps_in(pixels, outs)
            prior = self.enc._select_probs(fmap, hmap, self.enc.prior_prompt[None])
            topdown = self.enc._select_probs(fmap, hmap, prompt)
            kv = torch.stack([torch.stack([k[0], v[0]]) for k, v in kvs[:n_blocks]])
            return (outs[n_blocks - 1][0], kv, torch.cat([p.reshape(-1) for p in prior]),
                    torch.cat([p.reshape(-1) for p in topdown]))

    class HighRes(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc
            with torch.no_grad():
                tables = [resampled_pos_embed(enc.trunk.pos_embed, g) for g in s.high_res_grids]
                if s.separate_pos_emb:
                    tables = [t + enc.pos_emb_residual[i][0] for i, t in enumerate(tables)]
            self.register_buffer("pos", torch.cat(tables).detach().clone())

        def forward(self, pixels, kv_cache, indices):
            tok = []
            for scale in s.scales[1:]:
                x = torch.nn.functional.interpolate(pixels, size=(scale, scale), mode="bicubic")
                tok.append(self.enc.trunk.patch_embed.proj(x).flatten(2).transpose(1, 2)[0])
            x = (torch.cat(tok) + self.pos)[indices][None]
            for i, blk in enumerate(self.enc.trunk.blocks[:n_blocks]):
                x, _ = blk(x, (kv_cache[i, 0][None], kv_cache[i, 1][None]))
            return x[0]

    class Project(nn.Module):
        def __init__(self):
            super().__init__()
            self.projector = projector
            self.pos = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(v, requires_grad=False)
                                         for k, v in (pos or {}).items()})

        def forward(self, features):
            p = {k: self.pos[k.replace(".", "_")] for k in (pos or {})} if pos else None
            return projected_cells(features, s, self.projector, p)

    c, side = enc.trunk.dim, s.scales[-1]
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand((1, 3, side, side), generator=g) * 2 - 1
    prompt = torch.randn((1, c), generator=g)
    heads = enc.trunk.heads
    kv = torch.randn((n_blocks, 2, heads, s.low_res_tokens, c // heads), generator=g)
    idx = torch.arange(0, s.max_high_res_tokens, 3, dtype=torch.long)[: max(2, s.per_step - 1)]
    feats = torch.randn((s.low_res_tokens + s.max_high_res_tokens, c), generator=g)
    n = torch.export.Dim("selected", min=1, max=s.max_high_res_tokens)
    return {
        "ps3_low_res": (LowRes().eval(), (pixels, prompt), ["pixel_values", "prompt"],
                        ["low_res_features", "kv_cache", "prior_probs", "prompt_probs"], None),
        "ps3_high_res": (HighRes().eval(), (pixels, kv, idx), ["pixel_values", "kv_cache", "indices"], ["features"],
                         (None, None, {0: n})),
        "ps3_projector": (Project().eval(), (feats,), ["features"], ["cells"], None),
    }


def export_ps3(tower, projector, extras, vdir) -> dict[str, Path]:
    import torch

    vdir = Path(vdir)
    vdir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (module, example, ins, outs, dyn) in graph_modules(tower, projector, extras).items():
        path = vdir / f"{name}.fp32.onnx"
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(module, example, dynamo=True, opset_version=OPSET, input_names=ins,
                                        output_names=outs, dynamic_shapes=dyn, optimize=True, verbose=False,
                                        report=False)
            program.save(str(path))
        paths[name] = path
    return paths


def check_ps3_parity(paths: dict[str, Path], tower, projector, extras, pixels: np.ndarray,
                     prompt: np.ndarray | None = None) -> dict:
    """The ONNX path (vila_edge.ps3.Ps3Runner) against the reference on one image: max |diff| of the
    features and the projected item, and whether every look-close step selected the same patches."""
    import torch

    from vila_edge.ps3 import Ps3Runner, selection_steps
    from vila_edge.reference.ps3 import project_ps3
    from vila_edge.reference.ps3 import selection_steps as ref_steps

    s = tower.enc.s
    info = {"files": {n: {"fp32": f"{p.parent.name}/{p.name}"} for n, p in paths.items()}}
    runner = Ps3Runner(next(iter(paths.values())).parent, info, s, projector.cfg.downsample)
    x = torch.as_tensor(pixels, dtype=torch.float32)
    p = None if prompt is None else torch.as_tensor(prompt, dtype=torch.float32)
    with torch.no_grad():
        want, maps, probs = tower(x, p)
        item = project_ps3(want, maps, s, projector, extras if s.high_res_pos_embed else None)
    _, _, got_probs = runner.select(pixels, prompt)
    got, got_maps, _ = runner.features(pixels, prompt)
    got_item = runner.item(pixels, prompt)
    ref_sel = ref_steps(s, probs)
    same_steps = all(np.array_equal(a, b.numpy()) for sa, sb in zip(selection_steps(s, got_probs), ref_sel, strict=True)
                     for a, b in zip(sa, sb, strict=True))
    if got.shape != tuple(want.shape) or got_item.shape != tuple(item.shape):
        raise EngineError(f"PS3 ONNX path gives {got.shape} / {got_item.shape}, the reference "
                          f"{tuple(want.shape)} / {tuple(item.shape)} (a different selection?)")
    probs_ref = np.concatenate([q.reshape(-1).numpy() for q in probs])
    diff = float(np.abs(got - want.numpy()).max())
    return {"features_max_abs": diff, "features_rel": diff / max(float(np.abs(want.numpy()).max()), 1e-30),
            "item_max_abs": float(np.abs(got_item - item.numpy()).max()),
            "probs_max_abs": float(np.abs(np.concatenate([q.reshape(-1) for q in got_probs]) - probs_ref).max()),
            "same_selection": bool(same_steps and all(np.array_equal(a, b.numpy()) for a, b in zip(got_maps, maps, strict=True))),
            "tokens": int(got_item.shape[0]), "selected": int(sum(m.sum() for m in got_maps))}


def export_vision_stage(ckpt, tmp: Path, options, rep, parity_limit: float) -> dict:
    """The build's vision stage for a PS3 checkpoint: the three fp32 graphs, checked against the reference
    (bottom-up and top-down) on a synthetic image; the manifest's `vision` entry."""
    from vila_edge.builder.vision_onnx import sample_tiles

    cfg = ckpt.config
    if options.precision != "fp32" or options.int8_vision or options.qdq_vision or options.combined_vision:
        raise EngineError("PS3 (VILA-HD) vision builds in fp32 only for now: drop --vision-precision/--int8-vision/"
                          "--qdq-vision/--combined-vision")
    if options.torch_weights:
        raise EngineError("PS3 (VILA-HD) has no torch-backend vision weights yet: drop --torch-weights")
    with rep.step("load PS3 tower + projector weights"):
        tower, projector, extras = load_ps3(ckpt)
    with rep.step(f"export PS3 low-res / high-res / projector -> ONNX (opset {OPSET})"):
        paths = export_ps3(tower, projector, extras, tmp / "vision")
    checks = {}
    with rep.step("PS3 ONNX path vs the PyTorch reference (bottom-up and top-down selection)"):
        pixels = sample_tiles(cfg, n=1)
        prompt = np.random.default_rng(0).standard_normal((1, cfg.vision.hidden_size)).astype(np.float32)
        for mode, p in (("bottom_up", None), ("top_down", prompt)):
            par = check_ps3_parity(paths, tower, projector, extras, pixels, p)
            if not (par["same_selection"] and par["features_rel"] <= parity_limit):
                raise EngineError(f"PS3 ONNX path differs from the PyTorch reference ({mode}: {par}); the export is "
                                  f"broken, please report it")
            checks[f"ps3_{mode}_vs_reference"] = par
    s = cfg.vision.ps3
    return {
        "exporter": "torch.onnx.export(dynamo=True)", "opset": OPSET, "precision": "fp32", "tower": "ps3",
        "files": {n: {"fp32": p.relative_to(tmp).as_posix()} for n, p in paths.items()}, "plans": {},
        "io": {"ps3_low_res": {"input": "pixel_values, prompt", "output": "low_res_features, kv_cache, prior_probs, "
                               "prompt_probs"},
               "ps3_high_res": {"input": "pixel_values, kv_cache, indices", "output": "features"},
               "ps3_projector": {"input": "features", "output": "cells"}},
        "image_size": cfg.vision.image_size, "hidden_size": cfg.vision.hidden_size, "embed_dim": cfg.projector.out_features,
        "selection": {"between": "ps3_low_res and ps3_high_res (numpy, runtime: vila_edge.ps3)",
                      "steps": s.look_close_steps()[0], "per_step": s.per_step, "mode": s.look_close_mode},
        "checks": checks,
    }
