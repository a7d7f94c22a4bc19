"""Turn whatever the user hands us (path, PIL image, numpy array, raw bytes) into an RGB PIL image.

Decoding goes through Pillow so that preprocessing is bit-exact with the reference (which calls
`PIL.Image.open(...).convert("RGB")`); EXIF orientation is honoured because a phone photo that
displays upright must reach the model upright.

Channel order of arrays: RGB, as PIL / numpy / matplotlib users expect (`np.asarray(pil_image)`). OpenCV
frames are BGR: pass `channels="BGR"` or convert with `bgr_to_pil` (the camera and video paths do).
One pixel cap (`MAX_PIXELS`) applies to every entry point (CLI, Python API, server), checked from the header
before any pixel is decoded, so a small file that declares a huge image (a "bomb") costs nothing.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vila_edge.errors import ImageTooLarge, MediaError

ImageLike = "str | Path | Image.Image | np.ndarray | bytes"

# 4096 x 4096: far above what any tiling uses (dynamic S2 resizes to at most 12 x 448 px tiles a side), far
# below Pillow's own 179 Mpx guard, which lets a 17 KB PNG take a process to ~1 GiB.
MAX_PIXELS = 4096 * 4096
CHANNEL_ORDERS = ("RGB", "BGR")


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK and 16-bit images -> 8-bit RGB, as `convert("RGB")` does upstream."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: Pillow's convert("RGB") clips instead of scaling; scale to 8 bits.
        arr = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray((arr >> 8).astype(np.uint8) if arr.max() > 255 else arr.astype(np.uint8), "L")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def as_image_list(images, what: str = "images") -> list:
    """The `images=` argument of the Python API as a list: one image (path, PIL image, array, bytes) is
    taken as a list of one, never iterated (a path string would be read per character)."""
    if images is None:
        return []
    if isinstance(images, (str, Path, bytes, bytearray, memoryview, Image.Image, np.ndarray)):
        return [images]
    try:
        items = list(images)
    except TypeError:
        raise MediaError(f"{what}={type(images).__name__}: pass an image or a list of images "
                         "(paths, PIL images, HxWx3 RGB arrays or encoded bytes)") from None
    for k, item in enumerate(items):
        if item is None:
            raise MediaError(f"{what}[{k}] is None: pass a path, a PIL image, an HxWx3 RGB array or encoded bytes")
    return items


def check_size(width: int, height: int, label: str, max_pixels: int = MAX_PIXELS) -> None:
    if width < 1 or height < 1:
        raise MediaError(f"{label}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(f"{label}: image too large ({width}x{height} = {width * height} pixels; at most "
                         f"{max_pixels}); downscale it first")


def load_image(source, *, name: str | None = None, channels: str = "RGB", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Return an RGB PIL image. Raises MediaError with the file name on anything unreadable or too large.

    `channels` is the order of a numpy array's last axis ("RGB", or "BGR" for OpenCV frames)."""
    label = name or (str(source) if isinstance(source, (str, Path)) else type(source).__name__)
    if source is None:
        raise MediaError(f"{label}: no image (None); pass a path, a PIL image, an HxWx3 array or encoded bytes")
    if isinstance(source, Image.Image):
        check_size(*source.size, label, max_pixels)
        return to_rgb(ImageOps.exif_transpose(source) or source)
    if isinstance(source, np.ndarray):
        if channels not in CHANNEL_ORDERS:
            raise MediaError(f"channels={channels!r}: use 'RGB' or 'BGR'")
        if source.ndim >= 2:
            check_size(source.shape[1], source.shape[0], label, max_pixels)
        return array_to_pil(source, label, bgr=channels == "BGR")
    if not isinstance(source, (str, Path, bytes, bytearray, memoryview)):
        raise MediaError(f"{label}: not an image; pass a path, a PIL image, an HxWx3 array or encoded bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap is the lower one
            if isinstance(source, (bytes, bytearray, memoryview)):
                img = Image.open(io.BytesIO(bytes(source)))
            else:
                path = Path(source)
                if not path.is_file():
                    raise MediaError(f"{path}: image file not found")
                img = Image.open(path)
            check_size(*img.size, label, max_pixels)  # from the header: nothing decoded yet
            img.load()
        img = ImageOps.exif_transpose(img) or img
        return to_rgb(img)
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:  # above 2x Pillow's limit it refuses at open, before our check
        raise ImageTooLarge(f"{label}: image too large ({exc}); downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"{label}: cannot decode image ({exc.__class__.__name__}: {exc}); use a PNG/JPEG/WebP file") from None


def bgr_to_pil(frame: np.ndarray, label: str = "frame") -> Image.Image:
    """An OpenCV frame (H,W,3 BGR uint8, H,W gray, or H,W,4 BGRA) -> RGB PIL image."""
    return array_to_pil(frame, label, bgr=True)


def array_to_pil(array: np.ndarray, label: str, *, bgr: bool) -> Image.Image:
    order = "BGR" if bgr else "RGB"
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    if array.dtype != np.uint8:
        raise MediaError(f"{label}: expected a uint8 {order} array, got dtype {array.dtype}")
    if array.ndim == 2:
        return Image.fromarray(array, "L").convert("RGB")
    if array.ndim == 3 and array.shape[2] in (3, 4):
        rgb = array[:, :, 2::-1] if bgr else array[:, :, :3]
        return Image.fromarray(np.ascontiguousarray(rgb), "RGB")
    raise MediaError(f"{label}: expected an HxWx3 {order} array, got shape {array.shape}")
