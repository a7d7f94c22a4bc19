"""Device planner: memory and speed arithmetic against hand-computed numbers, refusals naming the knob."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vila_edge.errors import VilaEdgeError
from vila_edge.plan import GIB, check_plan_fits, list_profiles, load_profile, plan
from vila_edge.presets import preset_config, preset_tensors

NANO = "orin-nano-8gb"  # 8 GiB x 0.75 usable, 68 GB/s, 10.2 TFLOPS, vision eff 0.45, decode eff 0.7, 1024 MiB runtime


def test_profiles_load():
    names = list_profiles()
    for n in ("agx-orin-64gb", "agx-orin-32gb", "orin-nx-16gb", "orin-nx-8gb", "orin-nano-8gb",
              "orin-nano-8gb-super", "rtx4060-laptop", "rtx4090-laptop", "cpu-laptop"):
        assert n in names
        p = load_profile(n)
        assert p.bandwidth_gbs > 0 and 0 < p.usable_fraction <= 1 and p.memory_gib > 0
    assert load_profile("orin-nano-8gb-super").bandwidth_gbs == 102.0
    assert load_profile("rtx4060-laptop").fp8 and not load_profile("agx-orin-64gb").fp8
    with pytest.raises(VilaEdgeError, match="not a known profile"):
        load_profile("orin-pico")


def test_preset_parameter_counts():
    # reference doc §9: VILA1.5-3b ~3.1 B, NVILA-Lite-2B ~2.0 B, NVILA-8B ~8.1 B; §1.3 projector 18.36 M
    counts = {n: {p: sum(__import__("math").prod(s) for s in t.values()) for p, t in preset_tensors(n).items()}
              for n in ("vila1.5-3b", "nvila-lite-2b", "nvila-8b")}
    assert counts["vila1.5-3b"]["mm_projector"] == 18_364_416
    assert round(sum(counts["vila1.5-3b"].values()) / 1e9, 1) == 3.1
    assert round(sum(counts["nvila-lite-2b"].values()) / 1e9, 1) == 2.0
    assert round(sum(counts["nvila-8b"].values()) / 1e9, 1) == 8.1
    cfg = preset_config("nvila-lite-2b")
    assert (cfg.llm.hidden_size, cfg.llm.intermediate_size, cfg.llm.num_layers, cfg.llm.num_heads,
            cfg.llm.num_kv_heads, cfg.llm.tie_word_embeddings) == (1536, 8960, 28, 12, 2, True)
    assert cfg.family == "nvila-lite" and cfg.projector.type == "mlp_downsample_3x3_fix"
    assert preset_config("nvila-8b").vision.tiling == "dynamic_s2"
    assert preset_config("vila1.5-3b").projector.token_order == "col"


def test_vila15_3b_int4_on_orin_nano_by_hand():
    p = plan("vila1.5-3b", NANO, max_context=4096, llm_precision="int4")
    # LLM linear params: 32 x (2560*(2560+2*2560) + 2560*2560 + 3*2560*6912)
    #                  = 32 x (19,660,800 + 6,553,600 + 53,084,160) = 32 x 79,298,560 = 2,537,553,920
    # int4 at 4.25 bits: 2,537,553,920 * 4.25 / 8 = 1,348,075,520
    assert p.detail["llm_linear"] == 1_348_075_520
    # untied: LM head int4 32000*2560 * 4.25/8 = 43,520,000; embedding stays fp16 32000*2560*2 = 163,840,000
    assert p.detail["llm_lm_head"] == 43_520_000
    assert p.detail["llm_embed"] == 163_840_000
    # RMSNorm weights fp16: (2*32 + 1) * 2560 * 2 = 332,800
    assert p.detail["llm_small"] == 332_800
    assert p.memory["llm_weights"] == 1_348_075_520 + 43_520_000 + 163_840_000 + 332_800  # 1,555,768,320
    # KV: 2 (K,V) x 32 layers x 20 kv heads x 128 head_dim x 2 bytes = 327,680 B/position; x 4096
    assert p.detail["kv_bytes_per_position"] == 327_680
    assert p.memory["kv_cache"] == 327_680 * 4096  # 1,342,177,280
    # SigLIP-384 layers used 26 of 27; per layer 4*1152^2 + 4*1152 + 2*1152*4304 + 4304 + 1152 + 4*1152 = 15,239,504
    # embeddings 1152*3*14*14 + 1152 + 27*27*1152 = 1,518,336; tower = 1,518,336 + 26*15,239,504 = 397,745,440 params
    # projector (doc §4.4) 18,364,416 params; fp16: (397,745,440 + 18,364,416) * 2 = 832,219,712
    assert p.memory["vision_engine"] == 832_219_712
    # activations (GPU: fp16 values, fused attention): vision 1 tile x 729 x (2*1152 + max(3*1152, 4304)) x 2
    #   = 9,634,464; LLM prefill 4096 x (2*2560 + 2560 + 2*2560 + 2*6912) x 2 + 32000*4 = 218,231,808
    assert p.memory["activations"] == 9_634_464 + 218_231_808
    assert p.memory["runtime_overhead"] == 1024 * 2**20
    assert p.memory["total"] == 1_555_768_320 + 832_219_712 + 1_342_177_280 + 227_866_272 + 1_073_741_824
    assert p.memory["usable"] == int(8 * 0.75 * GIB) and p.fits
    # image: resize -> 1 tile, 196 projector rows + 1 literal "\n" (V15 splice)
    assert (p.tiles, p.image_positions) == (1, 197)
    # vision FLOPs/tile: patch 2*729*588*1152 = 987,614,208; layer 8*729*1152^2 + 4*729*1152*4304 + 4*729^2*1152
    #   = 7,739,670,528 + 14,458,134,528 + 2,448,880,128 = 24,646,685,184, x 26 = 640,813,814,784;
    #   projector 196 rows x 2*(4608*2560 + 2560*2560) = 7,193,231,360  => 648,994,660,352
    assert p.predicted["vision_gflops_per_tile"] * 1e9 == pytest.approx(648_994_660_352)
    # 648.99 GFLOP / (10.2 TFLOPS x 0.45) = 141.39 ms
    assert p.predicted["vision_ms_per_tile"] == pytest.approx(648.994660352 / (10.2e3 * 0.45) * 1e3, rel=1e-9)
    # decode @1k: reads linear + LM head + norms + one fp16 embedding row (2560*2) = 1,391,933,440 B
    #   + KV 327,680 * 1024 = 335,544,320 => 1,727,477,760 B; roofline 68e9 / that = 39.36; x 0.7 = 27.55 tok/s
    assert p.detail["llm_decode_read_per_token"] == 1_391_933_440
    assert p.predicted["decode_roofline_tok_s_ctx1k"] == pytest.approx(68e9 / 1_727_477_760)
    assert p.predicted["decode_tok_s_ctx1k"] == pytest.approx(0.7 * 68e9 / 1_727_477_760)
    assert round(p.predicted["decode_tok_s_ctx1k"], 2) == 27.55


def test_nvila_lite_2b_int4_on_orin_nano_by_hand():
    p = plan("nvila-lite-2b", NANO, max_context=4096, max_tiles=12, llm_precision="int4")
    # linear: 28 x (1536*(1536 + 2*256) + 1536*1536 + 3*1536*8960) = 28 x 46,792,704 = 1,310,195,712 params
    #   x 4.25/8 = 696,041,472 B
    assert p.detail["llm_linear"] == 696_041_472
    # tied table stored int4 once: 151648*1536 = 232,931,328 x 4.25/8 = 123,744,768; no separate embedding
    assert (p.detail["llm_lm_head"], p.detail["llm_embed"]) == (123_744_768, 0)
    # fp16 norms (2*28+1)*1536 + Qwen2 q/k/v biases 28*(1536 + 2*256): (87,552 + 57,344) * 2 = 289,792
    assert p.detail["llm_small"] == 289_792
    assert p.memory["llm_weights"] == 820_076_032
    # KV 2 x 28 x 2 x 128 x 2 = 28,672 B/position x 4096 = 117,440,512
    assert p.memory["kv_cache"] == 117_440_512
    # SigLIP-448: embeddings 1152*588 + 1152 + 1024*1152 = 1,858,176; + 26 x 15,239,504 = 398,085,280 params;
    # projector 3x3_fix: 2*10368 + 10368*3456+3456 + 2*3456 + 3456*1536+1536 + 1536*1536+1536 = 43,533,696
    # fp16: (398,085,280 + 43,533,696) * 2 = 883,237,952
    assert p.memory["vision_engine"] == 883_237_952
    # largest image: 12 tiles + thumbnail = 13 items x (121 rows + 1 end "\n" + 1 text "\n") = 1599 positions
    assert (p.tiles, p.image_positions) == (13, 1599)
    # activations: vision 13 x 1024 x (2304 + 4304) x 2 = 175,931,392;
    #   LLM 4096 x (2*1536 + 1536 + 2*256 + 2*8960) x 2 + 151648*4 = 188,743,680 + 606,592 = 189,350,272
    assert p.memory["activations"] == 175_931_392 + 189_350_272
    assert p.memory["total"] == 820_076_032 + 883_237_952 + 117_440_512 + 365_281_664 + 1_073_741_824
    assert p.fits
    # FLOPs/tile: patch 2*1024*588*1152 = 1,387,266,048; layer 10,871,635,968 + 20,308,819,968 + 4,831,838,208
    #   = 36,012,294,144 x 26 = 936,319,647,744; projector 121 x 2*(10368*3456 + 3456*1536 + 1536^2)
    #   = 10,526,883,840 => 948,233,797,632
    assert p.predicted["vision_gflops_per_tile"] * 1e9 == pytest.approx(948_233_797_632)
    # decode @1k: 696,041,472 + 289,792 + 123,744,768 + 1536*2 = 820,079,104 B + 28,672*1024 = 849,439,232 B
    #   68e9 / 849,439,232 = 80.05 tok/s roofline, x 0.7 = 56.04
    assert p.predicted["decode_bytes_per_token_ctx1k"] == 849_439_232
    assert round(p.predicted["decode_tok_s_ctx1k"], 2) == 56.04


def test_fp16_weights_and_precisions():
    p = plan("nvila-lite-2b", NANO, max_context=4096, llm_precision="fp16")
    # 1,310,195,712 * 2 + tied table once 232,931,328 * 2 + 289,792
    assert p.memory["llm_weights"] == 2_620_391_424 + 465_862_656 + 289_792
    with pytest.raises(VilaEdgeError, match="precision"):
        plan("nvila-lite-2b", NANO, llm_precision="int3")


def test_kv_dtype_as_built():
    """CPU int4 builds keep an fp32 cache by default; `build --kv-dtype float16` halves it (28 layers x 2 x 2 KV
    heads x 128 x 2 bytes = 28,672 B/position at fp16 for NVILA-Lite-2B's Qwen2-1.5B)."""
    default = plan("nvila-lite-2b", "cpu-laptop", max_context=4096)
    half = plan("nvila-lite-2b", "cpu-laptop", max_context=4096, kv_dtype="float16")
    assert default.detail["kv_bytes_per_position"] == 2 * 28_672
    assert half.detail["kv_bytes_per_position"] == 28_672 and half.memory["kv_cache"] == 28_672 * 4096
    assert half.memory["total"] == default.memory["total"] - 28_672 * 4096
    assert half.predicted["decode_tok_s_max_context"] > default.predicted["decode_tok_s_max_context"]
    assert plan("nvila-lite-2b", NANO, kv_dtype="float32").detail["kv_bytes_per_position"] == 2 * 28_672
    with pytest.raises(VilaEdgeError, match="kv dtype"):
        plan("nvila-lite-2b", NANO, kv_dtype="int8")


def test_check_plan_fits_names_the_knob():
    assert check_plan_fits("nvila-lite-2b", NANO, 4096, 12).fits
    # fp16 VILA1.5-3b needs ~7.7 GiB on an 8 GB Nano: int4 is the knob
    with pytest.raises(VilaEdgeError, match=r"--llm-precision int4") as e:
        check_plan_fits("vila1.5-3b", NANO, 4096, 1, llm_precision="fp16")
    assert "does not fit orin-nano-8gb" in str(e.value) and "\n" not in str(e.value)
    # a 512-position context cannot hold a 13-item image (1599 positions): fewer tiles
    with pytest.raises(VilaEdgeError, match=r"--max-tiles 2"):
        check_plan_fits("nvila-lite-2b", NANO, 512, 12)
    # CPU: unfused attention scores of an 8192-position prefill (28 x 8192^2 x 4 B) + 17 S2 tiles
    with pytest.raises(VilaEdgeError, match=r"--single-scale .*--max-context \d+"):
        check_plan_fits("nvila-8b", "cpu-laptop", 8192, 12)
    # context alone
    with pytest.raises(VilaEdgeError, match=r"fix: --max-context \d+"):
        check_plan_fits("nvila-lite-2b", "cpu-laptop", 32768, 12, llm_precision="fp16")
    # nothing fits: bigger devices named
    with pytest.raises(VilaEdgeError, match=r"choose a device with more memory .*orin-nx-16gb"):
        check_plan_fits(preset_config("nvila-8b"), NANO, 8192, 12, llm_precision="fp16")


def test_plan_on_a_checkpoint(tiny_checkpoint):
    p = plan(tiny_checkpoint("nvila-lite"), NANO)
    assert p.fits and p.model == "nvila-lite-dev" and p.memory["llm_weights"] > 0


def test_cli_plan_refuses_in_one_line():
    r = subprocess.run([sys.executable, "-m", "vila_edge.cli", "plan", "nvila-8b", "--device", NANO,
                        "--llm-precision", "fp16"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert len(lines) == 1 and "does not fit orin-nano-8gb" in lines[0], lines
    ok = subprocess.run([sys.executable, "-m", "vila_edge.cli", "plan", "nvila-lite-2b", "--device", NANO, "--json"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and '"fits": true' in ok.stdout


def test_build_with_device_refuses_a_plan_that_does_not_fit(tiny_checkpoint, tmp_path):
    """`vila-edge build --device` runs the planner first: a profile too small for the model stops the build
    with one line naming the knob, and nothing is written."""
    import subprocess
    import sys

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "tiny-board.toml").write_text(
        'name = "tiny-board"\ndescription = "a board with 4 MiB"\nkind = "jetson"\nmemory_gib = 0.004\n'
        'usable_fraction = 0.75\nbandwidth_gbs = 10.0\nsm = "sm_87"\nfp16_tflops = 1.0\nfp8 = false\n'
        'runtime_overhead_mib = 1\ndecode_efficiency = 0.7\nvision_efficiency = 0.45\nfused_attention = true\n')
    out = tmp_path / "engine"
    env = {**__import__("os").environ, "VILA_EDGE_PROFILES": str(profiles)}
    r = subprocess.run([sys.executable, "-m", "vila_edge.cli", "build", str(tiny_checkpoint("nvila")), "-o", str(out),
                        "--device", "tiny-board", "--llm-precision", "fp32", "--dry-run"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--" in lines[0] and "Traceback" not in r.stderr
    assert not out.exists()
