"""Media: decoding images / video frames, and the tiling schemes that cut them into the tiles the vision
tower expects (and say what those tiles become: media items, LLM positions, merges)."""

from vila_edge.media.image import bgr_to_pil, load_image
from vila_edge.media.tiling import (
    ImageLayout,
    Tiles,
    TilingScheme,
    dynamic_s2_tiles,
    dynamic_tiles,
    image_layout,
    preprocess_image,
    tiling_scheme,
)

__all__ = ["ImageLayout", "Tiles", "TilingScheme", "bgr_to_pil", "dynamic_s2_tiles", "dynamic_tiles", "image_layout",
           "load_image", "preprocess_image", "tiling_scheme"]
