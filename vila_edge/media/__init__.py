"""Media: decoding images / video frames and cutting them into the tiles the vision tower expects."""

from vila_edge.media.image import bgr_to_pil, load_image
from vila_edge.media.tiling import Tiles, dynamic_s2_tiles, dynamic_tiles, preprocess_image

__all__ = ["Tiles", "bgr_to_pil", "dynamic_s2_tiles", "dynamic_tiles", "load_image", "preprocess_image"]
