"""The PyTorch reference against the literal upstream tensor manipulations (reference doc §3, §4, §5)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vila_edge.errors import PromptError
from vila_edge.reference.projector import space_to_depth
from vila_edge.reference.s2 import (
    area_resize,
    dynamic_s2_merge,
    dynamic_s2_tokens,
    merge_chessboard,
    split_chessboard,
    static_s2_merge,
)
from vila_edge.splice import splice


def upstream_flat_square(x, final_permute: bool):
    """DownSampleBlock.flat_square, verbatim view/permute chain. HEAD (NVILA) ends with a permute
    (row-major cells); V15 (VILA1.5) lacks it (column-major cells), reference doc §4.3."""
    n, w, h, c = x.size()
    if w % 2 == 1:
        x = torch.cat([x, torch.zeros((n, 1, h, c), dtype=x.dtype)], dim=1).contiguous()
        n, w, h, c = x.size()
    if h % 2 == 1:
        x = torch.cat([x, torch.zeros((n, w, 1, c), dtype=x.dtype)], dim=2).contiguous()
        n, w, h, c = x.size()
    x = x.contiguous().view(n, w, int(h / 2), int(c * 2))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h / 2), int(w / 2), int(c * 4))
    if final_permute:
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def grid5():
    # token t = r*5 + c carries the value t + 1 in channel 0 and -(t + 1) in channel 1: easy to read back
    v = torch.arange(1, 26, dtype=torch.float32)
    return torch.stack([v, -v], dim=-1)[None]  # [1, 25, 2]


def test_downsample_row_major_matches_head_code_on_5x5():
    x = grid5()
    ours = space_to_depth(x, 2, "row")
    ref = upstream_flat_square(x.reshape(1, 5, 5, 2), final_permute=True).reshape(1, -1, 8)
    assert torch.equal(ours, ref)
    # first cell [TL, TR, BL, BR] of rows 0-1, cols 0-1: tokens 1, 2, 6, 7; second cell: cols 2-3
    assert ours[0, 0, ::2].tolist() == [1, 2, 6, 7]
    assert ours[0, 1, ::2].tolist() == [3, 4, 8, 9]
    assert ours[0, 2, ::2].tolist() == [5, 0, 10, 0]  # right column zero-padded
    assert ours.shape == (1, 9, 8)


def test_downsample_column_major_matches_v15_code_on_5x5():
    x = grid5()
    ours = space_to_depth(x, 2, "col")
    ref = upstream_flat_square(x.reshape(1, 5, 5, 2), final_permute=False).reshape(1, -1, 8)
    assert torch.equal(ours, ref)
    # column-major: cells (0,0), (1,0), (2,0), (0,1), ...
    assert ours[0, 1, ::2].tolist() == [11, 12, 16, 17]
    assert ours[0, 3, ::2].tolist() == [3, 4, 8, 9]


def test_downsample_3x3_matches_sglang_formulation():
    x = torch.randn(2, 32 * 32, 4)
    ours = space_to_depth(x, 3, "row")
    xp = F.pad(x.reshape(2, 32, 32, 4), (0, 0, 0, 1, 0, 1))
    ref = xp.reshape(2, 11, 3, 11, 3, 4).permute(0, 1, 3, 2, 4, 5).reshape(2, 121, 36)
    assert ours.shape == (2, 121, 36) and torch.equal(ours, ref)


def test_chessboard_round_trip():
    x = torch.randn(2, 5, 12, 8)
    tiles = split_chessboard(x, 3, 2)
    assert tiles.shape == (12, 5, 4, 4)
    assert torch.equal(merge_chessboard(tiles, 3, 2), x)
    # token-layout input is accepted too
    tok = tiles.flatten(2).transpose(1, 2)
    assert torch.equal(merge_chessboard(tok, 3, 2), x)


@pytest.mark.parametrize("src,dst", [((54, 54), (27, 27)), ((64, 64), (96, 96)), ((32, 32), (96, 128)), ((96, 128), (96, 128)), ((7, 9), (5, 4))])
def test_area_resize_is_adaptive_avg_pool(src, dst):
    x = torch.randn(1, 3, *src)
    np.testing.assert_allclose(area_resize(x, dst).numpy(), F.adaptive_avg_pool2d(x, dst).numpy(), rtol=0, atol=1e-6)


def test_static_s2_merge_equals_manual():
    feats = torch.randn(5, 9, 4)  # scale 1: 1 tile, scale 2: 2x2 tiles, 3x3 tokens each
    out = static_s2_merge(feats, tiles_per_side=[1, 2], output_scale_idx=0)
    assert out.shape == (1, 9, 8)
    big = merge_chessboard(feats[1:], 2, 2)  # 1 x 4 x 6 x 6
    pooled = F.avg_pool2d(big, 2).flatten(2).transpose(1, 2)
    assert torch.allclose(out[..., 4:], pooled, atol=1e-6)
    assert torch.equal(out[..., :4], feats[:1])


def test_dynamic_s2_merge_1920x1080_shapes_and_order():
    h = w = 4
    feats = torch.randn(1 + 4 + 12, h * w, 3)
    chunks = dynamic_s2_merge(feats, block_size=(3, 4), scales=[448, 896, 1344])
    assert chunks.shape == (12, 16, 9)
    last = merge_chessboard(feats[5:], 3, 4)
    # the last scale is already at the output resolution: chunk k is tile k unchanged
    assert torch.equal(chunks[..., 6:], feats[5:])
    assert torch.allclose(split_chessboard(last, 3, 4).flatten(2).transpose(1, 2), chunks[..., 6:])
    plain = dynamic_s2_merge(feats[:1], block_size=None, scales=[448, 896, 1344])
    assert torch.equal(plain, feats[:1].repeat(1, 1, 3))


def test_dynamic_s2_tokens_are_global_row_major():
    rows, cols, side = 2, 3, 2
    # chunk k, local token (i, j) -> global (r*side + i, c*side + j); encode the global index as the value
    proj = torch.zeros(rows * cols, side * side, 1)
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        for i in range(side):
            for j in range(side):
                proj[k, i * side + j, 0] = (r * side + i) * (cols * side) + (c * side + j)
    tokens = dynamic_s2_tokens(proj, (rows, cols))
    assert tokens[:, 0].tolist() == list(range(rows * cols * side * side))


def test_splice_layouts_and_mismatch():
    table = torch.arange(50, dtype=torch.float32)[:, None].repeat(1, 2)

    def embed(ids):
        return table[torch.tensor(ids)]

    feat = torch.full((3, 2), -1.0)
    v15 = splice([1, 5, -200, 7, 8], embed, [feat], media_ids={-200})
    assert v15[:, 0].tolist() == [1, 5, -1, -1, -1, 7, 8]
    head = splice([5, 40, 7], embed, [feat], media_ids={40}, end_ids=(9,))
    assert head[:, 0].tolist() == [5, -1, -1, -1, 9, 7]
    with pytest.raises(PromptError, match="1 media marker"):
        splice([5, 40, 7], embed, [feat, feat], media_ids={40})
