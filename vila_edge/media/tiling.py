"""Image -> tiles, bit-exact with VILA's `llava/mm_utils.py` (reference doc §2.2-§2.4, §3.2).

All resizing goes through Pillow's BICUBIC filter, exactly as the reference calls it
(`image.resize((w, h))` uses BICUBIC by default for RGB images), so outputs match to the byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from vila_edge.config import VisionConfig


@dataclass(frozen=True)
class Tiles:
    """Preprocessed tiles of one image: float32 NCHW pixels plus how they were cut."""

    pixels: np.ndarray  # [n_tiles, 3, S, S] float32, normalized
    block_size: tuple[int, int] | None  # (rows, cols) of the last/only grid; None for one plain tile
    n_items: int  # media items these tiles form (dynamic: one per tile; otherwise 1)


def aspect_ratio_candidates(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_num <= cols*rows <= max_num, in upstream's exact order.

    Upstream sorts a Python *set* by area; equal-area grids keep the set's iteration order, which is
    deterministic for tuples of small ints (their hashes are not randomised), so the same expression
    reproduces it. The order decides ties in `closest_aspect_ratio`.
    """
    ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(ratios, key=lambda r: r[0] * r[1])


def closest_aspect_ratio(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    """`find_closest_aspect_ratio`: (cols, rows); on equal distance the larger grid wins only if the
    image's area exceeds half of that grid's pixel area."""
    ar = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in aspect_ratio_candidates(min_num, max_num):
        diff = abs(ar - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_s2_block_size(width: int, height: int, scales: tuple[int, ...], max_num: int) -> tuple[int, int]:
    """(rows, cols) of the last scale's grid in dynamic S2."""
    min_num = (scales[-1] // scales[0]) ** 2
    cols, rows = closest_aspect_ratio(width, height, min_num, max_num, scales[0])
    return rows, cols


def crop_grid(image: Image.Image, cols: int, rows: int, size: int) -> list[Image.Image]:
    """Resize to (cols*size, rows*size) with Pillow BICUBIC and cut row-major size x size tiles."""
    resized = image.resize((cols * size, rows * size), Image.BICUBIC)
    return [resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)]


def dynamic_tiles(image: Image.Image, min_num: int, max_num: int, size: int) -> tuple[list[Image.Image], tuple[int, int]]:
    """`dynamic_preprocess` with use_thumbnail: row-major crops, thumbnail last when >1 tile."""
    cols, rows = closest_aspect_ratio(image.width, image.height, min_num, max_num, size)
    tiles = crop_grid(image, cols, rows, size)
    if len(tiles) != 1:
        tiles.append(image.resize((size, size), Image.BICUBIC))
    return tiles, (rows, cols)


def dynamic_s2_tiles(image: Image.Image, scales: tuple[int, ...], max_num: int) -> tuple[list[Image.Image], tuple[int, int]]:
    """`dynamic_s2_preprocess`: fixed square grids for all but the last scale, then an
    aspect-dependent grid; no thumbnail. Returns tiles and block_size (rows, cols)."""
    s0 = scales[0]
    tiles: list[Image.Image] = []
    for scale in scales[:-1]:
        k = scale // s0
        tiles += crop_grid(image, k, k, s0)
    rows, cols = dynamic_s2_block_size(image.width, image.height, scales, max_num)
    tiles += crop_grid(image, cols, rows, s0)
    return tiles, (rows, cols)


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """`expand2square`: paste centred on a square canvas of the mean colour."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution weights for offsets t in [0,1): taps at -1, 0, 1, 2 (torch's a=-0.75)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def torch_bicubic_resize(x: np.ndarray, size: int) -> np.ndarray:
    """`F.interpolate(x, (size, size), mode="bicubic", align_corners=False)` in numpy (float32).

    No antialiasing, border taps clamped: what s2wrapper uses to rescale an image to each S2 scale.
    """
    def axis_matrix(n_in: int, n_out: int) -> np.ndarray:
        scale = n_in / n_out
        src = (np.arange(n_out) + 0.5) * scale - 0.5
        i0 = np.floor(src).astype(np.int64)
        w = _cubic_weights((src - i0).astype(np.float32))
        m = np.zeros((n_out, n_in), dtype=np.float32)
        for k in range(4):
            idx = np.clip(i0 - 1 + k, 0, n_in - 1)
            np.add.at(m, (np.arange(n_out), idx), w[:, k])
        return m

    n, c, h, w = x.shape
    mh, mw = axis_matrix(h, size), axis_matrix(w, size)
    return np.einsum("oh,nchw,pw->ncop", mh, x.astype(np.float32), mw, optimize=True).astype(np.float32)


def s2_tiles(pixels: np.ndarray, scales: tuple[int, ...], split: int) -> np.ndarray:
    """Static S2 (s2wrapper.multiscale_forward): rescale the largest-scale image to every scale with
    torch-style bicubic, cut each into a chessboard of split x split tiles (rows outer, cols inner),
    and stack all scales in ascending order. pixels: [1, 3, S, S] -> [sum n_s^2, 3, split, split]."""
    out = []
    for s in scales:
        x = pixels if pixels.shape[-1] == s else torch_bicubic_resize(pixels, s)
        n = -(-s // split)
        out += [x[:, :, i * split:(i + 1) * split, j * split:(j + 1) * split] for i in range(n) for j in range(n)]
    return np.ascontiguousarray(np.concatenate(out, axis=0))


def normalize(tiles: list[Image.Image], mean, std) -> np.ndarray:
    """uint8 -> float64 * (1/255) -> float32 -> (x - mean) / std, CHW (SiglipImageProcessor)."""
    arr = np.stack([np.asarray(t, dtype=np.uint8) for t in tiles])  # N,H,W,3
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def preprocess_image(image: Image.Image, vision: VisionConfig, *, single: bool = True, max_tiles: int | None = None) -> Tiles:
    """One RGB image -> Tiles for this checkpoint's tiling mode (reference `process_image`).

    `single` is False when the prompt holds several images: the dynamic families then fall back to one
    plain resized tile per image (as upstream `process_images` does).
    """
    size = vision.image_size
    max_num = max_tiles or vision.max_tiles
    if vision.tiling == "dynamic_s2" and single:
        tiles, block = dynamic_s2_tiles(image, vision.s2_scales, max_num)
        return Tiles(normalize(tiles, vision.image_mean, vision.image_std), block, 1)
    if vision.tiling == "dynamic" and single:
        tiles, block = dynamic_tiles(image, vision.min_tiles, max_num, size)
        return Tiles(normalize(tiles, vision.image_mean, vision.image_std), block, len(tiles))
    if vision.tiling == "s2":
        # SiglipVisionTowerS2: the processor resizes to the LARGEST scale; S2 rescales inside.
        big = vision.s2_scales[-1]
        full = normalize([image.resize((big, big), Image.BICUBIC)], vision.image_mean, vision.image_std)
        return Tiles(s2_tiles(full, vision.s2_scales, vision.s2_max_split_size), None, 1)
    if vision.tiling == "pad":
        fill = tuple(int(m * 255) for m in vision.image_mean)
        image = expand_to_square(image, fill)  # type: ignore[arg-type]
    return Tiles(normalize([image.resize((size, size), Image.BICUBIC)], vision.image_mean, vision.image_std), None, 1)
