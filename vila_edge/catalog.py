"""Known released checkpoints (HF org `Efficient-Large-Model`) and what each needs: `vila-edge models`.

Each entry states the facts that change outputs and that no config key states, taken from upstream
(reference doc §4.3, §5.1, §9; NVlabs/VILA V15 and HEAD), independently of vila_edge's own detection:
- family and tiling, the projector token order (VILA1.5: column-major, NVILA: row-major), the splice
  layout (VILA1.5: `-200` placeholder, NVILA: HEAD), the chat format (llava/conversation.py's
  name table; NVILA uses the tokenizer's chat template);
- the geometry (layer sizes) the planner needs, so `vila-edge models` / `plan` can answer before
  anything is downloaded.
`tests/test_catalog.py` runs the loader's heuristic on every entry and fails on any disagreement; a hub id
that is in this table also passes its token order, splice and chat format to the loader as overrides.

Geometry sources: VILA1.5-3b, VILA1.5-40b, NVILA-8B and NVILA-Lite-2B are `vila_edge.presets` (doc §1.3, §9). The
others are the base LLM's published config on the same vision tower and projector: Llama-3-8B and
Llama-2-13B (Vicuna-13B-v1.5) for VILA1.5-8B/13B, Qwen2.5-14B for NVILA-15B, Qwen2.5-7B for
NVILA-Lite-8B; VILA1.5-3b-s2 is VILA1.5-3b with S2 scales 384,768 (doc §11.A). Their exact
`config.json` values (vocab rows, max length) are [UNVERIFIED] against the real files.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

from vila_edge.hub import NEEDED_FILES
from vila_edge.presets import PRESETS, Preset

ORG = "Efficient-Large-Model"


def _variant(base: str, name: str, description: str, *, top=None, llm=None, tokenizer=None) -> Preset:
    p = PRESETS[base]
    return replace(p, name=name, checkpoint_name=name, description=description,
                   top={**p.top, "_name_or_path": name, **(top or {})}, llm={**p.llm, **(llm or {})},
                   tokenizer=tokenizer or p.tokenizer)


_LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0,
              "bos_token_id": 128000, "eos_token_id": 128001, "model_max_length": 8192,
              "tokenizer_model_max_length": 8192}
_LLAMA2_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
               "num_key_value_heads": 40}
_QWEN25_14B = {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 48, "num_attention_heads": 40,
               "num_key_value_heads": 8, "rms_norm_eps": 1e-5}
_QWEN25_7B = {k: PRESETS["nvila-8b"].llm[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                         "num_attention_heads", "num_key_value_heads",
                                                         "tie_word_embeddings", "model_max_length")}

GEOMETRY: dict[str, Preset] = {
    "vila1.5-3b": PRESETS["vila1.5-3b"],
    "vila1.5-3b-s2": _variant("vila1.5-3b", "VILA1.5-3b-s2", "VILA1.5-3b with static S2 384,768 (doc §11.A)",
                              top={"s2": True, "s2_scales": "384,768", "s2_max_split_size": 384,
                                   "mm_hidden_size": 2304}),
    "vila1.5-8b": _variant("vila1.5-3b", "Llama-3-VILA1.5-8B", "Llama-3-8B + SigLIP-384 + mlp_downsample",
                           top={"hidden_size": 4096}, llm=_LLAMA3_8B),
    "vila1.5-13b": _variant("vila1.5-3b", "VILA1.5-13b", "Llama-2-13B (Vicuna) + SigLIP-384 + mlp_downsample",
                            top={"hidden_size": 5120}, llm=_LLAMA2_13B),
    "vila1.5-40b": PRESETS["vila1.5-40b"],
    "nvila-8b": PRESETS["nvila-8b"],
    "nvila-15b": _variant("nvila-8b", "NVILA-15B", "Qwen2.5-14B + SigLIP-448, dynamic S2 448/896/1344",
                          top={"hidden_size": 5120}, llm=_QWEN25_14B),
    "nvila-lite-2b": PRESETS["nvila-lite-2b"],
    "nvila-lite-8b": _variant("nvila-lite-2b", "NVILA-Lite-8B", "Qwen2.5-7B + SigLIP-448 + mlp_downsample_3x3_fix",
                              top={"hidden_size": 3584}, llm=_QWEN25_7B),
}


@dataclass(frozen=True)
class KnownCheckpoint:
    repo: str  # hub id
    geometry: str  # key of GEOMETRY
    family: str  # vila_edge.config.FAMILIES
    token_order: str  # "col" (VILA1.5 training code) | "row" (NVILA)
    splice: str  # "v15" | "head"
    chat_format: str  # vila_edge.config.CHAT_FORMATS
    layout: str = "dev"  # "dev": config.json + llm/ vision_tower/ mm_projector/; "hf": one flat weight set
    llm_weights: str = "bf16"  # "bf16" | "awq" (TinyChat w4-g128 v2 .pt in llm/) | "awq-only" (no checkpoint)
    loadable: bool = True  # False: the repo is not a checkpoint vila-edge can load (see notes)
    notes: str = ""
    files: tuple[str, ...] = NEEDED_FILES  # what to download

    @property
    def name(self) -> str:
        return self.repo.split("/", 1)[1]

    @property
    def preset(self) -> Preset:
        return GEOMETRY[self.geometry]


def _vila15(name: str, geometry: str, family: str, chat: str, **kw) -> KnownCheckpoint:
    return KnownCheckpoint(f"{ORG}/{name}", geometry, family, "col", "v15", chat, **kw)


def _nvila(name: str, geometry: str, family: str, **kw) -> KnownCheckpoint:
    return KnownCheckpoint(f"{ORG}/{name}", geometry, family, "row", "head", "auto", **kw)


_AWQ = "TinyChat W4A16 g128 LLM (llm/*-awq-v2.pt), read as is; vision tower fp16"
_HF = "flat transformers layout; its config keys are [UNVERIFIED] against the real file"

KNOWN: tuple[KnownCheckpoint, ...] = (
    _vila15("VILA1.5-3b", "vila1.5-3b", "vila1.5", "vicuna_v1"),
    _vila15("VILA1.5-3b-AWQ", "vila1.5-3b", "vila1.5", "vicuna_v1", llm_weights="awq", notes=_AWQ),
    _vila15("VILA1.5-3b-s2", "vila1.5-3b-s2", "vila1.5-s2", "vicuna_v1"),
    _vila15("VILA1.5-3b-s2-AWQ", "vila1.5-3b-s2", "vila1.5-s2", "vicuna_v1", llm_weights="awq", notes=_AWQ),
    _vila15("Llama-3-VILA1.5-8B", "vila1.5-8b", "vila1.5", "llama_3"),
    _vila15("Llama-3-VILA1.5-8B-Fix", "vila1.5-8b", "vila1.5", "llama_3", notes="the re-released 8B (V15 README)"),
    _vila15("Llama-3-VILA1.5-8B-Fix-AWQ", "vila1.5-8b", "vila1.5", "llama_3", llm_weights="awq", notes=_AWQ),
    _vila15("VILA1.5-13b", "vila1.5-13b", "vila1.5", "vicuna_v1"),
    _vila15("VILA1.5-13b-AWQ", "vila1.5-13b", "vila1.5", "vicuna_v1", llm_weights="awq", notes=_AWQ),
    _vila15("VILA1.5-40b", "vila1.5-40b", "vila1.5", "hermes-2", notes="InternViT-6B tower (fp16 ~11 GB)"),
    _vila15("VILA1.5-40b-AWQ", "vila1.5-40b", "vila1.5", "hermes-2", llm_weights="awq", notes=_AWQ),
    _nvila("NVILA-8B", "nvila-8b", "nvila"),
    _nvila("NVILA-8B-hf", "nvila-8b", "nvila", layout="hf", notes=_HF),
    _nvila("NVILA-15B", "nvila-15b", "nvila"),
    _nvila("NVILA-15B-hf", "nvila-15b", "nvila", layout="hf", notes=_HF),
    _nvila("NVILA-Lite-2B", "nvila-lite-2b", "nvila-lite"),
    _nvila("NVILA-Lite-2B-hf-preview", "nvila-lite-2b", "nvila-lite",
           notes="remote-code layout (llm/ vision_tower/ mm_projector/ + modeling_vila.py, not downloaded)"),
    _nvila("NVILA-Lite-2B-hf", "nvila-lite-2b", "nvila-lite", layout="hf", notes=_HF),
    _nvila("NVILA-Lite-8B", "nvila-lite-8b", "nvila-lite"),
    _nvila("NVILA-AWQ", "nvila-8b", "nvila", llm_weights="awq-only", loadable=False,
           notes="not a checkpoint: TinyChat <MODEL>-w4-g128-awq-v2.pt LLM files and vision SmoothQuant scales for "
                 "several NVILA models; pass the base model's id (e.g. Efficient-Large-Model/NVILA-8B), which "
                 "vila-edge quantizes with AWQ itself, or copy the matching *-awq-v2.pt into that checkpoint's "
                 "llm/ folder [untested with the real file]"),
)


def find_known(repo: str) -> KnownCheckpoint | None:
    """The table entry of a hub id (case-insensitive, as the hub resolves names), or None."""
    low = repo.lower()
    return next((k for k in KNOWN if k.repo.lower() == low), None)


# ---- the loader's heuristic against the table ------------------------------------------------


def loader_view(k: KnownCheckpoint, top_changes: dict | None = None):
    """The VilaConfig vila_edge's loader derives from this entry's config files when they come from the hub
    cache: the name it sees is the config's `_name_or_path` (here a training path that says nothing) plus
    the repository name; a flat -hf config carries the projector type at the top (no projector config)."""
    from pathlib import Path

    from vila_edge.config import config_from_dicts
    from vila_edge.hub import snapshot_repo_name

    p = k.preset
    top = {**p.top, "_name_or_path": "/checkpoints/sft", **(top_changes or {})}
    projector = p.projector if k.layout == "dev" else {"mm_projector_type": p.projector["mm_projector_type"]}
    snapshot = Path("hub") / ("models--" + k.repo.replace("/", "--")) / "snapshots" / ("0" * 40)
    return config_from_dicts(top=top, llm=p.llm, vision=p.vision, projector=projector, preprocessor=p.preprocessor,
                             name=f"{top['_name_or_path']} {snapshot_repo_name(snapshot)}",
                             has_chat_template=p.tokenizer == "qwen2", where=f"known checkpoint {k.repo}")


def disagreements(k: KnownCheckpoint, top_changes: dict | None = None) -> list[str]:
    """Where the loader's heuristic and the table differ (empty: they agree)."""
    cfg = loader_view(k, top_changes)
    seen = {"family": cfg.family, "token_order": cfg.projector.token_order, "splice": cfg.splice,
            "chat_format": cfg.llm.chat_format}
    return [f"{k.repo}: {key} table={getattr(k, key)!r} loader={val!r}" for key, val in seen.items()
            if getattr(k, key) != val]


