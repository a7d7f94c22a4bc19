"""`vila-edge info`: what a checkpoint is, how it will be run, and what it costs."""

from __future__ import annotations

import dataclasses

from vila_edge.checkpoint import Checkpoint
from vila_edge.media.tiling import image_layout
from vila_edge.towers import tower_named

INT4_BITS_PER_WEIGHT = 4.25  # 4-bit codes + fp16 scale and zero per group of 128 (targets.md)


def llm_linear_params(ckpt: Checkpoint) -> int:
    m = ckpt.config.llm
    q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    per_layer = m.hidden_size * (q + 2 * kv) + q * m.hidden_size + 3 * m.hidden_size * m.intermediate_size
    return per_layer * m.num_layers


def checkpoint_info(ckpt: Checkpoint, width: int = 1920, height: int = 1080) -> dict:
    cfg = ckpt.config
    counts = ckpt.param_counts()
    if "llm" not in counts:  # pre-quantized LLM: count from the config
        counts["llm"] = llm_linear_params(ckpt) + cfg.llm.vocab_size * cfg.llm.hidden_size * (
            1 if cfg.llm.tie_word_embeddings else 2)
    linear = llm_linear_params(ckpt)
    other_llm = counts["llm"] - linear
    fp16 = {part: 2 * n for part, n in counts.items()}
    int4_llm = int(linear * INT4_BITS_PER_WEIGHT / 8) + 2 * other_llm
    layout = image_layout(cfg, width, height)
    return {
        "checkpoint": str(ckpt.root),
        "layout": ckpt.layout,
        "family": cfg.family,
        "generation": cfg.generation,
        "config": dataclasses.asdict(cfg),
        "tower": tower_named(cfg.vision.tower).label,
        "tokens_per_tile": cfg.vision.tokens_per_tile,
        "image": {"width": width, "height": height, **dataclasses.asdict(layout), "positions": layout.positions},
        "params": counts,
        "params_total": sum(counts.values()),
        "weight_bytes": {
            "fp16": fp16,
            "int4_llm_fp16_vision": {**fp16, "llm": int4_llm},
            "fp16_total": sum(fp16.values()),
            "int4_total": sum(fp16.values()) - fp16["llm"] + int4_llm,
        },
        "kv_bytes_per_token_fp16": cfg.llm.kv_bytes_per_token_fp16,
    }


def ps3_summary(s: dict) -> str:
    """One line on VILA-HD's PS3 tower: scales, what each look-close step selects, the selection mode."""
    from vila_edge.ps3_config import Ps3Settings

    st = Ps3Settings(**{k: tuple(x) if isinstance(x, list) else x for k, x in s.items()})
    steps, total = st.look_close_steps()
    mode = {"after_image": "bottom-up (after_image)", "after_prompt": "top-down (after_prompt)"}[st.look_close_mode]
    return (f"scales {list(st.scales)} (low-res {st.low_res_grid}^2 tokens), selects {'+'.join(map(str, st.select_num_each_scale))}"
            f" patches/step x {steps} step(s) = {total} of {st.max_high_res_tokens} high-res patches, {mode}, "
            f"trunk {st.model_name}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def print_info(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = info["config"]
    con = Console()
    t = Table(title=f"{info['checkpoint']}  ({info['family']}, {info['layout']} layout)", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    v, p, m = c["vision"], c["projector"], c["llm"]
    t.add_row("generation", f"{info['generation']}  (splice {c['splice']}, projector token order {p['token_order']})")
    scales = f", S2 scales {v['s2_scales']} (output idx {v['s2_output_scale_idx']})" if v["s2_scales"] else ""
    tower = tower_named(v["tower"])
    cls = ", class token" if tower.class_token else ""
    extra = f", qk-norm {v['qk_normalization']}, qkv bias {v['qkv_bias']}" if v["tower"] == "intern" else ""
    t.add_row("vision", f"{tower.label} {v['image_size']}px/{v['patch_size']} -> {v['image_size'] // v['patch_size']}^2 grid, "
              f"hidden {v['hidden_size']}, layers used {v['num_layers'] + 1 + v['select_layer'] if v['select_layer'] < 0 else v['select_layer']}"
              f"/{v['num_layers']}, feature {v['select_feature']} ({info['tokens_per_tile']} tokens/tile{cls}){extra}, "
              f"tiling {v['tiling']}{scales}, tiles {v['min_tiles']}..{v['max_tiles']}, "
              f"mean {tuple(round(x, 4) for x in v['image_mean'])} std {tuple(round(x, 4) for x in v['image_std'])}")
    if v.get("ps3"):
        t.add_row("PS3", ps3_summary(v["ps3"]))
    t.add_row("projector", f"{p['type']}  {p['in_features']} -> {p['out_features']}")
    t.add_row("llm", f"{m['architecture']}  hidden {m['hidden_size']}, {m['num_layers']} layers, heads {m['num_heads']}/"
              f"{m['num_kv_heads']} kv, vocab {m['vocab_size']}, max length {m['max_length']}")
    t.add_row("chat", f"{m['chat_format']}, stop ids {m['stop_token_ids']}, media ids {m['media_token_ids'] or 'placeholder -200'}")
    im = info["image"]
    t.add_row(f"image {im['width']}x{im['height']}",
              f"{im['n_tiles']} tile(s), {im['n_items']} item(s) x ({im['feature_tokens']} features + {im['end_tokens']} end"
              f" + {im['text_tokens']} text) = {im['positions']} positions" + (f", block {im['block_size']}" if im["block_size"] else ""))
    params = info["params"]
    t.add_row("parameters", ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in params.items()) + f"  (total {info['params_total'] / 1e6:.2f} M)")
    wb = info["weight_bytes"]
    t.add_row("weights", f"fp16 {human_bytes(wb['fp16_total'])}, int4 LLM + fp16 vision {human_bytes(wb['int4_total'])}")
    t.add_row("KV cache", f"{human_bytes(info['kv_bytes_per_token_fp16'])} per token (fp16)")
    con.print(t)
