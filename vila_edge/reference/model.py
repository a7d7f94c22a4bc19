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
from vila_edge.reference.ps3 import (
    PS3Tower,
    load_ps3_encoder,
    project_low_res,
    project_ps3,
    split_projector_state,
    top_down_prompt_head,
)
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
        proj_state, self.projector_extras = split_projector_state(ckpt.state_dict("mm_projector", torch.float32))
        if self.cfg.vision.tower == "ps3":  # VILA-HD: one image -> low-res + selected high-res tokens (reference.ps3)
            enc = load_ps3_encoder(self.cfg.vision.ps3, ckpt.state_dict("vision_tower", torch.float32))
            self.tower = PS3Tower(enc, self.cfg.vision).eval()
        else:
            self.tower = load_tower(ckpt)
        self.projector = load_projector(self.cfg.projector, proj_state)
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
        if self.cfg.vision.tower == "ps3":
            return [self.ps3_item(tiles)]
        y = self.projector(self.projector_input(tiles))
        grid = self.tiling.item_grid(tiles)
        if grid is not None:
            return [dynamic_s2_tokens(y, grid)]
        if tiles.n_items == y.shape[0]:
            return list(y)
        return [y.reshape(-1, y.shape[-1])]

    @torch.no_grad()
    def ps3_item(self, tiles: Tiles, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """VILA-HD's image features: PS3 (bottom-up, or top-down from `prompt`) then encode_images_ps3."""
        feats, maps, _ = self.tower(torch.as_tensor(np.asarray(tiles.pixels), dtype=torch.float32), prompt)
        pos = self.projector_extras if self.cfg.vision.ps3.high_res_pos_embed else None
        return project_ps3(feats, maps, self.cfg.vision.ps3, self.projector, pos)

    def ps3_prompt_end(self, ids) -> int:
        """get_user_prompt_end_id_pos: the last token before the chat template's user-turn ending (the first
        occurrence), else the last token."""
        tok = self.ckpt.tokenizer
        dummy = "Here is the prompt."
        text = tok.apply_chat_template([{"role": "user", "content": dummy}], add_generation_prompt=True)
        ending = tok.encode(text.split(dummy)[-1].strip())  # as upstream: tokenizer(text), special tokens included
        ids = list(ids)
        for i in range(len(ids) - len(ending) + 1):
            if ids[i:i + len(ending)] == ending:
                return i - 1
        return len(ids) - 1

    @torch.no_grad()
    def ps3_top_down_prompt(self, ids, tiles_list: list[Tiles]) -> torch.Tensor:
        """VILA-HD's after_prompt pre-pass (llava_arch.py::generate, llava_topdown_llama.py forward with
        get_top_down_prompts_only): every image as its low-res tokens only, the LLM up to the end of the user's
        prompt, its last hidden state there (after the final norm) through the projector's top_down_prompt_head."""
        enc, n_blocks = self.tower.enc, self.tower.n_blocks
        pos = self.projector_extras if self.cfg.vision.ps3.high_res_pos_embed else None
        low_items = []
        for tiles in tiles_list:
            outs, _ = enc.low_res(torch.as_tensor(np.asarray(tiles.pixels), dtype=torch.float32), n_blocks)
            low_items.append(project_low_res(outs[-1][0], self.projector, pos))
        embeds = self.inputs_embeds(ids, low_items)
        end = self.ps3_prompt_end(ids)
        n_before = sum(1 for t in list(ids)[:end + 1] if t in self.media_ids())
        at = end + low_items[0].shape[0] * n_before  # upstream: + (low_res_num_feature - 1 + 1) per image before it
        hidden = self.llm.model(inputs_embeds=embeds[None, :at + 1]).last_hidden_state[0, at]
        return top_down_prompt_head(self.projector_extras, hidden.float())

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
