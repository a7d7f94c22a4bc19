"""The encoder-output cache (vila_edge.vision_cache): the LRU byte bound, the key, and on real ONNX Runtime
engines of the tiny checkpoints: a hit gives the very items and logits a cold encode gives."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from conftest_runtime import runtime_engine  # noqa: F401  (session fixture: tiny engine directories)
from PIL import Image

from vila_edge.errors import VilaEdgeError
from vila_edge.vision_cache import VisionCache, engine_identity, pixel_key


def _image(w=300, h=150, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _items(n_bytes: int, value: float = 0.0) -> list[np.ndarray]:
    return [np.full(n_bytes // 4, value, np.float32)]


# ---- the cache itself -------------------------------------------------------------------------


def test_lru_eviction_keeps_the_byte_bound():
    cache = VisionCache(3000)
    for k in (b"a", b"b", b"c"):
        assert cache.put(k, _items(1000), tiles=1) is not None
    assert cache.bytes == 3000 and len(cache) == 3
    assert cache.get(b"a") is not None  # a is now the most recently used: b is the oldest
    cache.put(b"d", _items(1000), tiles=1)
    assert cache.bytes <= 3000 and cache.evictions == 1
    assert cache.get(b"b") is None
    assert all(cache.get(k) is not None for k in (b"a", b"c", b"d"))
    cache.put(b"e", _items(2000), tiles=1)  # needs two entries' room: the two least recently used go
    assert cache.evictions == 3 and cache.bytes == 3000
    assert cache.get(b"a") is None and cache.get(b"c") is None and cache.get(b"d") is not None
    s = cache.stats()
    assert (s["hits"], s["misses"], s["entries"], s["bytes"], s["max_bytes"]) == (5, 3, 2, 3000, 3000)


def test_an_entry_larger_than_the_bound_is_not_cached():
    cache = VisionCache(3000)
    cache.put(b"a", _items(2000), tiles=1)
    assert cache.put(b"big", _items(4000), tiles=1) is None
    assert len(cache) == 1 and cache.evictions == 0 and cache.bytes == 2000  # nothing evicted for it
    assert cache.get(b"big") is None


def test_replacing_a_key_counts_its_bytes_once():
    cache = VisionCache(3000)
    cache.put(b"a", _items(1000), tiles=1)
    cache.put(b"a", _items(2000), tiles=2)
    assert cache.bytes == 2000 and len(cache) == 1 and cache.get(b"a").tiles == 2


def test_size_zero_turns_the_cache_off_and_negative_is_refused():
    cache = VisionCache(0)
    assert not cache.enabled
    assert cache.put(b"a", _items(4), tiles=1) is None and cache.get(b"a") is None and len(cache) == 0
    assert VisionCache.of_megabytes(None).max_bytes == 256 * 1024 * 1024
    assert VisionCache.of_megabytes(1.5).max_bytes == 3 * 512 * 1024
    with pytest.raises(VilaEdgeError, match="must be >= 0"):
        VisionCache(-1)


def test_threads_sharing_the_cache_keep_its_bound_and_counts():
    import threading

    cache = VisionCache(10_000)
    keys = [bytes([k]) for k in range(40)]

    def work(seed: int):
        rng = np.random.default_rng(seed)
        for _ in range(500):
            k = keys[int(rng.integers(len(keys)))]
            if cache.get(k) is None:
                cache.put(k, _items(int(rng.integers(1, 5)) * 400), tiles=1)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = cache.stats()
    assert s["hits"] + s["misses"] == 4 * 500
    assert 0 < s["bytes"] <= 10_000 and s["bytes"] == sum(e.nbytes for e in cache._entries.values())


def test_cached_items_are_read_only():
    entry = VisionCache(1000).put(b"a", _items(400, 1.0), tiles=1)
    with pytest.raises(ValueError):
        entry.items[0][0] = 2.0


def test_key_is_the_decoded_pixels_plus_the_context():
    img = _image()
    png = io.BytesIO()
    img.save(png, "PNG")
    again = Image.open(io.BytesIO(png.getvalue())).convert("RGB")  # same pixels, decoded from a file
    assert pixel_key(again, b"ctx") == pixel_key(img, b"ctx")
    one_pixel = img.copy()
    r, g, b = one_pixel.getpixel((7, 5))
    one_pixel.putpixel((7, 5), ((r + 1) % 256, g, b))
    assert pixel_key(one_pixel, b"ctx") != pixel_key(img, b"ctx")
    assert pixel_key(img, b"other engine") != pixel_key(img, b"ctx")
    # same bytes, other shape: the size is part of the key
    flat = Image.frombytes("RGB", (150, 300), img.tobytes())
    assert pixel_key(flat, b"ctx") != pixel_key(img, b"ctx")


# ---- in the pipeline (real engines) -------------------------------------------------------------

_PIPES: dict = {}


def _pipe(runtime_engine, family, mb=None):  # noqa: F811
    key = (family, mb)
    if key not in _PIPES:
        import vila_edge

        _PIPES[key] = vila_edge.load(runtime_engine(family), device="cpu", threads=1, vision_cache_mb=mb)
    return _PIPES[key]


@pytest.mark.parametrize("family", ["nvila", "nvila-lite", "vila1.5"])
def test_a_hit_gives_the_items_and_logits_of_a_cold_encode(runtime_engine, family):  # noqa: F811
    from vila_edge.runtime import Timings

    pipe = _pipe(runtime_engine, family)
    pipe.vision_cache.clear()
    cold = _pipe(runtime_engine, family, mb=0)
    img = _image(seed=3)
    before = pipe.vision_cache.stats()
    miss = pipe.image_items(img)
    t = Timings()
    png = io.BytesIO()
    img.save(png, "PNG")
    hit = pipe.image_items(png.getvalue(), timings=t)  # the same pixels, from encoded bytes this time
    after = pipe.vision_cache.stats()
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (1, 1)
    assert t.vision == 0.0 and t.media_items == len(miss) and t.tiles >= len(miss)  # the tower did not run
    assert all(a is b for a, b in zip(hit, miss, strict=True))  # the very arrays the first encode made
    want = cold.image_items(img)
    assert len(want) == len(hit) and all(np.array_equal(a, b) for a, b in zip(hit, want, strict=True))
    assert after["bytes"] == sum(x.nbytes for x in miss)
    # the first answer token's logits: from cached items exactly what a cache-less pipeline computes
    assert np.array_equal(pipe.first_token_logits("Describe the image.", [img]),
                          cold.first_token_logits("Describe the image.", [img]))
    assert pipe.vision_cache.stats()["hits"] == after["hits"] + 1


def test_one_different_pixel_or_another_tiling_misses(runtime_engine):  # noqa: F811
    pipe = _pipe(runtime_engine, "nvila")
    pipe.vision_cache.clear()
    img = _image(seed=4)
    pipe.image_items(img)
    one_pixel = img.copy()
    r, g, b = one_pixel.getpixel((0, 0))
    one_pixel.putpixel((0, 0), ((r + 1) % 256, g, b))
    s0 = pipe.vision_cache.stats()
    pipe.image_items(one_pixel)
    pipe.image_items(img, single=False)  # one of several images: one plain tile, not the dynamic tiling
    s1 = pipe.vision_cache.stats()
    assert (s1["misses"] - s0["misses"], s1["hits"] - s0["hits"], s1["entries"]) == (2, 0, 3)
    assert pipe.image_key(img, single=True) != pipe.image_key(img, single=False)


def test_the_engine_identity_covers_the_preprocessing(runtime_engine):  # noqa: F811
    from vila_edge.engine_dir import read_manifest

    m = read_manifest(runtime_engine("nvila"))
    vision = {"backend": "onnxruntime"}
    base = engine_identity(m, vision)
    assert engine_identity(read_manifest(runtime_engine("nvila")), vision) == base  # stable across loads
    for change in ({"max_tiles": m.config.vision.max_tiles + 1}, {"image_size": m.config.vision.image_size * 2},
                   {"tiling": "s2" if m.config.vision.tiling != "s2" else "dynamic"}):
        other = dataclasses.replace(m, config=dataclasses.replace(
            m.config, vision=dataclasses.replace(m.config.vision, **change)))
        assert engine_identity(other, vision) != base, change
    fp16 = dataclasses.replace(m, vision={**m.vision, "precision": "fp16"})
    assert engine_identity(fp16, vision) != base
    assert engine_identity(m, {"backend": "tensorrt"}) != base
    assert engine_identity(read_manifest(runtime_engine("nvila-lite")), vision) != base


def test_chat_and_generate_share_the_pipeline_cache(runtime_engine):  # noqa: F811
    pipe = _pipe(runtime_engine, "nvila-lite")
    pipe.vision_cache.clear()
    img = _image(seed=5)
    s0 = pipe.vision_cache.stats()
    r1 = pipe.chat().ask("Describe the image.", images=[img], max_new_tokens=3)
    r2 = pipe.generate("What colour is it?", images=[img], max_new_tokens=3)
    s1 = pipe.vision_cache.stats()
    assert (s1["misses"] - s0["misses"], s1["hits"] - s0["hits"]) == (1, 1)
    assert r1.timings.vision > 0 and r2.timings.vision == 0.0
    assert r2.timings.media_items == r1.timings.media_items and r2.timings.tiles == r1.timings.tiles
    assert _pipe(runtime_engine, "nvila-lite", mb=0).vision_cache.enabled is False


def test_live_frames_bypass_the_cache(runtime_engine):  # noqa: F811
    """The live captioner encodes with cache=False: new frames neither hit nor fill the cache (a camera would
    otherwise fill its whole bound), and the items equal a cached encode's."""
    pipe = _pipe(runtime_engine, "nvila")
    pipe.vision_cache.clear()
    img = _image(seed=7)
    s0 = pipe.vision_cache.stats()
    live = pipe.encode_message("What is this?", [img], cache=False)
    s1 = pipe.vision_cache.stats()
    assert (s1["entries"], s1["misses"] - s0["misses"], s1["hits"] - s0["hits"]) == (0, 0, 0)
    cached = pipe.encode_message("What is this?", [img])
    assert pipe.vision_cache.stats()["entries"] == 1
    assert all(np.array_equal(a, b) for a, b in zip(live.items, cached.items, strict=True))
