"""Turn whatever the user hands us (path, PIL image, OpenCV BGR frame, raw bytes) into an RGB PIL image.

Decoding goes through Pillow so that preprocessing is bit-exact with the reference (which calls
`PIL.Image.open(...).convert("RGB")`); EXIF orientation is honoured because a phone photo that
displays upright must reach the model upright.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vila_edge.errors import MediaError

ImageLike = "str | Path | Image.Image | np.ndarray | bytes"

# Pillow refuses images above ~179 Mpx by default with a warning-as-error; keep that guard.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


def to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK and 16-bit images -> 8-bit RGB, as `convert("RGB")` does upstream."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: Pillow's convert("RGB") clips instead of scaling; scale to 8 bits.
        arr = np.asarray(image, dtype=np.uint32)
        image = Image.fromarray((arr >> 8).astype(np.uint8) if arr.max() > 255 else arr.astype(np.uint8), "L")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def load_image(source, *, name: str | None = None) -> Image.Image:
    """Return an RGB PIL image. Raises MediaError with the file name on anything unreadable."""
    label = name or (str(source) if isinstance(source, (str, Path)) else type(source).__name__)
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source) or source)
    if isinstance(source, np.ndarray):
        return bgr_to_pil(source, label)
    try:
        if isinstance(source, (bytes, bytearray)):
            img = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if not path.is_file():
                raise MediaError(f"{path}: image file not found")
            img = Image.open(path)
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return to_rgb(img)
    except MediaError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"{label}: cannot decode image ({exc.__class__.__name__}: {exc}); use a PNG/JPEG/WebP file") from None


def bgr_to_pil(frame: np.ndarray, label: str = "frame") -> Image.Image:
    """An OpenCV frame (H,W,3 BGR uint8, H,W gray, or H,W,4 BGRA) -> RGB PIL image."""
    if frame.dtype == np.uint16:
        frame = (frame >> 8).astype(np.uint8)
    if frame.dtype != np.uint8:
        raise MediaError(f"{label}: expected a uint8 frame, got dtype {frame.dtype}")
    if frame.ndim == 2:
        return Image.fromarray(frame, "L").convert("RGB")
    if frame.ndim == 3 and frame.shape[2] == 3:
        return Image.fromarray(np.ascontiguousarray(frame[:, :, ::-1]), "RGB")
    if frame.ndim == 3 and frame.shape[2] == 4:
        return Image.fromarray(np.ascontiguousarray(frame[:, :, 2::-1]), "RGB")
    raise MediaError(f"{label}: expected an HxWx3 BGR frame, got shape {frame.shape}")