# ---- planner verdicts ------------------------------------------------------------------------


@cache
def int4_bytes(geometry: str) -> int:
    """Bytes of an int4 build: int4 LLM (as the planner counts it) + fp16 vision tower and projector."""
    from vila_edge.plan import llm_weight_bytes, vision_params

    cfg = GEOMETRY[geometry].config()
    vp = vision_params(cfg)
    return llm_weight_bytes(cfg, "int4")["total"] + 2 * (vp["tower"] + vp["projector"])


@cache
def verdict(geometry: str, device: str) -> tuple[str, str]:
    """("fits" | "knobs" | "no", detail) for the int4 build at the model's own max context and tiles."""
    from vila_edge.plan import GIB, plan

    p = plan(GEOMETRY[geometry].config(), device)
    if p.fits:
        return "fits", f"{p.memory['total'] / GIB:.1f} of {p.memory['usable'] / GIB:.1f} GiB"
    if p.fixes:
        return "knobs", " or ".join(p.fixes)
    return "no", "; ".join(p.problems)


def _verdict_dict(geometry: str, device: str) -> dict:
    v, detail = verdict(geometry, device)
    return {"verdict": v, "detail": detail}


def rows(devices: list[str] | None = None) -> list[dict]:
    """One dict per known checkpoint: the table's facts + int4 size + a planner verdict per device profile."""
    from vila_edge.plan import list_profiles

    devices = devices or list_profiles()
    out = []
    for k in KNOWN:
        cfg = k.preset.config()
        out.append({"id": k.repo, "family": k.family, "tiling": cfg.vision.tiling, "token_order": k.token_order,
                    "splice": k.splice, "chat_format": k.chat_format, "layout": k.layout,
                    "llm_weights": k.llm_weights, "loadable": k.loadable, "int4_gib": int4_bytes(k.geometry) / 2**30,
                    "devices": {d: _verdict_dict(k.geometry, d) for d in devices},
                    "notes": k.notes})
    return out


