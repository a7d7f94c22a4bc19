"""Property-based fuzzing of what users hand us: image bytes, checkpoint configs, manifests (hypothesis).

Invariant everywhere: either a correct result or a VilaEdgeError (one line for the user); never another
exception, a hang or a crash. Example counts are bounded so CI stays fast: 40 per image format (PNG, JPEG,
GIF, WebP: truncated or byte-mutated encodings of random images) and 80 mutations per config file (three of a
dev-layout checkpoint, and an engine directory's manifest.json). The server's request bodies are fuzzed in
tests/test_serve_hostile.py.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from vila_edge.errors import MediaError, VilaEdgeError

IMAGE_EXAMPLES, CONFIG_EXAMPLES = 40, 80
# No shrinking: a failure prints its draws, and shrinking a slow example can take minutes of CI.
_FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
             derandomize=True, database=None, phases=[Phase.explicit, Phase.generate])
FORMATS = ["PNG", "JPEG", "GIF", "WEBP"]


def _encoded(fmt: str, seed: int, w: int, h: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=IMAGE_EXAMPLES, **_FUZZ)
@given(data=st.data())
def test_mutated_image_bytes_decode_or_raise_media_error(fmt, data):
    from vila_edge.media.image import load_image

    raw = bytearray(_encoded(fmt, data.draw(st.integers(0, 9)), data.draw(st.integers(1, 40)),
                             data.draw(st.integers(1, 40))))
    how = data.draw(st.sampled_from(["truncate", "flip", "splice"]))
    if how == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    else:
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    try:
        img = load_image(bytes(raw))
    except MediaError as exc:
        assert "\n" not in str(exc)
        return
    assert img.mode == "RGB" and img.size[0] >= 1 and img.size[1] >= 1


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
                           | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def _mutate(data, cfg: dict) -> dict:
    cfg = json.loads(json.dumps(cfg))
    for _ in range(data.draw(st.integers(1, 3))):
        # walk to a random dict inside the config
        node = cfg
        while True:
            dicts = [k for k, v in node.items() if isinstance(v, dict)]
            if not dicts or not data.draw(st.booleans()):
                break
            node = node[data.draw(st.sampled_from(dicts))]
        if not node:
            continue
        key = data.draw(st.sampled_from(sorted(node)))
        if data.draw(st.booleans()):
            del node[key]
        else:
            node[key] = data.draw(JSON_VALUES)
    return cfg


@pytest.fixture(scope="module")
def fuzz_checkpoint(tmp_path_factory):
    from vila_edge.testing import make_tiny_checkpoint

    return make_tiny_checkpoint("nvila", tmp_path_factory.mktemp("fuzz") / "ck", seed=0)


@pytest.mark.parametrize("rel", ["config.json", "llm/config.json", "vision_tower/config.json"])
@settings(max_examples=CONFIG_EXAMPLES, **_FUZZ)
@given(data=st.data())
def test_mutated_checkpoint_config_loads_or_raises_one_line(fuzz_checkpoint, rel, data):
    from vila_edge.checkpoint import load_checkpoint

    path = fuzz_checkpoint / rel
    original = path.read_text()
    backup = path.with_suffix(".orig")
    shutil.copy(path, backup)
    try:
        path.write_text(json.dumps(_mutate(data, json.loads(original))))
        try:
            load_checkpoint(fuzz_checkpoint)
        except VilaEdgeError as exc:
            assert "\n" not in str(exc).strip()
    finally:
        shutil.move(backup, path)


@pytest.fixture(scope="module")
def fuzz_engine_dir(tmp_path_factory, fuzz_checkpoint):
    from vila_edge.builder.build import BuildOptions, build

    out = tmp_path_factory.mktemp("fuzz-engine") / "lite"
    build(fuzz_checkpoint, out, options=BuildOptions(skip_llm=True), stage="export", progress=False)
    return out


@settings(max_examples=CONFIG_EXAMPLES, **_FUZZ)
@given(data=st.data())
def test_mutated_manifest_reads_or_raises_one_line(fuzz_engine_dir, fuzz_checkpoint, data):
    """Every reader goes through engine_dir.read_manifest / check_engine_dir (the runtime, bench, serve)."""
    from vila_edge.engine_dir import MANIFEST, check_engine_dir, read_manifest

    path = fuzz_engine_dir / MANIFEST
    original = path.read_text()
    try:
        path.write_text(json.dumps(_mutate(data, json.loads(original))))
        for read in (lambda: read_manifest(fuzz_engine_dir), lambda: check_engine_dir(fuzz_engine_dir, fuzz_checkpoint)):
            try:
                read()
            except VilaEdgeError as exc:
                assert "\n" not in str(exc).strip()
    finally:
        path.write_text(original)
