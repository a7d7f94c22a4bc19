"""The PyTorch reference of the whole VILA path: the oracle every engine and kernel is checked against.

media -> tiles (vila_edge.media) -> vision tower (SigLIP / CLIP / InternViT) -> S2 / dynamic-S2 merge -> projector -> splice -> LLM.
Runs in float32 on the CPU. The tiling scheme (`vila_edge.media.tiling`) says which tile grids to merge
(its `MergeSpec`) and which chunks form one media item; the merges themselves are upstream's PyTorch
steps (`vila_edge.reference.s2`), not the runtime's numpy or CUDA ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vila_edge.checkpoint import Checkpoint
from vila_edge.media.tiling import Tiles, tiling_scheme
from vila_edge.prompt import IMAGE_PLACEHOLDER
from vila_edge.reference.projector import load_projector
from vila_edge.reference.s2 import dynamic_s2_tokens, s2_merge
from vila_edge.reference.vision import load_tower
from vila_edge.splice import splice


def load_llm(ckpt: Checkpoint, dtype=torch.float32):
    """The checkpoint's LLM as a transformers causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if ckpt.layout == "dev":
        return AutoModelForCausalLM.from_pretrained(str(ckpt.part_dir("llm")), dtype=dtype).eval()
    raw = dict(ckpt.raw["llm"])
    model_type = raw.pop("model_type", "qwen2" if ckpt.config.llm.family == "qwen2" else "llama")
    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "architectures"})
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.load_state_dict(ckpt.state_dict("llm", dtype), strict=False)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


@dataclass
class MediaFeatures:
    items: list[torch.Tensor]  # one [n_i, D] tensor per media marker in the prompt


class ReferenceVILA:
    def __init__(self, ckpt: Checkpoint, *, llm: bool = True):
        self.ckpt = ckpt
        self.cfg = ckpt.config
        self.tower = load_tower(ckpt)
        self.projector = load_projector(self.cfg.projector, ckpt.state_dict("mm_projector", torch.float32))
        self.tiling = tiling_scheme(self.cfg.vision)  # which tiles, merged how (the merges themselves: reference.s2)
        self.llm = load_llm(ckpt) if llm else None

    # ---- vision ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_tiles(self, pixels) -> torch.Tensor:
        return self.tower(torch.as_tensor(np.asarray(pixels), dtype=torch.float32))

    @torch.no_grad()
    def projector_input(self, tiles: Tiles) -> torch.Tensor:
        """Features entering the projector for one image: [n_chunks, T, C*S]."""
        feats = self.encode_tiles(tiles.pixels)
        spec = self.tiling.merge_spec(tiles)
        return feats if spec is None else s2_merge(feats, spec)

    @torch.no_grad()
    def image_items(self, tiles: Tiles) -> list[torch.Tensor]:
        """Projected media items of one image (dynamic: one per tile; otherwise one)."""
        y = self.projector(self.projector_input(tiles))
        grid = self.tiling.item_grid(tiles)
        if grid is not None:
            return [dynamic_s2_tokens(y, grid)]
        if tiles.n_items == y.shape[0]:
            return list(y)
        return [y.reshape(-1, y.shape[-1])]

    # ---- language --------------------------------------------------------------------------
    @torch.no_grad()
    def load_llm_weights(self, weights: dict) -> None:
        """Replace LLM weights by HF-named float arrays (e.g. a built decoder's dequantized weights, read back
        with `builder.llm_onnx.dequantized_weights`). A given lm_head unties it: the embedding table stays."""
        if "lm_head.weight" in weights and self.llm.config.tie_word_embeddings:
            self.llm.config.tie_word_embeddings = False
            self.llm.lm_head.weight = torch.nn.Parameter(self.llm.lm_head.weight.detach().clone())
        params = dict(self.llm.named_parameters())
        for name, w in weights.items():
            if params[name].shape != tuple(w.shape):
                raise ValueError(f"{name}: shape {tuple(w.shape)} does not match the model's {tuple(params[name].shape)}")
            params[name].copy_(torch.as_tensor(np.asarray(w)))

    @torch.no_grad()
    def embed(self, ids: list[int]) -> torch.Tensor:
        table = self.llm.get_input_embeddings().weight
        return table[torch.as_tensor(ids, dtype=torch.long)].float()

    def media_ids(self) -> set[int]:
        return {IMAGE_PLACEHOLDER} if self.cfg.splice == "v15" else set(self.cfg.llm.media_token_ids.values())

    @torch.no_grad()
    def inputs_embeds(self, ids: list[int], items: list[torch.Tensor]) -> torch.Tensor:
        end = self.cfg.llm.end_token_ids if self.cfg.splice == "head" else ()
        return splice(ids, self.embed, items, media_ids=self.media_ids(), end_ids=end)

    @torch.no_grad()
    def logits(self, embeds: torch.Tensor) -> torch.Tensor:
        """[L, D] -> [L, vocab] logits (untrained rows masked to -inf)."""
        out = self.llm(inputs_embeds=embeds[None]).logits[0].float()
        return mask_untrained(out, self.cfg)

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, steps: int) -> list[int]:
        """Greedy decode with the HF KV cache; stops on the checkpoint's stop tokens."""
        out = self.llm(inputs_embeds=embeds[None], use_cache=True)
        past = out.past_key_values
        tokens: list[int] = []
        logits = mask_untrained(out.logits[0, -1].float(), self.cfg)
        for _ in range(steps):
            t = int(torch.argmax(logits))
            tokens.append(t)
            if t in self.cfg.llm.stop_token_ids:
                break
            out = self.llm(inputs_embeds=self.embed([t])[None], past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = mask_untrained(out.logits[0, -1].float(), self.cfg)
        return tokens


def mask_untrained(logits: torch.Tensor, cfg) -> torch.Tensor:
    """Logits at or beyond the trained vocabulary, and of added special tokens, are never sampled."""
    vocab = cfg.llm.vocab_size
    logits = logits[..., : max(vocab, 1)].clone() if logits.shape[-1] > vocab else logits.clone()
    if cfg.llm.extra_masked_ids:
        logits[..., list(cfg.llm.extra_masked_ids)] = float("-inf")
    return logits
