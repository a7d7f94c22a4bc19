"""PS3 (VILA-HD) at run time: three ONNX graphs with the patch selection in numpy between them.

    pixels [1,3,S,S], prompt [1,C] --ps3_low_res--> low-res features [T0,C], K/V [L,2,H,T0,hd],
                                                    bottom-up and top-down probabilities [M]
    numpy: top-k of the not-yet-selected patches per scale, `steps` times   (selection_steps)
    each step: pixels, K/V, indices [N] --ps3_high_res--> features [N,C]
    numpy: the low-res features + every grid zero-filled except the selected patches [T0+M, C]
           --ps3_projector--> cells [T0'+sum cells, D]; keep the low-res cells and the fully selected
           high-res cells (kept_cells)

Why the selection is numpy and not TopK in a graph: how many patches a step takes per scale depends on how
many are left (upstream's spill to the next scale), the steps repeat over an accumulating mask, and equal
probabilities are everywhere (nearest upsampling), so the tie rule must be exact: a stable descending sort
(lower row-major index first) in numpy is that rule, and TopK's tie order is not specified by ONNX.
Everything static-shaped (the ViT passes, the selection probabilities, the projector) is in the graphs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from vila_edge.errors import EngineError
from vila_edge.ps3_config import Ps3Settings, select_counts, step_token_budgets

GRAPHS = ("ps3_low_res", "ps3_high_res", "ps3_projector")


def split_scales(flat: np.ndarray, s: Ps3Settings) -> list[np.ndarray]:
    out, start = [], 0
    for g in s.high_res_grids:
        out.append(np.asarray(flat[start:start + g * g]).reshape(g, g))
        start += g * g
    return out


def selection_steps(s: Ps3Settings, probs: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Each look-close step's new selection maps ([g, g] 0/1 per scale), as reference.ps3.selection_steps."""
    taken = [np.zeros_like(p, dtype=np.float32) for p in probs]
    steps = []
    for budget in step_token_budgets(s):
        masked = [np.where(t > 0, np.float32(-1), p.astype(np.float32)) for p, t in zip(probs, taken, strict=True)]
        flat = [m.reshape(-1) for m in masked]
        nums = select_counts(s, [int((f != -1).sum()) for f in flat], budget)
        new = []
        for f, m, k in zip(flat, masked, nums, strict=True):
            sel = np.zeros(f.shape, np.float32)
            sel[np.argsort(-f, kind="stable")[:k]] = 1
            new.append(sel.reshape(m.shape))
        steps.append(new)
        taken = [t + n for t, n in zip(taken, new, strict=True)]
    return steps


def flat_indices(maps: list[np.ndarray]) -> np.ndarray:
    """Selected positions in the concatenated high-res grids, row-major (the order of upstream's tokens)."""
    return np.flatnonzero(np.concatenate([m.reshape(-1) for m in maps])).astype(np.int64)


def _area_windows(n: int, out: int) -> list[tuple[int, int]]:
    """F.interpolate(mode="area") = adaptive average pooling: window i is [floor(i*n/out), ceil((i+1)*n/out))."""
    return [(i * n // out, -(-(i + 1) * n // out)) for i in range(out)]


def kept_cells(maps: list[np.ndarray], k: int) -> np.ndarray:
    """encode_images_ps3 keeps a cell whose area-downsampled selection map is exactly 1 (every patch selected)."""
    keep = []
    for m in maps:
        cells = math.ceil(m.shape[-1] / k)
        win = _area_windows(m.shape[-1], cells)
        keep.append(np.array([bool(m[r0:r1, c0:c1].min() == 1) for r0, r1 in win for c0, c1 in win]))
    return np.concatenate(keep)


def low_res_cells(s: Ps3Settings, k: int) -> int:
    return math.ceil(s.low_res_grid / k) ** 2


class Ps3Runner:
    """The three ONNX Runtime sessions of an engine directory's PS3 vision part."""

    def __init__(self, vision_dir, info: dict, settings: Ps3Settings, downsample: int, providers=None, so=None):
        import onnxruntime as ort

        vision_dir = Path(vision_dir)
        files = info.get("files") or {}
        self.s, self.k = settings, downsample
        self.sessions = {}
        for name in GRAPHS:
            rel = (files.get(name) or {}).get("fp32")
            path = vision_dir.parent / rel if rel else vision_dir / f"{name}.fp32.onnx"
            if not path.is_file():
                raise EngineError(f"{path}: missing PS3 graph; rebuild the engine with `vila-edge build`")
            try:
                self.sessions[name] = ort.InferenceSession(str(path), sess_options=so,
                                                           providers=providers or ["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001
                raise EngineError(f"{path}: onnxruntime cannot load it ({exc})") from None
        self.width = int(self.sessions["ps3_low_res"].get_inputs()[1].shape[-1])

    def _run(self, name: str, feeds: dict) -> list[np.ndarray]:
        try:
            return self.sessions[name].run(None, feeds)
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"{name}: run failed ({exc})") from None

    def select(self, pixels: np.ndarray, prompt: np.ndarray | None = None):
        """(low-res features, K/V, selection probabilities per scale) for one image [1,3,S,S]."""
        p = np.zeros((1, self.width), np.float32) if prompt is None else np.asarray(prompt, np.float32).reshape(1, -1)
        feats, kv, prior, topdown = self._run("ps3_low_res", {"pixel_values": np.ascontiguousarray(pixels, np.float32),
                                                             "prompt": p})
        return feats, kv, split_scales(prior if prompt is None else topdown, self.s)

    def features(self, pixels: np.ndarray, prompt: np.ndarray | None = None):
        """VILA's PS3 output for one image: ([T0 + N, C] features, union selection maps)."""
        pixels = np.ascontiguousarray(pixels, np.float32)
        low, kv, probs = self.select(pixels, prompt)
        steps = selection_steps(self.s, probs)
        m = self.s.max_high_res_tokens
        full = np.zeros((m, low.shape[-1]), np.float32)
        for maps in steps:
            idx = flat_indices(maps)
            (out,) = self._run("ps3_high_res", {"pixel_values": pixels, "kv_cache": kv, "indices": idx})
            full[idx] = out
        union = [sum(maps[i] for maps in steps) for i in range(len(steps[0]))]
        return np.concatenate([low, full[flat_indices(union)]]), union, full

    def item(self, pixels: np.ndarray, prompt: np.ndarray | None = None) -> np.ndarray:
        """One media item [tokens, D]: as reference.ps3.project_ps3."""
        feats, union, full = self.features(pixels, prompt)
        t0 = self.s.low_res_tokens
        (cells,) = self._run("ps3_projector", {"features": np.concatenate([feats[:t0], full])})
        n_low = low_res_cells(self.s, self.k)
        high = cells[n_low:][kept_cells(union, self.k)]
        return np.concatenate([cells[:n_low], high if len(high) else cells[:1]])
