"""Bench core: a short run on a tiny fixture engine writes a JSON document valid against the schema,
a PNG chart, and forces the requested number of tokens (stop tokens ignored)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest_runtime import runtime_engine  # noqa: E402,F401  (session fixture: tiny engine directories)

from vila_edge import bench  # noqa: E402

SCHEMA = Path(__file__).resolve().parent.parent / "benchmarks" / "schema" / "bench.schema.json"


def test_probes_are_sane():
    bw = bench.measure_bandwidth(threads=2, size_mib=32, repeats=2)
    assert bw["read_gbs"] > 0.1 and bw["copy_gbs"] > 0.1 and bw["threads"] == 2
    mm = bench.measure_matmul(threads=1, n=128, repeats=2)
    assert mm["fp32_tflops"] > 0
    st = bench.stats([3.0, 1.0, 2.0])
    assert (st["median"], st["min"], st["max"]) == (2.0, 1.0, 3.0)


def test_preset_streaming_writer_roundtrip(tmp_path):
    """The streaming safetensors writer produces files safetensors reads back, sharded with an index."""
    from safetensors.numpy import load_file

    tensors = {"a.weight": (4, 6), "norm.weight": (6,), "b.bias": (3,)}
    f = tmp_path / "x.safetensors"
    n = bench_write(f, tensors)
    assert n == 2 * (24 + 6 + 3)
    got = load_file(str(f))
    assert {k: v.shape for k, v in got.items()} == tensors
    a = got["a.weight"].view(np.float16).astype(np.float32)
    assert np.all((np.abs(a) >= 2 ** -7) & (np.abs(a) < 2 ** -5))
    norm = got["norm.weight"].view(np.float16).astype(np.float32)
    assert np.all((norm >= 1) & (norm < 1.125))


def bench_write(path, tensors):
    from vila_edge.presets import write_safetensors_streaming

    return write_safetensors_streaming(path, tensors, "F16", seed=0, part="llm")


def _opts(**kw):
    base = dict(image_sizes=[(64, 48)], prompt_tokens=[8], new_tokens=6, runs=2, warmup=1, warmup_tokens=2,
                threads=1, bandwidth_mib=16, device="orin-nano-8gb")
    base.update(kw)
    return bench.BenchOptions(**base)


@pytest.fixture(scope="module")
def engine(runtime_engine):  # noqa: F811
    return runtime_engine("nvila-lite")


def test_bench_document_validates(engine, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    opts = _opts()
    c = bench.engine_contender(engine, opts)
    raw = bench.run_interleaved([c], opts)
    doc = bench.make_document([c], raw, opts, label="fixture")
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    (res,) = doc["results"]
    assert res["kind"] == "pipeline" and len(res["runs"]) == 2
    # forced length: every measured run generated exactly new_tokens, whatever the random weights chose
    assert all(r["generated_tokens"] == 6 for r in res["runs"])
    assert res["decode_tok_s"]["min"] <= res["decode_tok_s"]["median"] <= res["decode_tok_s"]["max"]
    assert set(res["ttft_split_ms"]) == {"preprocess", "vision", "merge_projector", "prefill"}
    assert res["vision_ms_per_tile"]["median"] > 0 and res["tiles"] >= 1
    assert res["vision_ms_per_tile"]["min"] > 0  # every run encoded the image: the vision cache is off here
    assert res["memory"]["peak_rss_bytes"] > res["memory"]["weight_bytes"] > 0
    assert len(doc["probes"]["bandwidth"]) == 2  # one probe right after each run
    (pred,) = doc["predictions"]
    assert pred["decode_tok_s"]["predicted"] > 0 and pred["device"]["name"] == "orin-nano-8gb"
    jp, pp = bench.write_outputs(doc, tmp_path, "bench_fixture")
    assert json.loads(jp.read_text())["schema"] == "vila-edge-bench/1"
    assert pp.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bench.print_report(doc)


def test_llm_only_decode_and_ratio(engine, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    opts = _opts(llm_only=True, runs=1, image_sizes=[], device=None)
    a = bench.engine_contender(engine, opts, name="ours")
    b = bench.engine_contender(engine, opts, name="again")
    raw = bench.run_interleaved([a, b], opts)
    doc = bench.make_document([a, b], raw, opts, label="fixture-llm")
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    assert [r["kind"] for r in doc["results"]] == ["llm", "llm"]
    assert doc["results"][0]["runs"][0]["generated_tokens"] == 6
    assert doc["ratios"][0]["decode_ratio"] > 0


def test_llm_comparison_without_ours_is_labelled_with_the_peers(engine, tmp_path, monkeypatch):
    """Regression: the loop over --group-size reused the `tag` parameter, so a run of our own builds
    against peers was labelled `nvila-lite-2b-vs-` (peer name lost)."""
    from vila_edge.bench import cli

    # the preset's own checkpoint and int4 build are gigabytes: our build is the fixture engine's LLM
    monkeypatch.setattr(cli, "ensure_preset_checkpoint", lambda *a, **kw: tmp_path)
    monkeypatch.setattr(cli, "ensure_llm_engine", lambda src, out, **kw: engine / "llm")
    a = bench.llm_comparison_args(None, ["--prompt-tokens", "8", "--new-tokens", "2", "--runs", "1", "--threads", "1",
                                         "--bandwidth-mib", "16", "--work-dir", str(tmp_path),
                                         "--out", str(tmp_path / "out")])
    assert a.ours == []

    def peer(opts):  # a peer script's contender, played by the fixture engine in its own child process
        c = bench.engine_contender(engine, opts, name="stand-in peer")
        return bench.Contender(**{**c.__dict__, "kind": "peer"})

    doc = bench.run_llm_comparison(a, [peer], tag="llama_cpp")
    assert doc["label"] == "nvila-lite-2b-vs-llama_cpp"
    assert [r["name"] for r in doc["results"]] == ["vila-edge ORT int4 g128", "stand-in peer"]


def test_peak_rss_is_this_process_only():
    """A contender child started by a process that peaked high (an in-process build) reports its own peak:
    Linux folds the parent's peak into the child's ru_maxrss, not into its VmHWM."""
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("the inherited ru_maxrss is a Linux behaviour")
    big = np.ones(512 << 17)  # 512 MiB, touched: this process's peak is now at least that
    code = ("import resource; from vila_edge.bench import _peak_rss; "
            "print(_peak_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    own, inherited = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True).stdout.split())
    del big
    assert inherited >= 512 << 20  # the defect this guards against
    assert own < 256 << 20, own
