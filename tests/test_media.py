"""Preprocessing is bit-exact with Pillow as the reference uses it; every input kind is accepted."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vila_edge.config import VisionConfig
from vila_edge.errors import MediaError
from vila_edge.media import bgr_to_pil, dynamic_s2_tiles, dynamic_tiles, load_image, preprocess_image
from vila_edge.media.tiling import closest_aspect_ratio, s2_tiles, torch_bicubic_resize


def vision(tiling="resize", size=56, **kw):
    return VisionConfig(tower="siglip", image_size=size, patch_size=14, hidden_size=8, num_layers=2, num_heads=2,
                        intermediate_size=16, layer_norm_eps=1e-6, select_layer=-2, select_feature="cls_patch",
                        tiling=tiling, **kw)


def noise_image(w, h, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def expected_pixels(img):
    """SiglipImageProcessor: uint8 -> float64 * (1/255) -> float32 -> (x - 0.5) / 0.5, CHW."""
    x = (np.asarray(img).astype(np.float64) * (1 / 255)).astype(np.float32)
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)


def test_resize_equals_pillow_exactly():
    img = noise_image(123, 77)
    tiles = preprocess_image(img, vision("resize", 56))
    assert tiles.pixels.shape == (1, 3, 56, 56) and tiles.n_items == 1
    np.testing.assert_array_equal(tiles.pixels[0], expected_pixels(img.resize((56, 56), Image.BICUBIC)))


def test_pad_expands_to_square_with_mean_colour():
    img = noise_image(100, 40)
    tiles = preprocess_image(img, vision("pad", 56))
    canvas = Image.new("RGB", (100, 100), (127, 127, 127))
    canvas.paste(img, (0, 30))
    np.testing.assert_array_equal(tiles.pixels[0], expected_pixels(canvas.resize((56, 56), Image.BICUBIC)))


def test_dynamic_tiles_row_major_with_thumbnail_last():
    img = noise_image(300, 120)
    tiles, (rows, cols) = dynamic_tiles(img, 1, 12, 56)
    assert (rows, cols) == (1, 2) or rows * cols > 1
    resized = img.resize((56 * cols, 56 * rows), Image.BICUBIC)
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        assert np.array_equal(np.asarray(tiles[k]), np.asarray(resized.crop((c * 56, r * 56, c * 56 + 56, r * 56 + 56))))
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(img.resize((56, 56), Image.BICUBIC)))
    t = preprocess_image(img, vision("dynamic", 56))
    assert t.pixels.shape[0] == rows * cols + 1 and t.n_items == rows * cols + 1


def test_single_tile_has_no_thumbnail():
    tiles, block = dynamic_tiles(noise_image(50, 50), 1, 12, 56)
    assert len(tiles) == 1 and block == (1, 1)


def test_aspect_ratio_tie_break_by_area():
    # (2,1) and (4,2) have the same ratio; the larger grid only wins when the image is big enough
    assert closest_aspect_ratio(1000, 500, 1, 12, 448) == (2, 1)
    assert closest_aspect_ratio(2000, 1000, 1, 12, 448) == (4, 2)


def test_dynamic_s2_tiles_1920x1080():
    img = noise_image(1920, 1080)
    tiles, block = dynamic_s2_tiles(img, (448, 896, 1344), 12)
    assert block == (3, 4) and len(tiles) == 17
    assert np.array_equal(np.asarray(tiles[0]), np.asarray(img.resize((448, 448), Image.BICUBIC)))
    big = img.resize((1792, 1344), Image.BICUBIC)
    assert np.array_equal(np.asarray(tiles[5 + 4 + 2]), np.asarray(big.crop((448 * 2, 448, 448 * 3, 896))))


def test_torch_bicubic_matches_interpolate():
    x = np.random.RandomState(1).randn(1, 3, 40, 40).astype(np.float32)
    for size in (20, 13, 80):
        ours = torch_bicubic_resize(x, size)
        ref = F.interpolate(torch.from_numpy(x), size=(size, size), mode="bicubic", align_corners=False).numpy()
        np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_static_s2_tiles_are_chessboard_of_each_scale():
    x = np.random.RandomState(2).randn(1, 3, 56, 56).astype(np.float32)
    out = s2_tiles(x, (28, 56), 28)
    assert out.shape == (5, 3, 28, 28)
    ref_small = F.interpolate(torch.from_numpy(x), size=(28, 28), mode="bicubic", align_corners=False).numpy()
    np.testing.assert_allclose(out[0], ref_small[0], atol=2e-5)
    np.testing.assert_array_equal(out[1 + 1], x[0, :, :28, 28:])  # tile (row 0, col 1) of the 56 scale


def test_exif_orientation_is_honoured(tmp_path):
    img = noise_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif, quality=95)
    assert load_image(p).size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_modes_convert_to_rgb(tmp_path, mode):
    base = noise_image(16, 12)
    if mode == "I;16":
        img = Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257)
    else:
        img = base.convert(mode)
    p = tmp_path / f"x.{'tiff' if mode in ('CMYK', 'I;16') else 'png'}"
    img.save(p)
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (16, 12)
    if mode == "I;16":  # 16-bit is scaled, not clipped
        assert np.asarray(out).max() > 200


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(MediaError, match="bad.png"):
        load_image(bad)
    with pytest.raises(MediaError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(MediaError):
        load_image(b"not an image")


def test_bgr_frames_and_bytes():
    rgb = np.random.RandomState(3).randint(0, 255, (10, 12, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(bgr_to_pil(rgb[:, :, ::-1].copy())), rgb)
    assert np.array_equal(np.asarray(load_image(rgb[:, :, ::-1].copy(), channels="BGR")), rgb)
    assert np.array_equal(np.asarray(load_image(rgb)), rgb)  # arrays are RGB unless told otherwise
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    assert np.array_equal(np.asarray(load_image(buf.getvalue())), rgb)
    with pytest.raises(MediaError, match="shape"):
        bgr_to_pil(np.zeros((4, 4, 5), np.uint8))
