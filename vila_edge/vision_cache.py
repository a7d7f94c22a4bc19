"""Encoder-output cache: the media items one image becomes, kept so the same picture is encoded once.

An OpenAI client resends every image of a conversation with every turn, and a camera pointed at a
static scene delivers the same pixels again and again; the vision tower + projector is the costliest
step before the first token. The cache maps a key to the image's media items ([n_i, D] float32, as
`Pipeline.image_items` returns them):

- the key is a blake2b digest of the DECODED pixels (after `load_image`: RGB bytes, width, height), so
  a JPEG and a PNG of the same pixels hit, and one different pixel misses; plus everything that changes
  the output for the same pixels: the engine's identity (`engine_identity`: the manifest, which holds
  the config's tiling scheme, image size, max tiles and the vision precision, and the vision engine's
  backend) and the call's own switches (single image or one of several: a different tiling);
- the bound is in bytes (the items' `nbytes`), least recently used first out; an entry larger than the
  whole bound is not kept; `max_bytes=0` turns the cache off;
- one lock guards it: the server runs generations on its worker thread while `/metrics` reads the counts
  from the event loop.

Cached arrays are returned as they are (read-only), never copied: a hit costs the hash only.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from vila_edge.errors import VilaEdgeError

DEFAULT_MAX_MB = 256.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class CachedImage:
    items: tuple[np.ndarray, ...]  # the media items, read-only
    tiles: int  # tiles the vision tower encoded for them (reported in Timings on a hit too)

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.items)


def pixel_key(image, context: bytes = b"") -> bytes:
    """Digest of a decoded RGB PIL image's pixels and size, salted with `context` (engine + call switches)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(context)
    h.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    return h.digest()


def engine_identity(manifest, vision_description: dict) -> bytes:
    """What, besides the pixels, decides an image's media items in one engine directory: the manifest
    (config: tiling, image size, max tiles; vision export: precision, files) and the vision backend."""
    data = manifest.to_json() if hasattr(manifest, "to_json") else manifest
    text = json.dumps({"manifest": data, "vision": vision_description}, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=20).digest()


class VisionCache:
    """LRU map key -> CachedImage, bounded in bytes; thread-safe; counts hits, misses and evictions."""

    def __init__(self, max_bytes: int = int(DEFAULT_MAX_MB * MIB)):
        if max_bytes < 0:
            raise VilaEdgeError(f"vision cache size {max_bytes} bytes: must be >= 0 (0 turns the cache off)")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[bytes, CachedImage] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @classmethod
    def of_megabytes(cls, mb: float | None) -> VisionCache:
        """`--vision-cache-mb`: None is the default size, 0 turns the cache off."""
        return cls(int((DEFAULT_MAX_MB if mb is None else mb) * MIB))

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> CachedImage | None:
        """The entry (now the most recently used), or None; counts a hit or a miss."""
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: bytes, items, tiles: int) -> CachedImage | None:
        """Keep `items` under `key` (made read-only), evicting the least recently used entries to stay within
        the bound. None (and nothing evicted) when the cache is off or the entry alone exceeds the bound."""
        entry = CachedImage(tuple(_read_only(x) for x in items), int(tiles))
        size = entry.nbytes
        if not self.enabled or size > self.max_bytes:
            return None
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            while self._entries and self.bytes + size > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= dropped.nbytes
                self.evictions += 1
            self._entries[key] = entry
            self.bytes += size
        return entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions, "entries": len(self._entries),
                    "bytes": self.bytes, "max_bytes": self.max_bytes}


def _read_only(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.flags.writeable:
        x = x.view()
        x.flags.writeable = False
    return x
