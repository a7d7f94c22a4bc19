"""Tiling schemes: how one image becomes tiles, media items and LLM positions (reference doc §2-§3).

One `TilingScheme` per `VisionConfig.tiling` (resize / pad / crop / s2 / dynamic / dynamic_s2), in `SCHEMES`.
A scheme answers every tiling question the rest of the package asks, so no other module branches on
the tiling name:
- `tiles(image)`          preprocessing: the normalized tiles the vision tower encodes (`preprocess_image`);
- `layout(cfg, w, h)`     tiles, media items and LLM positions of a w x h image (`image_layout`);
- `merge_spec(tiles)`     the S2 merge between tower and projector as kernel arguments (`MergeSpec`, consumed
                          by kernels_ref.s2_merge_ref, the CUDA kernel and the PyTorch reference);
- `item_grid(tiles)`      the re-merge after the projector; `merge` / `after_projector` apply both in numpy;
- `tile_batch` / `chunk_batch`  the TensorRT optimization profiles (builder.tensorrt);
- `worst_case` / `smaller_max_tiles`  the largest image the planner must budget for, and its fixes (plan).
Adding a scheme means one subclass here and its entry in `SCHEMES` (plus its name in config.TILINGS
when the checkpoint loader has to recognise it).

The pixel work is bit-exact with VILA's `llava/mm_utils.py`: all resizing goes through Pillow's BICUBIC
filter, exactly as the reference calls it (`image.resize((w, h))` uses BICUBIC by default for RGB
images), so outputs match to the byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image

from vila_edge.config import TILINGS, VilaConfig, VisionConfig
from vila_edge.errors import CheckpointError
from vila_edge.kernels_ref import s2_merge_ref
from vila_edge.ps3_config import max_item_tokens


@dataclass(frozen=True)
class Tiles:
    """Preprocessed tiles of one image: float32 NCHW pixels plus how they were cut."""

    pixels: np.ndarray  # [n_tiles, 3, S, S] float32, normalized
    block_size: tuple[int, int] | None  # (rows, cols) of the last/only grid; None for one plain tile
    n_items: int  # media items these tiles form (dynamic: one per tile; otherwise 1)


@dataclass(frozen=True)
class ImageLayout:
    n_tiles: int  # tiles the vision tower encodes
    n_items: int  # media items (one <image> marker each)
    feature_tokens: int  # projector rows per media item
    end_tokens: int  # embed(tokenizer("\n")) rows appended per media item (HEAD splice)
    text_tokens: int  # positions of the literal prompt-text "\n" per media item (V15 prompt / NVILA-Lite)
    block_size: tuple[int, int] | None  # (rows, cols) of the last tile grid, when tiled

    @property
    def positions(self) -> int:
        """LLM positions this image occupies (features + end tokens + the prompt's "\\n" after it)."""
        return self.n_items * (self.feature_tokens + self.end_tokens + self.text_tokens)


@dataclass(frozen=True)
class MergeSpec:
    """The S2 merge of one image's tile features, in the generic formulation of `vila_edge.kernels_ref`:
    per scale a (rows, cols) grid of h x w feature tiles, area-resampled to the grid of scale
    `output_scale_idx`, concatenated along channels, cut into `chunk`-sized projector inputs."""

    tile_grids: tuple[tuple[int, int], ...]
    h: int
    w: int
    output_scale_idx: int
    chunk: tuple[int, int]
    tile_offsets: tuple[int, ...] | None = None  # first tile of each scale; None: scales stored one after another

    def kwargs(self) -> dict:
        """Keyword arguments of kernels_ref.s2_merge_ref / kernels.s2_merge."""
        kw = dict(tile_grids=list(self.tile_grids), h=self.h, w=self.w, output_scale_idx=self.output_scale_idx,
                  batch=1, chunk=self.chunk)
        if self.tile_offsets is not None:
            kw["tile_offsets"] = list(self.tile_offsets)
        return kw


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


def shortest_side_center_crop(image: Image.Image, size: int) -> Image.Image:
    """CLIPImageProcessor's resize + center_crop: the shorter side to `size` (the longer to
    int(size * long / short), transformers' `get_resize_output_image_size`) with Pillow BICUBIC, then the
    centred size x size square (top = (h - size) // 2, left = (w - size) // 2, transformers' `center_crop`)."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized.crop((left, top, left + size, top + size))


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


def s2_tiles_per_side(scales: tuple[int, ...], split: int) -> list[int]:
    """Static S2: each scale is cut into a ceil(s / split)-square chessboard of split x split tiles."""
    return [-(-s // split) for s in scales]


def s2_tiles(pixels: np.ndarray, scales: tuple[int, ...], split: int) -> np.ndarray:
    """Static S2 (s2wrapper.multiscale_forward): rescale the largest-scale image to every scale with
    torch-style bicubic, cut each into a chessboard of split x split tiles (rows outer, cols inner),
    and stack all scales in ascending order. pixels: [1, 3, S, S] -> [sum n_s^2, 3, split, split]."""
    out = []
    for s, n in zip(scales, s2_tiles_per_side(scales, split), strict=True):
        x = pixels if pixels.shape[-1] == s else torch_bicubic_resize(pixels, s)
        out += [x[:, :, i * split:(i + 1) * split, j * split:(j + 1) * split] for i in range(n) for j in range(n)]
    return np.ascontiguousarray(np.concatenate(out, axis=0))


def normalize(tiles: list[Image.Image], mean, std) -> np.ndarray:
    """uint8 -> float64 * (1/255) -> float32 -> (x - mean) / std, CHW (SiglipImageProcessor)."""
    arr = np.stack([np.asarray(t, dtype=np.uint8) for t in tiles])  # N,H,W,3
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------
# Tiling schemes
# ---------------------------------------------------------------------------------------------


class TilingScheme:
    """One tiling mode of a checkpoint's vision config. The defaults are those of `resize`: one plain
    tile per image, nothing to merge, one media item.

    Methods that count LLM positions take the whole `VilaConfig` (projector, splice, end tokens); the
    rest needs only the vision config the scheme was made from.
    """

    name: ClassVar[str]
    multi_scale: ClassVar[bool] = False  # features of several scales merged between tower and projector
    items_per_tile: ClassVar[bool] = False  # one image (alone in its prompt): one "<image>\n" item per tile

    def __init__(self, vision: VisionConfig):
        self.vision = vision

    # ---- preprocessing ---------------------------------------------------------------------
    def tiles(self, image: Image.Image, *, single: bool = True, max_tiles: int | None = None) -> Tiles:
        """One RGB image -> its tiles. `single` is False when the prompt holds several images."""
        return self._plain_tiles(image)

    def _plain_tiles(self, image: Image.Image) -> Tiles:
        v = self.vision
        return Tiles(normalize([image.resize((v.image_size, v.image_size), Image.BICUBIC)], v.image_mean, v.image_std),
                     None, 1)

    # ---- LLM positions ---------------------------------------------------------------------
    def layout(self, cfg: VilaConfig, width: int, height: int, n_images: int = 1) -> ImageLayout:
        """How one image of this size becomes tiles, media items and LLM positions."""
        return self._plain_layout(cfg, _end_tokens(cfg))

    def worst_case(self, cfg: VilaConfig, max_tiles: int, single_scale: bool) -> ImageLayout:
        """The largest single image the planner's knobs allow. Counts one end token even when the
        tokenizer is not resolved yet (configs from presets)."""
        return self._plain_layout(cfg, _end_tokens(cfg, at_least=1))

    def smaller_max_tiles(self, max_tiles: int) -> range:
        """Lower `max_tiles` settings that shrink the worst case, largest first (the planner's fixes)."""
        return range(0)

    def _plain_layout(self, cfg: VilaConfig, end: int) -> ImageLayout:
        """One plain tile, one media item; V15 prompts write "<image>\\n", the "\\n" is prompt text."""
        text_nl = cfg.llm.newline_tokens if cfg.splice == "v15" else 0
        return ImageLayout(1, 1, cfg.tokens_per_tile, end, text_nl, None)

    # ---- between tower and projector, and after it -----------------------------------------
    def merge_spec(self, tiles: Tiles) -> MergeSpec | None:
        """The S2 merge of these tiles' features (None: the tower's features enter the projector as they are)."""
        return None

    def item_grid(self, tiles: Tiles) -> tuple[int, int] | None:
        """(rows, cols) of projector chunks re-merged row-major over the global grid into one media item;
        None: every chunk is its own media item."""
        return None

    def merge(self, feats: np.ndarray, tiles: Tiles) -> np.ndarray:
        """Tower features of one image [tiles, T, C] -> projector input [chunks, T', C*scales] (numpy)."""
        spec = self.merge_spec(tiles)
        return feats if spec is None else s2_merge_ref(feats, **spec.kwargs())

    def after_projector(self, y: np.ndarray, tiles: Tiles) -> list[np.ndarray]:
        """Projected chunks [chunks, T, D] of one image -> its media items ([n_i, D] each)."""
        grid = self.item_grid(tiles)
        if grid is not None:
            rows, cols = grid
            t = math.isqrt(y.shape[1])
            # merge_chessboard + rearrange: global row-major over the (rows*t) x (cols*t) grid
            return [y.reshape(rows, cols, t, t, -1).transpose(0, 2, 1, 3, 4).reshape(-1, y.shape[-1])]
        if tiles.n_items == y.shape[0]:
            return list(y)
        return [y.reshape(-1, y.shape[-1])]

    # ---- TensorRT optimization profiles (min, opt, max) over the leading axis -------------
    def tile_batch(self, frames: int) -> tuple[int, int, int]:
        """Tiles the tower sees at once for one image, or one video's `frames` frames."""
        return 1, 1, frames

    def chunk_batch(self, frames: int) -> tuple[int, int, int]:
        """Chunks the projector sees at once (after the merge)."""
        return 1, 1, frames


class Resize(TilingScheme):
    """LLaVA `resize`: the image squeezed to one tile."""

    name = "resize"


class Pad(TilingScheme):
    """LLaVA `pad`: paste centred on a square of the mean colour, then resize to one tile."""

    name = "pad"

    def tiles(self, image: Image.Image, *, single: bool = True, max_tiles: int | None = None) -> Tiles:
        fill = tuple(int(m * 255) for m in self.vision.image_mean)
        return self._plain_tiles(expand_to_square(image, fill))  # type: ignore[arg-type]


class Crop(TilingScheme):
    """The tower processor's own default (`image_aspect_ratio` neither resize nor pad, e.g. LLaVA's "square"):
    for CLIP, `CLIPImageProcessor`'s shortest-side resize and centre crop to one tile. (SigLIP's and
    InternViT's processors only resize: the loader gives them `resize` instead.)"""

    name = "crop"

    def tiles(self, image: Image.Image, *, single: bool = True, max_tiles: int | None = None) -> Tiles:
        v = self.vision
        return Tiles(normalize([shortest_side_center_crop(image, v.image_size)], v.image_mean, v.image_std), None, 1)


class StaticS2(TilingScheme):
    """VILA1.5-s2 (s2wrapper): every image is the same chessboards of split x split tiles at each scale,
    merged into one map at scale `s2_output_scale_idx`; one media item."""

    name = "s2"
    multi_scale = True

    def _per_side(self) -> list[int]:
        v = self.vision
        return s2_tiles_per_side(v.s2_scales, v.s2_max_split_size)

    def _n_tiles(self) -> int:
        return sum(n * n for n in self._per_side())

    def tiles(self, image: Image.Image, *, single: bool = True, max_tiles: int | None = None) -> Tiles:
        # SiglipVisionTowerS2: the processor resizes to the LARGEST scale; S2 rescales inside.
        v = self.vision
        big = v.s2_scales[-1]
        full = normalize([image.resize((big, big), Image.BICUBIC)], v.image_mean, v.image_std)
        return Tiles(s2_tiles(full, v.s2_scales, v.s2_max_split_size), None, 1)

    def layout(self, cfg: VilaConfig, width: int, height: int, n_images: int = 1) -> ImageLayout:
        return self._layout(cfg, _end_tokens(cfg))

    def worst_case(self, cfg: VilaConfig, max_tiles: int, single_scale: bool) -> ImageLayout:
        end = _end_tokens(cfg, at_least=1)
        return self._plain_layout(cfg, end) if single_scale else self._layout(cfg, end)

    def _layout(self, cfg: VilaConfig, end: int) -> ImageLayout:
        out_grid = self._per_side()[self.vision.s2_output_scale_idx] * self.vision.grid
        plain = self._plain_layout(cfg, end)
        return ImageLayout(self._n_tiles(), 1, cfg.projector.tokens_out(out_grid), end, plain.text_tokens, None)

    def merge_spec(self, tiles: Tiles) -> MergeSpec:
        v = self.vision
        per_side = self._per_side()
        n_out = per_side[v.s2_output_scale_idx] * v.grid
        return MergeSpec(tuple((n, n) for n in per_side), v.grid, v.grid, v.s2_output_scale_idx, (n_out, n_out))

    def tile_batch(self, frames: int) -> tuple[int, int, int]:
        n = self._n_tiles()
        return 1, n, n  # every image is n tiles; min 1 lets a runtime split larger batches anywhere


class Dynamic(TilingScheme):
    """NVILA-Lite `dynamic` (InternVL): the aspect-ratio grid of tiles plus a thumbnail, each tile its own
    media item followed by the prompt text "\\n". Several images in one prompt: one plain tile each."""

    name = "dynamic"
    items_per_tile = True

    def _grid(self, width: int, height: int, max_tiles: int) -> tuple[int, int]:
        """(rows, cols) of the tile grid."""
        v = self.vision
        cols, rows = closest_aspect_ratio(width, height, v.min_tiles, max_tiles, v.image_size)
        return rows, cols

    @staticmethod
    def _n_tiles(cells: int) -> int:
        return cells + (1 if cells != 1 else 0)  # + the thumbnail when the grid has more than one cell

    def tiles(self, image: Image.Image, *, single: bool = True, max_tiles: int | None = None) -> Tiles:
        if not single:
            return self._plain_tiles(image)
        v = self.vision
        tiles, block = dynamic_tiles(image, v.min_tiles, max_tiles or v.max_tiles, v.image_size)
        return Tiles(normalize(tiles, v.image_mean, v.image_std), block, len(tiles))

    def layout(self, cfg: VilaConfig, width: int, height: int, n_images: int = 1) -> ImageLayout:
        if n_images != 1:
            return self._plain_layout(cfg, _end_tokens(cfg))
        rows, cols = self._grid(width, height, self.vision.max_tiles)
        return self._layout(cfg, rows * cols, _end_tokens(cfg), (rows, cols))

    def worst_case(self, cfg: VilaConfig, max_tiles: int, single_scale: bool) -> ImageLayout:
        end = _end_tokens(cfg, at_least=1)
        return self._plain_layout(cfg, end) if single_scale else self._layout(cfg, max(1, max_tiles), end, None)

    def _layout(self, cfg: VilaConfig, cells: int, end: int, block: tuple[int, int] | None) -> ImageLayout:
        n = self._n_tiles(cells)
        # each tile is its own media item followed by the literal text "\n" of "<image>\n"
        return ImageLayout(n, n, cfg.tokens_per_tile, end, 1, block)

    def smaller_max_tiles(self, max_tiles: int) -> range:
        return range(max_tiles - 1, 0, -1)

    def tile_batch(self, frames: int) -> tuple[int, int, int]:
        n = self._n_tiles(self.vision.max_tiles)
        return 1, n, n

    def chunk_batch(self, frames: int) -> tuple[int, int, int]:
        return self.tile_batch(frames)


class DynamicS2(TilingScheme):
    """NVILA `dynamic_s2`: fixed (s/s0)-square grids for all but the last scale, the aspect-ratio grid
    (at least (s_last/s0)^2 cells) for the last; merged per tile-sized chunk, projected per chunk, then
    re-merged row-major over the global grid into one media item. Several images: one plain tile each,
    its features repeated once per scale."""

    name = "dynamic_s2"
    multi_scale = True

    def _fixed_grids(self) -> list[tuple[int, int]]:
        s0 = self.vision.s2_scales[0]
        return [(s // s0, s // s0) for s in self.vision.s2_scales[:-1]]

    def _least_cells(self) -> int:
        scales = self.vision.s2_scales
        return (scales[-1] // scales[0]) ** 2

    def _n_tiles(self, cells: int) -> int:
        return sum(r * c for r, c in self._fixed_grids()) + cells

    def tiles(self, image: Image.Image, *, single: bool = True, max_tiles: int | None = None) -> Tiles:
        if not single:
            return self._plain_tiles(image)
        v = self.vision
        tiles, block = dynamic_s2_tiles(image, v.s2_scales, max_tiles or v.max_tiles)
        return Tiles(normalize(tiles, v.image_mean, v.image_std), block, 1)

    def layout(self, cfg: VilaConfig, width: int, height: int, n_images: int = 1) -> ImageLayout:
        if n_images != 1:
            return self._plain_layout(cfg, _end_tokens(cfg))
        v = self.vision
        rows, cols = dynamic_s2_block_size(width, height, v.s2_scales, v.max_tiles)
        return self._layout(cfg, rows * cols, _end_tokens(cfg), (rows, cols))

    def worst_case(self, cfg: VilaConfig, max_tiles: int, single_scale: bool) -> ImageLayout:
        end = _end_tokens(cfg, at_least=1)
        if single_scale:
            return self._plain_layout(cfg, end)
        return self._layout(cfg, max(max_tiles, self._least_cells()), end, None)

    def _layout(self, cfg: VilaConfig, cells: int, end: int, block: tuple[int, int] | None) -> ImageLayout:
        # the projector runs per tile-sized chunk, so 2x2 cells never straddle two tiles (§3.3)
        feats = cfg.tokens_per_tile * cells
        return ImageLayout(self._n_tiles(cells), 1, feats, end, 0, block)

    def smaller_max_tiles(self, max_tiles: int) -> range:
        return range(max_tiles - 1, self._least_cells() - 1, -1)

    def merge_spec(self, tiles: Tiles) -> MergeSpec:
        v = self.vision
        g = v.grid
        if tiles.block_size is None:  # one plain tile: its features stand for every scale
            n = len(v.s2_scales)
            return MergeSpec(((1, 1),) * n, g, g, v.s2_output_scale_idx, (g, g), (0,) * n)
        grids = (*self._fixed_grids(), tuple(tiles.block_size))
        return MergeSpec(grids, g, g, v.s2_output_scale_idx, (g, g))

    def item_grid(self, tiles: Tiles) -> tuple[int, int] | None:
        return tiles.block_size

    def tile_batch(self, frames: int) -> tuple[int, int, int]:
        least = self._least_cells()
        mx = self._n_tiles(max(self.vision.max_tiles, least))
        return 1, min(self._n_tiles(least), mx), mx

    def chunk_batch(self, frames: int) -> tuple[int, int, int]:
        least = self._least_cells()
        return 1, least, max(self.vision.max_tiles, least, frames)


SCHEMES: dict[str, type[TilingScheme]] = {s.name: s for s in (Resize, Pad, Crop, StaticS2, Dynamic, DynamicS2)}


class Ps3Image(Resize):
    """PS3 (VILA-HD): one resized image at the largest scale; PS3 itself resizes to its scales. Its projector
    rows depend on the patch selection, so the layout counts the upper bound (`ps3_config.max_item_tokens`)."""

    def _plain_layout(self, cfg: VilaConfig, end: int) -> ImageLayout:
        return ImageLayout(1, 1, max_item_tokens(self.vision.ps3, cfg.projector.downsample), end, 0, None)


def tiling_scheme(vision: VisionConfig) -> TilingScheme:
    """The scheme of a vision config's `tiling`."""
    if vision.ps3 is not None:
        return Ps3Image(vision)
    try:
        return SCHEMES[vision.tiling](vision)
    except KeyError:
        raise CheckpointError(f"tiling {vision.tiling!r} is not one of: {', '.join(TILINGS)}") from None


def _end_tokens(cfg: VilaConfig, at_least: int = 0) -> int:
    """embed(tokenizer("\\n")) rows the HEAD splice appends after every media item."""
    return max(len(cfg.llm.end_token_ids), at_least) if cfg.splice == "head" else 0


def image_layout(cfg: VilaConfig, width: int, height: int, n_images: int = 1) -> ImageLayout:
    """How one image of this size becomes media items and LLM positions (reference doc §2.4, §3.2, §4.2, §5.4)."""
    return tiling_scheme(cfg.vision).layout(cfg, width, height, n_images)


def preprocess_image(image: Image.Image, vision: VisionConfig, *, single: bool = True, max_tiles: int | None = None) -> Tiles:
    """One RGB image -> Tiles for this checkpoint's tiling mode (reference `process_image`).

    `single` is False when the prompt holds several images: the dynamic families then fall back to one
    plain resized tile per image (as upstream `process_images` does).
    """
    return tiling_scheme(vision).tiles(image, single=single, max_tiles=max_tiles)