_MARK = {"fits": "[green]yes[/green]", "knobs": "[yellow]knob[/yellow]", "no": "[red]no[/red]"}


def print_models(table: list[dict], console=None) -> None:
    """The `vila-edge models` tables: the facts, then the planner's verdict per device profile (with one
    device: the verdict's detail, i.e. the knob to turn, in the first table)."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    devices = list(table[0]["devices"]) if table else []
    one = devices[0] if len(devices) == 1 else None
    facts = Table(title=f"Known checkpoints (huggingface.co/{ORG}/...)")
    for col in ("hub id", "family", "order", "splice", "chat", "layout", "int4 GiB"):
        facts.add_column(col, justify="right" if col == "int4 GiB" else "left", overflow="fold")
    if one:
        facts.add_column(f"{one}: fits?", overflow="fold")
    for r in table:
        cells = [r["id"].split("/", 1)[1], r["family"], r["token_order"], r["splice"], r["chat_format"],
                 r["layout"] + {"awq": "+awq", "awq-only": " (awq only)"}.get(r["llm_weights"], ""),
                 f"{r['int4_gib']:.1f}"]
        if one:
            v = r["devices"][one]
            cells.append("-" if not r["loadable"] else
                         _MARK[v["verdict"]] + ("" if v["verdict"] == "fits" else f": {v['detail']}"))
        facts.add_row(*cells)
    con.print(facts)
    if not one:
        grid = Table(title="Planner verdict, int4 LLM at the model's max context and tiles (knob: fits after "
                           "lowering --max-context / --max-tiles; `vila-edge models -d NAME` says which)")
        grid.add_column("hub id", overflow="fold")
        for d in devices:
            grid.add_column(d, overflow="fold")
        for r in table:
            if r["loadable"]:
                grid.add_row(r["id"].split("/", 1)[1], *[_MARK[r["devices"][d]["verdict"]] for d in devices])
        con.print(grid)
    for r in table:
        if r["notes"]:
            con.print(f"[dim]{r['id'].split('/', 1)[1]}: {r['notes']}[/dim]")
