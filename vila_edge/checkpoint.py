"""Find, validate and read a VILA / NVILA checkpoint (reference doc §1).

Layouts:
- "dev": `config.json` + `llm/` + `vision_tower/` + `mm_projector/` (VILA1.5, NVILA, NVILA-Lite);
- "hf": one flat weight set whose names carry `llm.` / `vision_tower.` / `mm_projector.` prefixes,
  with `text_config` / `vision_config` inside the top-level `config.json` and the tokenizer at the top.

Everything is checked before anything is built: every expected tensor present with the right shape,
no unexpected tensors, safetensors files complete. Problems raise CheckpointError naming the file.
Reading weights needs torch (`state_dict`); headers, configs and the tokenizer do not.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

from vila_edge.config import VilaConfig, config_from_dicts
from vila_edge.errors import CheckpointError
from vila_edge.hub import snapshot_repo_name
from vila_edge.prompt import infer_stop_tokens
from vila_edge.ps3_config import expected_ps3_projector_extras
from vila_edge.tokenizer import MEDIA_TOKENS, SENTINEL_TOKEN, Tokenizer
from vila_edge.towers import tower_named

PARTS = ("llm", "vision_tower", "mm_projector")
HF_PREFIX = {"llm": "llm.", "vision_tower": "vision_tower.", "mm_projector": "mm_projector."}

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str  # name inside the file
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # where the tensor's bytes start in the file (after the header)

    @property
    def nbytes(self) -> int:
        n = _DTYPE_BYTES.get(self.dtype, 2)
        for d in self.shape:
            n *= d
        return n


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check the file holds every byte it promises."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header); re-download or re-save it")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header; re-download or re-save it")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    except ValueError:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON); re-download or re-save it") from None
    out = {}
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        out[name] = TensorInfo(path, name, meta["dtype"], tuple(meta["shape"]), 8 + n + meta["data_offsets"][0])
        end = max(end, meta["data_offsets"][1])
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end}); re-download it"
        )
    return out


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None


def _weight_index(folder: Path, prefix: str = "") -> dict[str, TensorInfo]:
    """name (prefix stripped) -> TensorInfo over model.safetensors or a sharded index."""
    index_file = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    if index_file.is_file():
        idx = _read_json(index_file).get("weight_map", {})
        shard_names = sorted(set(idx.values()))
        files = [folder / s for s in shard_names]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard named in {index_file.name} is missing")
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    out = {}
    for f in files:
        for name, info in read_safetensors_header(f).items():
            if name.startswith(prefix):
                out[name[len(prefix):]] = info
    return out


# ---- expected tensors per part ---------------------------------------------------------------


def expected_vision(cfg: VilaConfig, raw: dict | None = None) -> dict[str, tuple[int, ...]]:
    """The tensors of `vision_tower/`, by tower (`vila_edge.towers`)."""
    return tower_named(cfg.vision.tower).expected(cfg.vision)


def expected_projector(cfg: VilaConfig) -> dict[str, tuple[int, ...]]:
    p = cfg.projector
    c, d = p.in_features, p.out_features

    def lin(idx, i, o):
        return {f"layers.{idx}.weight": (o, i), f"layers.{idx}.bias": (o,)}

    def ln(idx, n):
        return {f"layers.{idx}.weight": (n,), f"layers.{idx}.bias": (n,)}

    if cfg.vision.ps3 is not None:
        extras = expected_ps3_projector_extras(cfg.vision.ps3, d)
        return {**extras, **expected_projector(replace(cfg, vision=replace(cfg.vision, ps3=None)))}
    if p.type == "identity":
        return {}
    if p.type == "linear":
        return {"layers.weight": (d, c), "layers.bias": (d,)}
    if p.type == "mlp2x_gelu":
        return {**lin(0, c, d), **lin(2, d, d)}
    if p.type in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        return {**ln(1, 4 * c), **lin(2, 4 * c, d), **lin(4, d, d)}
    if p.type == "mlp_downsample_3x3_fix":
        return {**ln(1, 9 * c), **lin(2, 9 * c, 3 * c), **ln(4, 3 * c), **lin(5, 3 * c, d), **lin(7, d, d)}
    raise CheckpointError(f"projector type {p.type!r} is not supported")


def expected_llm(cfg: VilaConfig, rows: int) -> dict[str, tuple[int, ...]]:
    m = cfg.llm
    h, kv = m.hidden_size, m.num_kv_heads * m.head_dim
    q = m.num_heads * m.head_dim
    exp = {"model.embed_tokens.weight": (rows, h), "model.norm.weight": (h,)}
    if not m.tie_word_embeddings:
        exp["lm_head.weight"] = (rows, h)
    for k in range(m.num_layers):
        pre = f"model.layers.{k}."
        exp[pre + "input_layernorm.weight"] = (h,)
        exp[pre + "post_attention_layernorm.weight"] = (h,)
        exp[pre + "self_attn.q_proj.weight"] = (q, h)
        exp[pre + "self_attn.k_proj.weight"] = (kv, h)
        exp[pre + "self_attn.v_proj.weight"] = (kv, h)
        exp[pre + "self_attn.o_proj.weight"] = (h, q)
        if m.family == "qwen2":
            exp[pre + "self_attn.q_proj.bias"] = (q,)
            exp[pre + "self_attn.k_proj.bias"] = (kv,)
            exp[pre + "self_attn.v_proj.bias"] = (kv,)
        exp[pre + "mlp.gate_proj.weight"] = (m.intermediate_size, h)
        exp[pre + "mlp.up_proj.weight"] = (m.intermediate_size, h)
        exp[pre + "mlp.down_proj.weight"] = (h, m.intermediate_size)
    return exp


def _check_tensors(index: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], where: str,
                   optional_prefixes: tuple[str, ...] = ()) -> None:
    for name, shape in expected.items():
        if name not in index:
            raise CheckpointError(f"{where}: tensor {name!r} is missing")
        if index[name].shape != shape:
            raise CheckpointError(
                f"{index[name].file}: tensor {name!r} has shape {list(index[name].shape)}, expected {list(shape)}"
            )
    for name, info in index.items():
        if name not in expected and not name.startswith(optional_prefixes):
            raise CheckpointError(f"{info.file}: unexpected tensor {name!r} (is this the right checkpoint family?)")


# ---- the checkpoint --------------------------------------------------------------------------


@dataclass
class Checkpoint:
    root: Path
    layout: str  # "dev" | "hf"
    config: VilaConfig
    tokenizer: Tokenizer
    raw: dict  # {"top": ..., "llm": ..., "vision": ..., "projector": ..., "preprocessor": ...}
    index: dict[str, dict[str, TensorInfo]] = field(default_factory=dict)  # part -> name -> info
    llm_quantized: bool = False

    @property
    def name(self) -> str:
        return snapshot_repo_name(self.root) or self.root.name

    def part_dir(self, part: str) -> Path:
        return self.root / part if self.layout == "dev" else self.root

    def tensor_names(self, part: str) -> list[str]:
        return sorted(self.index[part])

    def state_dict(self, part: str, dtype=None) -> dict:
        """torch tensors of one part (names without the -hf prefix). Needs torch."""
        from safetensors import safe_open

        out = {}
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for name, info in self.index[part].items():
            by_file.setdefault(info.file, []).append((name, info.name))
        for file, names in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for short, full in names:
                    t = f.get_tensor(full)
                    out[short] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    def param_counts(self) -> dict[str, int]:
        counts = {}
        for part, idx in self.index.items():
            n = 0
            for info in idx.values():
                k = 1
                for d in info.shape:
                    k *= d
                n += k
            counts[part] = n
        return counts

    def fingerprint(self) -> str:
        """Hash of the resolved config, tensor names/shapes/dtypes and file contents (size + sampled bytes).

        Sampling keeps this fast on multi-GB checkpoints while still catching re-saved or edited weights:
        the header, the first and last MiB and 16 evenly spaced 64 KiB windows of every file are hashed.
        """
        h = hashlib.sha256()
        h.update(json.dumps(self.raw, sort_keys=True, default=str).encode())
        files = set()
        for part in sorted(self.index):
            for name in sorted(self.index[part]):
                info = self.index[part][name]
                h.update(f"{part}/{name}:{info.dtype}:{info.shape}".encode())
                files.add(info.file)
        for f in sorted(files):
            h.update(_file_digest(f).encode())
        tok = self.part_dir("llm") / "tokenizer.json"
        if tok.is_file():
            h.update(_file_digest(tok).encode())
        return h.hexdigest()[:32]


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 8 << 20:
            h.update(f.read())
        else:
            windows = [0, size - (1 << 20)] + [size * k // 17 for k in range(1, 17)]
            for off in windows:
                f.seek(off)
                h.update(f.read(1 << 20 if off in (0, size - (1 << 20)) else 1 << 16))
    return h.hexdigest()


def resolve_tokens(cfg_llm: dict, tokenizer: Tokenizer, chat_format: str, splice: str) -> dict:
    """Tokenizer-derived ids: media tokens (HEAD splice), the end token ids, stop tokens, masks."""
    tokens: dict = {}
    if splice == "head":
        # build_llm_and_tokenizer: the sentinel first, then the media tokens, as special tokens.
        tokenizer.add_special_tokens([SENTINEL_TOKEN, *MEDIA_TOKENS.values()])
        tokens["media_token_ids"] = {k: tokenizer.token_to_id(v) for k, v in MEDIA_TOKENS.items()}
        tokens["end_token_ids"] = tuple(tokenizer.encode("\n", add_special_tokens=True))
    else:
        tokenizer.add_special_tokens([SENTINEL_TOKEN])
        # V15 prompts write "<image>\n": the text after the marker is encoded on its own (prompt.tokenize)
        tokens["newline_tokens"] = len(tokenizer.encode("\n", add_special_tokens=False))
    tokens["stop_token_ids"] = tuple(infer_stop_tokens(chat_format, tokenizer))
    vocab = int(cfg_llm.get("vocab_size", len(tokenizer)))
    extra = [tokenizer.token_to_id(t) for t in (SENTINEL_TOKEN, *MEDIA_TOKENS.values())]
    tokens["extra_masked_ids"] = tuple(sorted(i for i in extra if i is not None and i < vocab))
    tokens["trained_vocab"] = vocab
    if tokenizer.bos_token:
        tokens["bos_token_id"] = tokenizer.token_to_id(tokenizer.bos_token)
    if tokenizer.eos_token:
        tokens["eos_token_id"] = tokenizer.token_to_id(tokenizer.eos_token)
    return tokens


def load_checkpoint(path, *, token_order: str | None = None, splice: str | None = None,
                    chat_format: str | None = None, validate: bool = True) -> Checkpoint:
    """Read and validate a checkpoint. Overrides: projector token order ("row"/"col"), splice layout
    ("v15"/"head"), chat format. Raises CheckpointError naming the file on any problem."""
    try:
        return _load_checkpoint(Path(path), token_order, splice, chat_format, validate)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as exc:
        # The specific checks name the key; a config value of the wrong type or range that none of them
        # anticipated (found by fuzzing: null, a list, a string where a number belongs) ends here, still one line.
        raise CheckpointError(f"{path}: a config value has the wrong type or is out of range ({type(exc).__name__}: "
                              f"{exc}); compare its config.json files with the released checkpoint's") from None


def _load_checkpoint(root: Path, token_order, splice, chat_format, validate) -> Checkpoint:
    if not root.is_dir():
        raise CheckpointError(f"{root}: checkpoint folder not found")
    top_path = root / "config.json"
    top = _read_json(top_path)
    where = str(top_path)

    if (root / "llm").exists() or (root / "vision_tower").exists() or (root / "mm_projector").exists() or "llm_cfg" in top:
        layout = "dev"
        for part in PARTS:
            if not (root / part).is_dir():
                raise CheckpointError(f"{root / part}: sub-folder missing (a dev-layout checkpoint has llm/, vision_tower/, mm_projector/)")
        llm = _read_json(root / "llm" / "config.json")
        vision = _read_json(root / "vision_tower" / "config.json")
        projector = _read_json(root / "mm_projector" / "config.json")
        pre_path = root / "vision_tower" / "preprocessor_config.json"
        preprocessor = _read_json(pre_path) if pre_path.is_file() else None
        tok_dir = root / "llm"
    elif "text_config" in top and "vision_config" in top:
        layout = "hf"
        llm, vision = dict(top["text_config"]), dict(top["vision_config"])
        llm.setdefault("architectures", ["Qwen2ForCausalLM" if llm.get("model_type") == "qwen2" else "LlamaForCausalLM"])
        vision.setdefault("architectures", ["SiglipVisionModel"])
        projector = {"mm_projector_type": top.get("mm_projector_type")}
        pre_path = root / "preprocessor_config.json"
        preprocessor = _read_json(pre_path) if pre_path.is_file() else None
        tok_dir = root
    else:
        raise CheckpointError(
            f"{root}: not a VILA checkpoint (expected llm/, vision_tower/, mm_projector/ sub-folders or a flat -hf config)"
        )
    if preprocessor and "size" in preprocessor:
        size = preprocessor["size"]
        side = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
        if top.get("s2") or top.get("dynamic_s2"):
            pass  # the processor size is rewritten by the S2 towers (doc §2.3); the tower config rules
        elif side is not None and int(side) != int(vision.get("image_size", side)):
            raise CheckpointError(
                f"{pre_path}: size {side} contradicts the vision tower image_size {vision.get('image_size')}"
            )

    tokenizer = Tokenizer.from_dir(tok_dir)
    folder_name = snapshot_repo_name(root) or root.name  # a hub cache snapshot is named after a commit
    name = top.get("_name_or_path") or folder_name
    base = config_from_dicts(top=top, llm=llm, vision=vision, projector=projector, preprocessor=preprocessor,
                             name=str(name) + " " + folder_name, has_chat_template=bool(tokenizer.chat_template),
                             where=where, chat_format=chat_format)
    base = base.with_overrides(token_order=token_order, splice=splice)
    tokens = resolve_tokens(llm, tokenizer, base.llm.chat_format, base.splice)
    cfg = config_from_dicts(top=top, llm=llm, vision=vision, projector=projector, preprocessor=preprocessor,
                            name=str(name) + " " + folder_name, has_chat_template=bool(tokenizer.chat_template),
                            where=where, tokens=tokens, chat_format=base.llm.chat_format)
    cfg = cfg.with_overrides(token_order=base.projector.token_order, splice=base.splice)

    raw = {"top": top, "llm": llm, "vision": vision, "projector": projector, "preprocessor": preprocessor,
           "overrides": {"token_order": token_order, "splice": splice, "chat_format": chat_format}}
    ckpt = Checkpoint(root=root, layout=layout, config=cfg, tokenizer=tokenizer, raw=raw)
    ckpt.llm_quantized = "quantization_config" in llm or any((tok_dir).glob("*awq*.pt"))
    if layout == "dev":
        ckpt.index["vision_tower"] = _weight_index(root / "vision_tower")
        ckpt.index["mm_projector"] = _weight_index(root / "mm_projector") if expected_projector(cfg) else {}
        if not ckpt.llm_quantized:
            ckpt.index["llm"] = _weight_index(root / "llm")
    else:
        for part in PARTS:
            ckpt.index[part] = _weight_index(root, HF_PREFIX[part])
    if validate:
        _check_tensors(ckpt.index["vision_tower"], expected_vision(cfg, vision), str(ckpt.part_dir("vision_tower")),
                       optional_prefixes=tower_named(cfg.vision.tower).optional_prefixes)
        _check_tensors(ckpt.index["mm_projector"], expected_projector(cfg), str(ckpt.part_dir("mm_projector")),
                       optional_prefixes=("top_down_prompt_head.",))  # PS3 after_prompt: VILA's LLM-side prompt head
        if "llm" in ckpt.index:
            emb = ckpt.index["llm"].get("model.embed_tokens.weight")
            if emb is None:
                raise CheckpointError(f"{ckpt.part_dir('llm')}: tensor 'model.embed_tokens.weight' is missing")
            rows = emb.shape[0]
            if rows < cfg.llm.vocab_size:
                raise CheckpointError(f"{emb.file}: embed_tokens has {rows} rows but vocab_size is {cfg.llm.vocab_size}")
            _check_tensors(ckpt.index["llm"], expected_llm(cfg, rows), str(ckpt.part_dir("llm")),
                           optional_prefixes=("model.rotary_emb.",))
    return ckpt
