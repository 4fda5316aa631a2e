"""Spatial token grouping (chipmunk_compile/grouping.py): token orders, grid inference, hook-up.

CPU only. Orders are checked directly; grid inference on tiny diffusers models (Flux ids, Wan conv3d,
DiT / PixArt conv2d, SD3 joint attention); end to end, grouping with every key / neuron kept must
reproduce the dense model exactly (the perm round-trips through the ops).
"""

from __future__ import annotations

import math

import pytest
import torch

import chipmunk_compile
from chipmunk_compile.grouping import site_perm, text_mask, tile_order
from chipmunk_compile.runtime import sessions_of

from helpers import plan_sites

diffusers = pytest.importorskip("diffusers")


# ---------------------------------------------------------------------------------------------
# Orders
# ---------------------------------------------------------------------------------------------
def _coords(grid, order):
    return torch.stack(torch.unravel_index(order, tuple(grid)), dim=-1)  # (n, nd)


def _is_perm(p, n):
    return p.numel() == n and torch.equal(torch.sort(p.long()).values, torch.arange(n))


@pytest.mark.parametrize("grid,tile", [((16, 24), (8, 8)), ((8, 12, 16), (4, 6, 8)), ((12, 18, 24), (4, 6, 8))])
def test_full_tiles_are_boxes(grid, tile):
    order = tile_order(grid, tile)
    assert _is_perm(order, math.prod(grid))
    size = math.prod(tile)
    c = _coords(grid, order).view(-1, size, len(grid))
    ext = c.amax(1) - c.amin(1) + 1
    assert (ext == torch.tensor(tile)).all()  # every chunk of one tile is exactly one tile box
    if len(grid) == 2:  # 4×4 sub-tiles inside each 8×8 tile, raster inside
        sub = _coords(grid, order).view(-1, 16, 2)
        assert ((sub.amax(1) - sub.amin(1) + 1) == 4).all()
        assert torch.equal(order[:4], torch.tensor([0, 1, 2, 3]))
        assert order[16].item() == 4  # second sub-tile starts at column 4 of row 0
    else:  # raster inside a voxel
        assert torch.equal(order[:8], torch.arange(8))


@pytest.mark.parametrize("G", [64, 128, 192])
def test_groups_are_compact(G):
    grid = (16, 16)
    order = tile_order(grid)
    c = _coords(grid, order)
    for g in range(0, order.numel(), G):
        box = c[g:g + G].amax(0) - c[g:g + G].amin(0) + 1
        assert box.prod() <= 2 * G  # whole tiles, at most 2x the group's area
    grid = (8, 12, 16)
    order = tile_order(grid)
    c = _coords(grid, order)
    for g in range(0, order.numel(), 192):  # one (4, 6, 8) voxel per group of 192
        box = c[g:g + 192].amax(0) - c[g:g + 192].amin(0) + 1
        assert box.tolist() == [4, 6, 8]


@pytest.mark.parametrize("grid,G", [((48, 80), 192), ((16, 24), 128), ((32, 32), 256), ((32, 32), 192)])
def test_groups_of_several_tiles_are_boxes(grid, G):
    """FLUX's 48×80 grid has 10 tiles per row: groups of 3 tiles would straddle tile rows in plain
    tile-major order (up to a 1280-cell bounding box); here every group is a 1×3 or 3×1 box of
    tiles (1×3 over the first nine tile columns, 3×1 down the last). On 4×4 tiles, groups of 3 are
    1×3 boxes over three tile columns and a 3×1 box in the last; one tile is left over."""
    order = tile_order(grid, (8, 8), G)
    assert _is_perm(order, math.prod(grid))
    c = _coords(grid, order)
    n_full = (order.numel() // G) * G
    k = G // 64
    boxes = {(8 * r, 8 * (k // r)) for r in range(1, k + 1) if k % r == 0}
    shapes = [tuple((c[g:g + G].amax(0) - c[g:g + G].amin(0) + 1).tolist()) for g in range(0, n_full, G)]
    assert all(s in boxes for s in shapes), shapes
    assert max(a * b for a, b in shapes) == G  # boxes of exactly G cells: no gaps
    assert torch.equal(tile_order((32, 32), (8, 8), 128), tile_order((32, 32), (8, 8)))  # 1×2: unchanged


def test_site_groups_of_two_tiles_on_three_tile_columns():
    """16×24 tokens = 2×3 tiles at the default group of 128: the third group is the last tile
    column (a 2×1 box), not the third tile of row 0 with the first of row 1."""
    s = next(s for s in _plan(*_flux(H=16, W=24)) if s.kind == "attention")
    assert "tile 8×8, 2-tile groups as boxes, text 7 first" in s.grouping, s.grouping
    c = _coords((16, 24), s.perm[256:384].long() - 7)
    assert (c.amax(0) - c.amin(0) + 1).tolist() == [16, 8]


@pytest.mark.parametrize("grid,tile", [((9, 13), (8, 8)), ((5, 9, 16), (4, 6, 8)), ((9, 15, 20), (4, 6, 8)),
                                       ((3, 7, 9), (4, 6, 8))])
def test_tail_in_raster_after_full_tiles(grid, tile):
    """Grids not multiple of the tile (small analogues of Hunyuan's 33×45×80): full tiles first,
    then the t-remainder slab, the h-remainder, the w-remainder, each in raster order; no padding."""
    order = tile_order(grid, tile)
    n = math.prod(grid)
    assert _is_perm(order, n)
    eff = [min(t, g) for t, g in zip(tile, grid)]
    full = [(g // t) * t for g, t in zip(grid, eff)]
    c = _coords(grid, order)
    in_full = torch.ones(n, dtype=torch.bool)
    for a, f in enumerate(full):
        in_full &= c[:, a] < f
    n_full = math.prod(full)
    assert in_full[:n_full].all() and not in_full[n_full:].any()
    tail = order[n_full:]
    beyond = _coords(grid, tail) >= torch.tensor(full)  # (n_tail, nd)
    region = beyond.int().argmax(1)  # slab = the first axis beyond its full range
    assert torch.equal(region, torch.sort(region).values)  # slabs in axis order
    for a in range(len(grid)):
        r = tail[region == a]
        assert torch.equal(r, torch.sort(r).values)  # raster inside each slab


def test_hunyuan_720p_counts():
    order = tile_order((33, 45, 80))
    assert order.numel() == 118_800
    c = _coords((33, 45, 80), order[:107_520]).view(560, 192, 3)
    assert ((c.amax(1) - c.amin(1) + 1) == torch.tensor([4, 6, 8])).all()  # 560 voxels, 11,280-token tail


@pytest.mark.parametrize("text_first", [True, False])
def test_text_tokens_kept_whole(text_first):
    img = tile_order((8, 16))
    n_img, n_txt = img.numel(), 37
    n = n_img + n_txt
    perm = site_perm(n, img, n_txt, text_first)
    assert perm.dtype == torch.int32 and _is_perm(perm, n)
    txt_pos = torch.arange(n_txt) if text_first else torch.arange(n_img, n)
    assert torch.equal(perm[n_img:].long(), txt_pos)  # text last in the perm, whole, original order
    img_part = perm[:n_img].long() - (n_txt if text_first else 0)
    assert torch.equal(img_part, img)  # image tiles start aligned at group 0
    keep = text_mask(n, n_txt, text_first)
    assert keep.sum() == n_txt and keep[txt_pos].all()


# ---------------------------------------------------------------------------------------------
# Grid inference on tiny diffusers models
# ---------------------------------------------------------------------------------------------
LOOSE = {"attn": {"min_tokens": 1, "first_n_dense_layers": 0}, "mlp": {"min_tokens": 1, "first_n_dense_layers": 0},
         "step_signal": "calls"}


def _plan(model, kwargs, config=None):
    return plan_sites(model, kwargs, config or LOOSE)


def _flux(H=6, W=10, n_txt=7, shuffle=None, layers=1):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    m = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=layers, num_single_layers=layers,
                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                               pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    ids = torch.zeros(H, W, 3)
    ids[..., 1] = torch.arange(H)[:, None]
    ids[..., 2] = torch.arange(W)[None]
    ids = ids.reshape(-1, 3)
    x = torch.randn(1, H * W, 4)
    if shuffle is not None:
        ids, x = ids[shuffle], x[:, shuffle]
    kw = dict(hidden_states=x, encoder_hidden_states=torch.randn(1, n_txt, 32), pooled_projections=torch.randn(1, 32),
              timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=torch.zeros(n_txt, 3))
    return m, kw


def _wan(T=3, H=8, W=10):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                              out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1,
                              rope_max_seq_len=64).eval()
    return m, dict(hidden_states=torch.randn(1, 4, T, H, W), timestep=torch.tensor([500]),
                   encoder_hidden_states=torch.randn(1, 5, 32))


def _dit(size=16, layers=1):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=layers,
                              sample_size=size, patch_size=2, num_embeds_ada_norm=10).eval()
    return m, dict(hidden_states=torch.randn(1, 4, size, size), timestep=torch.tensor([5]),
                   class_labels=torch.tensor([1]))


def _pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=1, sample_size=8, patch_size=2, cross_attention_dim=32,
                                 caption_channels=24).eval()
    return m, dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([5]),
                   encoder_hidden_states=torch.randn(1, 5, 24), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def _tokens(s):
    return (s.shapes.get("q") or s.shapes.get("x"))[-2]


def test_flux_position_ids():
    sites = _plan(*_flux())
    joint = [s for s in sites if s.kind == "attention"]
    assert len(joint) == 2
    for s in sites:
        n = _tokens(s)
        if n == 67:  # 7 text + 60 image tokens
            assert s.grouping.startswith("position ids input img_ids h×w 6×10") and "text 7 first" in s.grouping
            assert _is_perm(s.perm, 67) and torch.equal(s.perm[60:].long(), torch.arange(7))
            if s.kind == "attention":
                assert s.always_keep is not None and s.always_keep[:7].all() and not s.always_keep[7:].any()
            else:
                assert s.always_keep is None
        elif n == 60:  # image-stream MLP: same image order
            assert s.grouping.startswith("position ids input img_ids") and _is_perm(s.perm, 60)
        else:  # the text-stream MLP
            assert s.perm is None and s.grouping.startswith("none: 7 tokens")


def test_flux_shuffled_ids_follow_positions():
    H, W = 8, 12
    g = torch.Generator().manual_seed(1)
    shuffle = torch.randperm(H * W, generator=g)
    ref = {s.kind: s for s in _plan(*_flux(H, W)) if _tokens(s) == H * W + 7}
    shuf = {s.kind: s for s in _plan(*_flux(H, W, shuffle=shuffle)) if _tokens(s) == H * W + 7}
    for kind in ref:
        p_ref, p_shuf = ref[kind].perm.long(), shuf[kind].perm.long()
        # token j of the shuffled image stream sits at raster position shuffle[j]
        img_shuf = p_shuf[:H * W] - 7
        assert torch.equal(shuffle[img_shuf], p_ref[:H * W] - 7)
        assert torch.equal(p_shuf[H * W:], torch.arange(7))


def _grid_ids(h, w, t0=0):
    return torch.stack([torch.full((h * w,), t0), torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)], -1)


@pytest.mark.parametrize("other_first", [True, False])
def test_joint_position_ids_split_off_the_other_rows(other_first):
    """A joint (text + image) id table: the grid is the run of rows at one end that fills a box,
    in token order of that run; the other rows' side is the text side the grid knows."""
    from chipmunk_compile.grouping import _ids_grid

    img, text = _grid_ids(6, 10), torch.zeros(7, 3, dtype=torch.long)  # Krea 2: text at the origin
    grid, raster, n_other, first = _ids_grid(torch.cat([text, img] if other_first else [img, text]).float())
    assert (grid, n_other, first) == ((6, 10), 7, other_first) and torch.equal(raster, torch.arange(60))
    diag = torch.arange(5)[:, None].expand(5, 3)  # Ideogram 4: text on the diagonal, grid shifted past it
    assert _ids_grid(torch.cat([diag, img + 5]))[:1] == ((6, 10),)
    assert _ids_grid(img)[2:] == (0, None)  # a plain grid is whole
    assert _ids_grid(torch.cat([torch.zeros(61, 3, dtype=torch.long), img])) is None  # others are not a minority
    assert _ids_grid(torch.cat([text, img, text])) is None  # other rows on both sides


def test_two_column_position_ids_give_the_grid():
    """(h, w) pairs, as research code passes its packed tokens' positions, fill the same box as Flux's
    (0, h, w) rows: the same grid and order, also shuffled and with text rows at the origin (until
    session 71 only 3 or 4 columns were read, and such a model ran ungrouped; benchmarks/fuzz_dits.py
    found it). Two columns of which one is constant are no grid."""
    from chipmunk_compile.grouping import _ids_grid

    three = _grid_ids(6, 10).float()
    two = three[:, 1:]
    a, b = _ids_grid(three), _ids_grid(two)
    assert b is not None and (a[0], a[2:]) == (b[0], b[2:]) == ((6, 10), (0, None)) and torch.equal(a[1], b[1])
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_ids_grid(two[perm])[1], a[1][perm])
    assert _ids_grid(torch.cat([torch.zeros(5, 2), two]))[2:] == (5, True)
    assert _ids_grid(torch.stack([torch.arange(60.0), torch.zeros(60)], -1)) is None


def test_position_ids_scaled_by_a_rope_factor_give_the_same_grid():
    """FLUX.3's modular pipeline scales the image's h and w ids by its rope scale (0.5), text rows at
    the origin: the same grid, order and text side as integer ids (until session 49: no grid, every
    FLUX.3 site ungrouped). Ids that are not evenly spaced stay without one."""
    from chipmunk_compile.grouping import _ids_grid

    ids = torch.cat([torch.zeros(7, 3, dtype=torch.long), _grid_ids(6, 10)]).float()
    scaled = ids.clone()
    scaled[:, 1:] *= 0.5
    a, b = _ids_grid(ids), _ids_grid(scaled)
    assert b is not None and (a[0], a[2:]) == (b[0], b[2:]) and torch.equal(a[1], b[1])
    uneven = scaled.clone()
    uneven[-1, 2] = 4.75  # the last row off the half steps
    assert _ids_grid(uneven) is None


def test_consecutive_boxes_of_position_ids_are_runs_of_one_image_stream():
    """FLUX.1 Kontext: the generated image's ids, then a reference image's (another size, frame index
    1). Each run is tiled on its own grid, in stream order; rows that are not all boxes stay other
    rows or no grid. Until session 46 the larger run was the grid and the other image's tokens
    counted as text (kept whole and always attended, on the wrong side of the real text)."""
    from chipmunk_compile.grouping import _ids_grid, _ids_info, image_order, tile_order

    gen, ref = _grid_ids(6, 10), _grid_ids(4, 7, t0=1)
    res = _ids_grid(torch.cat([gen, ref]).float())
    info = _ids_info(res, "ids")
    assert info.grid == (6, 10) and info.n == 88 and info.text_first is None
    assert [(start, grid) for start, grid, _ in info.segments] == [(0, (6, 10)), (60, (4, 7))]
    order, _ = image_order(info, None, 64)
    assert torch.equal(order[:60], tile_order((6, 10), None, 64)) and torch.equal(order[60:], 60 + tile_order((4, 7)))
    shuffled = torch.cat([gen, ref[torch.randperm(28, generator=torch.Generator().manual_seed(0))]])
    order, _ = image_order(_ids_info(_ids_grid(shuffled), "ids"), None, 64)
    assert torch.equal(shuffled[order[60:], 1:], ref[tile_order((4, 7)), 1:])  # positions, not token order
    text = torch.zeros(7, 3, dtype=torch.long)
    grid, _, n_other, first, runs = _ids_grid(torch.cat([text, gen, ref]))  # text rows at the origin first
    assert (grid, n_other, first, [r[:2] for r in runs]) == ((6, 10), 7, True, [(0, (6, 10)), (60, (4, 7))])
    assert _ids_grid(torch.cat([text[:1] + 3, text, gen, ref])) is None  # rows that are neither runs nor equal
    assert _ids_grid(torch.cat([text, gen]))[2:] == (7, True)  # text rows beside one box: other rows, as before
    assert _ids_grid(torch.cat([gen, _grid_ids(6, 10, t0=1)]))[0] == (2, 6, 10)  # one box: frames
    # a reference as wide as the image: its own run, not its first rows a second frame of the image
    runs = _ids_grid(torch.cat([gen, _grid_ids(9, 10, t0=1)]))[4]
    assert [(start, grid) for start, grid, _ in runs] == [(0, (6, 10)), (60, (9, 10))]
    # the frames of a video, then a reference image: one 3-D run and a 2-D one
    video = torch.cat([_grid_ids(4, 5, t0=t) for t in range(3)])
    runs = _ids_grid(torch.cat([video, _grid_ids(3, 7, t0=3)]))[4]
    assert [(start, grid) for start, grid, _ in runs] == [(0, (3, 4, 5)), (60, (3, 7))]
    # FLUX.2's reference images: ids (t, h, w, l), t = 10, 20, ... per reference (ungrouped until session 46:
    # two equal halves leave no majority box)
    four = [torch.cat([_grid_ids(h, w, t0=t), torch.zeros(h * w, 1, dtype=torch.long)], 1)
            for t, h, w in ((0, 6, 10), (10, 6, 10), (20, 3, 5))]
    runs = _ids_grid(torch.cat(four))[4]
    assert [(start, grid) for start, grid, _ in runs] == [(0, (6, 10)), (60, (6, 10)), (120, (3, 5))]


def test_kontext_sites_group_both_images_and_keep_only_the_text():
    m, kw = _flux(6, 10)
    ref = _grid_ids(4, 7, t0=1).float()
    kw = dict(kw, hidden_states=torch.randn(1, 88, 4), img_ids=torch.cat([kw["img_ids"], ref]))
    for s in _plan(m, kw):
        n = _tokens(s)
        if n == 95:  # 7 text + 60 + 28 image tokens
            assert "2 runs" in s.grouping and "text 7 first" in s.grouping, s.grouping
            assert _is_perm(s.perm, 95) and torch.equal(s.perm[88:].long(), torch.arange(7))
            assert sorted(s.perm[60:88].tolist()) == list(range(67, 95))  # the reference's tokens, together
            if s.kind == "attention":
                assert s.always_keep[:7].all() and not s.always_keep[7:].any()
        elif n == 88:
            assert _is_perm(s.perm, 88) and "2 runs" in s.grouping


def _dynamo_graph(fn, *args):
    """(graph, its example inputs: in placeholder order, which need not be the argument order)."""
    graphs = []

    def backend(gm, example_inputs, **_):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)(*args)
    return graphs[0]


def test_rotary_table_grid_of_a_graph_without_sites():
    """Per-axis tables expanded over the grid, joined on their last axis and flattened to a row per
    token: a grid (kept for later graphs' sites); other flattens are not."""
    from chipmunk_compile.grouping import _table_grids

    def table(t, h, w):
        parts = [t[:1].view(1, 1, 1, -1).expand(1, 6, 10, -1), h[:6].view(1, 6, 1, -1).expand(1, 6, 10, -1),
                 w[:10].view(1, 1, 10, -1).expand(1, 6, 10, -1)]
        return torch.cat(parts, dim=-1).reshape(60, -1)

    def not_table(x):  # a batch of token rows flattened: no broadcast tables
        return torch.cat([x, x], dim=-1).reshape(2 * 77, -1)

    tabs = (torch.randn(16, 2), torch.randn(16, 3), torch.randn(16, 3))
    found = _table_grids(_dynamo_graph(table, *tabs)[0])
    assert [g.grid for g in found] == [(6, 10)] and found[0].source.startswith("rotary table")
    assert _table_grids(_dynamo_graph(not_table, torch.randn(2, 77, 8))[0]) == []


def test_rotary_index_grid_is_evaluated_from_the_inputs():
    """Tables gathered row by row by index vectors the graph computes from its inputs (text
    positions, then image rows written through a mask): the vectors are evaluated at compile time
    and read as position ids; a computation that writes into a graph input is not evaluated."""
    from chipmunk_compile.grouping import _indexed_table_grids

    h, w, n_txt = 6, 10, 5

    def table(mask, t0, t1, t2):
        frame = torch.tensor(list(range(n_txt)) + [n_txt] * (h * w))
        hi, wi = frame.clone(), frame.clone()
        hi[mask] = torch.tensor([r for r in range(h) for _ in range(w)])
        wi[mask] = torch.tensor([c for _ in range(h) for c in range(w)])
        return torch.cat([t0[frame], t1[hi], t2[wi]], dim=-1)

    def gathers(t0, t1, t2, ids):  # ids (N, 3): a grid input
        return torch.cat([t0[ids[:, 0]], t1[ids[:, 1]], t2[ids[:, 2]]], dim=-1)

    def writes_input(mask, t0, t1, t2, ids):  # the same, after a write into it
        ids[mask, 0] = 0
        return gathers(t0, t1, t2, ids)

    mask = torch.arange(n_txt + h * w) >= n_txt
    tabs = (torch.randn(64, 2), torch.randn(64, 3), torch.randn(64, 3))
    found = _indexed_table_grids(*_dynamo_graph(table, mask, *tabs))
    assert [(g.grid, g.text_first) for g in found] == [((h, w), True)] and "after 5 other rows" in found[0].source
    grid_ids = torch.stack([torch.zeros(h * w), torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)], -1)
    grid_ids = grid_ids.long()
    assert [g.grid for g in _indexed_table_grids(*_dynamo_graph(gathers, *tabs, grid_ids))] == [(h, w)]
    gm, inputs = _dynamo_graph(writes_input, mask[n_txt:], *tabs, grid_ids.clone())  # (running it writes)
    inputs = [grid_ids.clone() if t.dtype == torch.long and t.dim() == 2 else t for t in inputs]
    assert _indexed_table_grids(gm, inputs) == []
    assert any(torch.equal(t, grid_ids) for t in inputs)  # not written by the evaluation


def test_wan_conv3d():
    sites = _plan(*_wan())
    attn = [s for s in sites if s.kind == "attention"]
    assert len(attn) == 1  # the cross-attention is rejected
    s = attn[0]
    assert s.grouping.startswith("conv3d patch embed t×h×w 3×4×5") and _is_perm(s.perm, 60)
    assert s.always_keep is None
    mlp = [s for s in sites if s.kind == "mlp" and _tokens(s) == 60]
    assert mlp and all(torch.equal(m.perm, s.perm) for m in mlp)


def test_wan_single_frame_is_an_image():
    sites = _plan(*_wan(T=1, H=32, W=32))
    s = next(s for s in sites if s.kind == "attention")
    assert s.grouping.startswith("conv3d patch embed h×w 16×16, tile 8×8")


@pytest.mark.parametrize("make", [_dit, _pixart])
def test_conv2d_patch_embed(make):
    sites = _plan(*make())
    s = next(s for s in sites if s.kind == "attention")
    assert s.grouping.startswith("conv2d patch embed h×w") and _is_perm(s.perm, _tokens(s))


def test_allegro_per_frame_conv_unflattened_into_frames():
    """Allegro embeds each frame with a 2-D conv, (B*T, C, H, W) -> (B*T, hw, D), and only later
    unflattens the batch into frames merged into the tokens, (B, T*hw, D): a t×h×w grid, not an
    h×w grid with T*hw - hw "text" tokens (which left it ungrouped)."""
    from diffusers import AllegroTransformer3DModel

    torch.manual_seed(0)
    m = AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
                                  in_channels=4, out_channels=4, num_layers=1, cross_attention_dim=32,
                                  sample_height=16, sample_width=20, sample_frames=3, caption_channels=24).eval()
    kw = dict(hidden_states=torch.randn(1, 4, 3, 16, 20), encoder_hidden_states=torch.randn(1, 5, 24),
              timestep=torch.tensor([500]))
    sites = [s for s in _plan(m, kw) if _tokens(s) == 3 * 8 * 10]
    assert {s.kind for s in sites} == {"attention", "mlp"}
    for s in sites:
        assert s.grouping.startswith("conv2d patch embed (per frame) t×h×w 3×8×10"), s.grouping
        assert torch.equal(s.perm.long(), tile_order((3, 8, 10)))


def test_cogview4_patchified_input_and_a_module_called_twice():
    """CogView4 patchifies the latent with views before a linear embedding (no conv): the grid comes
    from the input's view chain; its one `ff` runs on the image and on the text tokens: two sites,
    the second named path#1."""
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(0)
    m = CogView4Transformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16,
                                   num_attention_heads=2, text_embed_dim=32, time_embed_dim=32, condition_dim=16,
                                   pos_embed_max_size=16, sample_size=16, rope_axes_dim=(8, 8)).eval()
    size = torch.tensor([[128, 128]])
    kw = dict(hidden_states=torch.randn(1, 4, 12, 16), encoder_hidden_states=torch.randn(1, 6, 32),
              timestep=torch.tensor([500]), original_size=size, target_size=size, crop_coords=torch.tensor([[0, 0]]))
    sites = _plan(m, kw)
    attn = next(s for s in sites if s.kind == "attention")
    assert attn.grouping.startswith("patchified input hidden_states h×w 6×8") and attn.grouping.endswith("text 6 first")
    assert torch.equal(attn.perm[:48].long() - 6, tile_order((6, 8))) and attn.always_keep[:6].all()
    ff = sorted((s for s in sites if s.kind == "mlp" and "ff" in s.path), key=lambda s: s.path)
    assert [s.path for s in ff] == ["transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff.net.2#1"]
    assert [_tokens(s) for s in ff] == [48, 6] and ff[0].perm is not None and ff[1].perm is None


def test_cogvideox_per_frame_conv_with_text_first():
    """CogVideoX: per-frame 2-D conv, frames merged into the tokens after the text (8 first)."""
    from helpers import MODELS

    spec = MODELS["cogvideox"]
    sites = [s for s in _plan(spec.build(), spec.inputs(500.0)) if _tokens(s) == 8 + 3 * 8 * 8]
    assert {s.kind for s in sites} == {"attention", "mlp"}
    for s in sites:
        assert s.grouping.startswith("conv2d patch embed (per frame) t×h×w 3×8×8"), s.grouping
        assert s.grouping.endswith("text 8 first") and torch.equal(s.perm[192:].long(), torch.arange(8))


def test_batch_two_image_is_not_taken_for_frames():
    """A DiT at batch 2 keeps its h×w grid: the batch is never read as frames."""
    m, kw = _dit()
    kw = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    s = next(s for s in _plan(m, kw) if s.kind == "attention")
    assert s.grouping.startswith("conv2d patch embed h×w 8×8") and _is_perm(s.perm, 64)


def test_sd3_text_after_image():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    m = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                              pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16).eval()
    kw = dict(hidden_states=torch.randn(1, 4, 12, 16), encoder_hidden_states=torch.randn(1, 5, 32),
              pooled_projections=torch.randn(1, 32), timestep=torch.tensor([3]))
    s = next(s for s in _plan(m, kw) if s.kind == "attention")
    assert s.grouping.startswith("conv2d patch embed h×w 6×8") and s.grouping.endswith("text 5 last")
    assert torch.equal(s.perm[48:].long(), torch.arange(48, 53)) and s.always_keep[48:].all()


def test_grouping_disabled_and_ambiguous_text():
    m, kw = _dit()
    cfg = {**LOOSE, "grouping": {"enabled": False}}
    assert all(s.perm is None and s.grouping == "none: grouping disabled" for s in _plan(m, kw, cfg))

    class Sandwich(torch.nn.Module):  # text tokens on both sides of the image tokens: not grouped
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Conv2d(4, 32, 2, 2)
            self.qkv = torch.nn.Linear(32, 96)

        def forward(self, x, a, b):
            h = self.embed(x).flatten(2).transpose(1, 2)
            h = torch.cat([a, h, b], dim=1)
            q, k, v = self.qkv(h).view(1, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    sites = _plan(Sandwich(), dict(x=torch.randn(1, 4, 16, 16), a=torch.randn(1, 3, 32), b=torch.randn(1, 4, 32)))
    assert sites[0].perm is None and "both sides" in sites[0].grouping


class WrittenJoint(torch.nn.Module):
    """Text and image tokens written into a zero buffer by slices, per batch item (Lumina2), not
    concatenated: the write of the image tokens tells their side."""

    def __init__(self, text_first):
        super().__init__()
        self.embed = torch.nn.Conv2d(4, 32, 2, 2)
        self.qkv = torch.nn.Linear(32, 96)
        self.text_first = text_first

    def forward(self, x, text):
        img = self.embed(x).flatten(2).transpose(1, 2)
        n_img, n_txt = img.shape[1], text.shape[1]
        joint = img.new_zeros(1, n_img + n_txt, 32)
        t0, i0 = (0, n_txt) if self.text_first else (n_img, 0)
        joint[0, t0:t0 + n_txt] = text[0]
        joint[0, i0:i0 + n_img] = img[0]
        q, k, v = self.qkv(joint).view(1, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("text_first", [True, False])
def test_text_side_from_slice_writes(text_first):
    (s,) = _plan(WrittenJoint(text_first), dict(x=torch.randn(1, 4, 12, 16), text=torch.randn(1, 5, 32)))
    side = "first" if text_first else "last"
    assert s.grouping.startswith("conv2d patch embed h×w 6×8") and s.grouping.endswith(f"text 5 {side}"), s.grouping
    txt = torch.arange(5) if text_first else torch.arange(48, 53)
    assert _is_perm(s.perm, 53) and torch.equal(s.perm[48:].long(), txt)


class NestedJoin(torch.nn.Module):
    """HiDream's single-stream join: cat([cat([image, text_a]), text_b]); with `broken`, the
    attention block is a frame of its own after a graph break, so the join is in another graph."""

    def __init__(self, broken=False):
        super().__init__()
        self.embed = torch.nn.Conv2d(4, 32, 2, 2)
        self.block = _Block()
        self.broken = broken

    def forward(self, x, a, b):
        h = self.embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([torch.cat([h, a], dim=1), b], dim=1)
        if self.broken:
            torch._dynamo.graph_break()
        return self.block(h)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, h):
        q, k, v = self.qkv(h).view(1, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_text_side_of_nested_concats():
    """The image part of a joined sequence may sit inside a nested concat."""
    kw = dict(x=torch.randn(1, 4, 12, 16), a=torch.randn(1, 3, 32), b=torch.randn(1, 4, 32))
    (s,) = _plan(NestedJoin(), kw)
    assert s.grouping.startswith("conv2d patch embed h×w 6×8") and s.grouping.endswith("text 7 last"), s.grouping
    assert _is_perm(s.perm, 55) and torch.equal(s.perm[48:].long(), torch.arange(48, 55))


def test_text_side_from_a_concat_in_an_earlier_graph():
    """HiDream's single-stream blocks get the joined sequence as an input: the concat (and the
    patch embedding) are in the graph before the break. Inspected and compiled alike."""
    import chipmunk_compile

    kw = dict(x=torch.randn(1, 4, 12, 16), a=torch.randn(1, 3, 32), b=torch.randn(1, 4, 32))
    want = "conv2d patch embed h×w (earlier graph) 6×8, tile 6×8, text 7 last (concat in an earlier graph)"
    torch._dynamo.reset()
    rep = chipmunk_compile.inspect(NestedJoin(broken=True), **kw, config=LOOSE)
    assert [s.grouping for s in rep.sites] == [want], str(rep)
    torch._dynamo.reset()
    m = NestedJoin(broken=True)
    c = torch.compile(m, backend="chipmunk", options={"config": LOOSE, "compiler": "eager"})
    with torch.no_grad():
        c(**kw)
    assert [s["grouping"] for s in chipmunk_compile.stats(m)["sites"]] == [want]


class VariableText(torch.nn.Module):
    """Image tokens from a conv, text of a length Dynamo treats as symbolic (mark_dynamic), joined
    image first: the site's token count is symbolic, its grid and text side are not."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(4, 32, 2, 2)
        self.qkv = torch.nn.Linear(32, 96)
        self.out = torch.nn.Linear(32, 32)

    def forward(self, x, text):
        h = torch.cat([self.embed(x).flatten(2).transpose(1, 2), text], dim=1)
        q, k, v = self.qkv(h).view(1, h.shape[1], 3, 2, 16).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).flatten(2))


def test_symbolic_token_count_grouped_per_call():
    """One graph serves every text length: each call gets the permutation of its own count
    (text last, kept whole), built once per count; outputs match eager on every step kind."""
    import chipmunk_compile
    from helpers import FULL_KEYS, chip, max_rel, step_counts

    torch._dynamo.reset()
    cfg = {**LOOSE, "attn": {**LOOSE["attn"], "group": 16, **FULL_KEYS}, "mlp": {"enabled": False}}
    m = VariableText().eval()
    cm = chip(m, cfg)
    x = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, n_txt in enumerate([5, 5, 5, 7, 7, 7, 9, 9]):  # a new count refreshes its caches
            text = torch.randn(1, n_txt, 32, generator=torch.Generator().manual_seed(i))
            torch._dynamo.mark_dynamic(text, 1)
            assert max_rel(cm(x * (1 + 0.01 * i), text), m(x * (1 + 0.01 * i), text)) < 1e-5
    (site,) = chipmunk_compile.runtime.sessions_of(m)[0].sites
    assert site.grouping.startswith("conv2d patch embed h×w 6×8") and "per call (symbolic token count), text last" in site.grouping
    # per count and size of the conv's input (the latent: one size here)
    assert sorted(site.call_grouping.cache) == [(53, (12, 16)), (55, (12, 16)), (57, (12, 16))]
    for (n, _), (perm, keep) in site.call_grouping.cache.items():
        assert _is_perm(perm, n) and torch.equal(perm[48:].long(), torch.arange(48, n))
        assert keep is not None and keep[48:].all() and not keep[:48].any()
    assert step_counts(m).get("attention_sparse", 0) > 0


def test_symbolic_token_count_with_conflicting_side_stays_ungrouped():
    """Graph says text last, config says first: no call with text tokens is grouped (an earlier
    graph's concat of the call's count must not settle what the graph itself contradicts)."""
    import chipmunk_compile
    from helpers import FULL_KEYS, chip, max_rel

    torch._dynamo.reset()
    cfg = {**LOOSE, "attn": {**LOOSE["attn"], "group": 16, **FULL_KEYS}, "mlp": {"enabled": False},
           "grouping": {"text_first": True}}
    m = VariableText().eval()
    cm = chip(m, cfg)
    x = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, n_txt in enumerate([5, 5, 7]):
            if n_txt == 7:  # as if an earlier graph had joined 48 image + 7 text tokens
                chipmunk_compile.runtime.sessions_of(m)[0]._chipmunk_token_joins = [(55, (48, 7))]
            text = torch.randn(1, n_txt, 32, generator=torch.Generator().manual_seed(i))
            torch._dynamo.mark_dynamic(text, 1)
            assert max_rel(cm(x, text), m(x, text)) < 1e-5
    (site,) = chipmunk_compile.runtime.sessions_of(m)[0].sites
    assert "contradicts the graph's concat order" in site.grouping, site.grouping
    assert site.call_grouping.cache == {(53, (12, 16)): (None, None), (55, (12, 16)): (None, None)}


class Packed(torch.nn.Module):
    """Tokens arrive already packed (no conv, no ids): only config.grouping can group them."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 96)
        self.out = torch.nn.Linear(32, 8)

    def forward(self, tokens):
        q, k, v = self.qkv(tokens).view(1, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).flatten(2))


def test_config_grid_fallback():
    kw = dict(tokens=torch.randn(1, 5 + 9 * 13, 8))
    (s,) = _plan(Packed(), kw)
    assert s.perm is None and s.grouping.startswith("none: no conv patch embedding")
    (s,) = _plan(Packed(), kw, {**LOOSE, "grouping": {"grid": [9, 13], "text_tokens": 5}})
    assert s.perm is None and "before or after" in s.grouping  # side unknown: not guessed
    (s,) = _plan(Packed(), kw, {**LOOSE, "grouping": {"grid": [9, 13], "text_tokens": 5, "text_first": True}})
    assert s.grouping.startswith("config h×w 9×13, tile 8×8, text 5 first")
    assert _is_perm(s.perm, 122) and torch.equal(s.perm[117:].long(), torch.arange(5)) and s.always_keep[:5].all()
    (s,) = _plan(Packed(), kw, {**LOOSE, "grouping": {"grid": [9, 13], "text_tokens": 4, "text_first": True}})
    assert s.perm is None  # token count does not add up


class RopeTable(torch.nn.Module):
    """Packed tokens (no conv, no ids input) with a rotary table laid out on the (h, w) grid and
    flattened to one row per token in the graph (Qwen-Image, LTX-Video): the merge gives the grid."""

    def __init__(self, h, w, d=16, heads=2):
        super().__init__()
        self.h, self.w, self.heads, self.d = h, w, heads, d
        self.qkv = torch.nn.Linear(8, 3 * heads * d)
        self.out = torch.nn.Linear(heads * d, 8)

    def forward(self, tokens):
        rows = torch.arange(self.h, dtype=torch.float32)[:, None, None].expand(self.h, self.w, self.d // 2)
        cols = torch.arange(self.w, dtype=torch.float32)[None, :, None].expand(self.h, self.w, self.d // 2)
        table = torch.cat([rows, cols], -1).reshape(self.h * self.w, self.d)  # (hw, d), raster rows
        q, k, v = self.qkv(tokens).view(1, -1, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)
        q, k = q * torch.cos(table), k * torch.cos(table)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).flatten(2))


def test_grid_from_a_merged_rotary_table():
    (s,) = _plan(RopeTable(6, 10), dict(tokens=torch.randn(1, 60, 8)))
    assert s.grouping.startswith("merged axes table h×w 6×10, tile 6×8"), s.grouping
    assert torch.equal(s.perm.long(), tile_order((6, 10), (6, 8)))


class RopeTables(RopeTable):
    """RopeTable with a reference image: the tables of two grids, each merged, then joined along the
    token axis (Qwen-Image-Edit's `img_shapes` of two entries)."""

    def __init__(self, grids, d=16, heads=2):
        super().__init__(1, 1, d, heads)
        self.grids = grids

    def forward(self, tokens):
        tables = []
        for h, w in self.grids:
            rows = torch.arange(h, dtype=torch.float32)[:, None, None].expand(h, w, self.d // 2)
            cols = torch.arange(w, dtype=torch.float32)[None, :, None].expand(h, w, self.d // 2)
            tables.append(torch.cat([rows, cols], -1).reshape(h * w, self.d).clone())
        table = torch.cat(tables)
        q, k, v = self.qkv(tokens).view(1, -1, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)
        q, k = q * torch.cos(table), k * torch.cos(table)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).flatten(2))


def test_joined_rotary_tables_are_runs():
    """Until session 46 each table was a grid of its own, and none explained the site: ungrouped."""
    (s,) = _plan(RopeTables([(6, 10), (4, 7)]), dict(tokens=torch.randn(1, 88, 8)))
    assert "in 2 runs" in s.grouping and "6×10 + 4×7" in s.grouping, s.grouping
    assert torch.equal(s.perm[60:].long(), 60 + tile_order((4, 7), (4, 7)))


def test_head_merge_is_not_a_grid():
    """32 tokens and heads x dim = 2 x 16 = 32: the (B, N, H, D) -> (B, N, H·D) merge has the
    site's size, but its tokens stand beside it, so it is no grid."""
    (s,) = _plan(Packed(), dict(tokens=torch.randn(1, 32, 8)))
    assert s.perm is None and s.grouping.startswith("none: no conv patch embedding"), s.grouping


class LocalTiles(torch.nn.Module):
    """Channels-last latent (B, H, W, C) put in local-tile order before the blocks (Kandinsky 6 SR's
    `_local_patch`): (H/8, 8, W/8, 8) -> (tiles, 64) -> tokens. With `tiled=False` the plain raster
    merge (B, H, W, C) -> (B, HW, C), whose (H, W) is the grid."""

    def __init__(self, tiled):
        super().__init__()
        self.tiled = tiled
        self.qkv = torch.nn.Linear(8, 96)
        self.out = torch.nn.Linear(32, 8)

    def forward(self, latent):
        b, h, w, c = latent.shape
        if self.tiled:
            x = latent.reshape(b, h // 8, 8, w // 8, 8, c).permute(0, 1, 3, 2, 4, 5)
            tokens = x.flatten(1, 2).flatten(2, 3).flatten(1, 2)
        else:
            tokens = latent.flatten(1, 2)
        q, k, v = self.qkv(tokens).view(b, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).flatten(2))


def test_local_tile_order_is_not_read_as_a_grid():
    """(tiles, tokens per tile) is merged like a 2-D grid, but its axes are merges themselves: the
    tokens are already in 8x8 neighbourhoods, which the identity order keeps (a 4x8 tile of a
    "4x64 grid" would take 8 tokens from each of four tiles)."""
    kw = dict(latent=torch.randn(1, 16, 16, 8))
    (s,) = _plan(LocalTiles(tiled=True), kw)
    assert s.perm is None and s.grouping.startswith("none"), s.grouping
    (s,) = _plan(LocalTiles(tiled=False), kw)
    assert s.grouping.startswith("merged axes"), s.grouping
    assert torch.equal(s.perm.long(), tile_order((16, 16), (8, 8)))


def test_inspect_without_inputs_says_what_it_needs():
    with pytest.raises(TypeError, match="give that call's inputs"):
        chipmunk_compile.inspect(torch.nn.Linear(2, 2))


def test_inspect_reports_grouping():
    m, kw = _dit()
    report = chipmunk_compile.inspect(m, config=LOOSE, **kw)
    assert "conv2d patch embed h×w 8×8" in str(report)


# ---------------------------------------------------------------------------------------------
# End to end: grouping + every key / neuron kept == dense
# ---------------------------------------------------------------------------------------------
FULL = {"attn": {"min_tokens": 1, "first_n_dense_layers": 0, "top_keys": 1.0, "random_keys": 0.0, "group": 64,
                 "full_step_every": 100},
        "mlp": {"min_tokens": 1, "first_n_dense_layers": 0, "top_keys": 1.0, "random_keys": 0.0, "block": 64,
                "full_step_every": 100},
        "step_signal": "calls"}


@pytest.mark.parametrize("name", ["dit", "flux_shuffled", "wan"])
def test_grouped_full_budget_equals_dense(name):
    if name == "dit":
        m, kw = _dit(size=32, layers=2)
        drift = "hidden_states"
    elif name == "flux_shuffled":
        m, kw = _flux(12, 20, shuffle=torch.randperm(240, generator=torch.Generator().manual_seed(0)))
        drift = "hidden_states"
    else:
        m, kw = _wan(T=5, H=16, W=20)
        drift = "hidden_states"
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="chipmunk", options={"config": FULL, "compiler": "eager"})
    x0, noise = kw[drift].clone(), torch.randn_like(kw[drift])
    with torch.no_grad():
        for step in range(4):
            kw[drift] = x0 + 0.05 * step * noise
            ref = m(**kw)[0]
            out = compiled(**kw)[0]
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    sites = sessions_of(m)[0].sites
    grouped = [s for s in sites if s.perm is not None]
    assert grouped and any(s.kind == "attention" for s in grouped)
    assert all(s.steps.get("sparse", 0) > 0 for s in grouped)
    perm = grouped[0].perm
    assert not torch.equal(perm.long(), torch.arange(perm.numel()))  # a real reordering was exercised


def test_several_patch_embeddings_pick_the_grid_that_is_most_of_the_sequence():
    """Helios / FramePack embed the current chunk and each history length with its own conv and join
    them into one sequence: candidate grids of 4, 9, 36 and 108 tokens for sites of 157 (+ a small
    text MLP of 8). The 108-token grid is most of every site; the old rule (every site exceeds the
    4-token grid) took the smallest and the other 153 tokens for text."""
    from chipmunk_compile.grouping import GridInfo, _pick

    cands = [GridInfo((1, 2, 2)[1:], "conv3d"), GridInfo((3, 3), "conv3d"), GridInfo((6, 6), "conv3d"),
             GridInfo((3, 6, 6), "conv3d")]
    assert _pick(cands, [157, 157, 157, 8]).grid == (3, 6, 6)
    # one candidate still groups a site whose text outnumbers the image (a low-resolution FLUX)
    assert _pick([GridInfo((16, 16), "ids")], [256 + 512]).grid == (16, 16)
    # an exact match beats a larger part; the larger part beats a minority
    assert _pick([GridInfo((8, 8), "a"), GridInfo((10, 10), "b")], [100, 100]).grid == (10, 10)
    assert _pick([GridInfo((4, 4), "a"), GridInfo((8, 8), "b")], [80, 80]).grid == (8, 8)


def _framepack(h=16, w=16, frames=3):
    """A tiny HunyuanVideo-FramePack: 4× / 2× history, 2 clean frames and the current latent, each
    embedded by a conv of its own and joined in that order; image and text tokens after them."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(0)
    m = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), has_image_proj=True, image_proj_dim=16,
        has_clean_x_embedder=True).eval()
    mask = torch.zeros(1, 8, dtype=torch.long)
    mask[:, :5] = 1
    r = torch.randn
    kw = dict(hidden_states=r(1, 4, frames, h, w), timestep=torch.tensor([1000.0]), encoder_hidden_states=r(1, 8, 16),
              encoder_attention_mask=mask, pooled_projections=r(1, 8), image_embeds=r(1, 4, 16),
              indices_latents=torch.arange(7, 7 + frames), guidance=torch.tensor([6000.0]),
              latents_clean=r(1, 4, 2, h, w), indices_latents_clean=torch.tensor([0, 6]),
              latents_history_2x=r(1, 4, 2, h, w), indices_latents_history_2x=torch.arange(4, 6),
              latents_history_4x=r(1, 4, 4, h, w), indices_latents_history_4x=torch.arange(0, 4), return_dict=False)
    return m, kw


def test_framepack_history_and_current_latents_are_runs_of_one_image_stream():
    """FramePack's 4× history (2×2 tokens), 2× history (4×4), clean frames (2×8×8) and current
    latent (3×8×8), each from its own conv, are one image stream of 4 runs; only the 9 image-embed
    and text tokens after them are kept whole. Before, the current latent was the grid and the
    history before it plus the text after it left the attention ungrouped ("non-grid tokens on both
    sides"), and the MLPs took the history for text."""
    m, kw = _framepack()
    runs = [(0, 4), (4, 20), (20, 148), (148, 340)]
    seen = set()
    torch._dynamo.reset()  # compiled: the blocks run in a graph after a break, which takes the grid of the first
    with torch.no_grad():
        torch.compile(m, backend="chipmunk", options={"config": LOOSE, "compiler": "eager"})(**kw)
    for s in [s for session in sessions_of(m) for s in session.sites]:
        n = _tokens(s)
        if n not in (340, 349):
            continue
        seen.add((s.kind, n))
        assert "in 4 runs" in s.grouping and "2×2 + 4×4 + 2×8×8 + 3×8×8" in s.grouping, s.grouping
        assert _is_perm(s.perm, n)
        if n == 349:
            assert "text 9 last" in s.grouping and torch.equal(s.perm[340:].long(), torch.arange(340, 349))
        pos = torch.empty(n, dtype=torch.long)
        pos[s.perm.long()] = torch.arange(n)
        for a, b in runs:  # each run's tokens keep one stretch of the order, in stream order
            assert sorted(pos[a:b].tolist()) == list(range(a, b))
        assert not torch.equal(s.perm[148:340].long(), torch.arange(148, 340))  # the current latent is tiled
    assert {k for k, _ in seen} == {"attention", "mlp"} and (("attention", 349) in seen), seen


def test_framepack_grouped_full_budget_equals_dense():
    m, kw = _framepack()
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="chipmunk", options={"config": FULL, "compiler": "eager"})
    x0, noise = kw["hidden_states"].clone(), torch.randn_like(kw["hidden_states"])
    with torch.no_grad():
        for step in range(3):
            kw["hidden_states"] = x0 + 0.05 * step * noise
            torch.testing.assert_close(compiled(**kw)[0], m(**kw)[0], rtol=1e-4, atol=1e-4)
    grouped = [s for session in sessions_of(m) for s in session.sites if s.perm is not None and "in 4 runs" in s.grouping]
    assert any(s.kind == "attention" for s in grouped) and all(s.steps.get("sparse", 0) > 0 for s in grouped)


def test_two_token_streams_of_the_grid_are_both_tiled():
    """Motif-Video's decoder blocks attend over cat(decoder tokens, encoder output): two streams of
    the 3×8×8 grid, 384 tokens. Every part of the concat has the image's size, so each is tiled in the
    image order (before: "non-grid tokens on both sides", ungrouped). A concat with one image part
    and others of another size still reads as text before or after it."""
    import sys

    sys.path.insert(0, "benchmarks")
    import arch_zoo
    from chipmunk_compile.grouping import _decide, _side_of

    case = arch_zoo.MODELS["motif_video"][1]()
    torch._dynamo.reset()
    with torch._dynamo.config.patch(**case.patches):
        rep = chipmunk_compile.inspect(case.model, **case.kwargs, config=arch_zoo.CFG)
    two = [s for s in rep.sites if (s.shapes.get("q") or s.shapes.get("x"))[-2] == 384]
    assert two and all("2 token streams of the grid" in s.grouping for s in two), [s.grouping for s in two]
    assert _side_of([192, 192], 192) == "repeat" and _side_of([8, 192], 192) == "first"
    assert _side_of([192, 8, 192], 192) == "mixed"
    order = torch.arange(6).flip(0)
    perm, keep, note = _decide(12, 6, order, {"repeat"}, None, chipmunk_compile.GroupingConfig(), {})
    assert perm.tolist() == [5, 4, 3, 2, 1, 0, 11, 10, 9, 8, 7, 6] and keep is None and "2 token streams" in note


def _framepack_attention_perms(h, w, dynamic):
    """{token count: perm} of FramePack's block attention sites after calls at 16×16 then (h, w)
    latents (a fresh compile; full budget, every call checked against eager), and the counters."""
    from torch._dynamo.utils import counters

    m, _ = _framepack(16, 16)
    torch._dynamo.reset()
    counters["chipmunk"].clear()
    compiled = torch.compile(m, backend="chipmunk", options={"config": FULL, "compiler": "eager"}, dynamic=dynamic)
    with torch.no_grad():
        for hh in (16, 16, h, h, 16):
            kw = _framepack(hh, w)[1]
            torch.testing.assert_close(compiled(**kw)[0], m(**kw)[0], rtol=1e-4, atol=1e-4)
    perms = {}
    for s in (s for session in sessions_of(m) for s in session.sites if s.kind == "attention"):
        if s.perm is not None:
            perms.setdefault(s.perm.numel(), s.perm)
        for key, (p, _) in (getattr(s, "call_grouping", None) and s.call_grouping.cache or {}).items():
            perms.setdefault(key[0] if isinstance(key, tuple) else key, p)
    return perms, dict(counters["chipmunk"])


def test_framepack_runs_follow_the_resolution():
    """FramePack at 16×16 latents, then 24×16 (Dynamo recompiles with symbolic sizes), then 16×16.
    The runs read at 16×16 are that resolution's layout only: a call at 24×16 (510 image + 9 text
    tokens, fewer "text" tokens than the old 340-token stream, which the count alone would have
    passed) was grouped on the 16×16 runs. The graph that embeds the runs notes its latents' shapes
    per call, and the runs of a call with other shapes come from the convs' rules: the same order a
    graph compiled at 24×16 gives. Full budget: every call equals eager."""
    dyn, counts = _framepack_attention_perms(24, 16, dynamic=None)
    static, _ = _framepack_attention_perms(24, 16, dynamic=False)
    assert 349 in dyn and 519 in dyn and 519 in static
    assert torch.equal(dyn[519].long(), static[519].long()) and torch.equal(dyn[349].long(), static[349].long())
    assert not counts.get("grouping_ungrouped_count")


def test_runs_for_shapes_follow_each_conv_and_its_padding():
    """`runs_for_shapes`: per axis the conv formula, or the input padded to a multiple of the stride
    first, whichever gave the compile-time size; None for a rank the convs do not take."""
    from chipmunk_compile.grouping import runs_for_shapes

    k = ((2, 4, 4), (2, 4, 4), (0, 0, 0), (1, 1, 1))
    p = ((1, 2, 2), (1, 2, 2), (0, 0, 0), (1, 1, 1))
    inputs = (("hist", (1, 4, 3, 18, 16)), ("cur", (1, 4, 3, 16, 16)))
    rules = ((0, k, (2, 5, 4)), (1, p, (3, 8, 8)))  # the history padded (3, 18 -> 4, 20), the current not
    assert runs_for_shapes(inputs, rules, ((1, 4, 3, 18, 16), (1, 4, 3, 16, 16))) == \
        ((0, (2, 5, 4), None), (40, (3, 8, 8), None))
    assert runs_for_shapes(inputs, rules, ((1, 4, 3, 22, 16), (1, 4, 3, 24, 16))) == \
        ((0, (2, 6, 4), None), (48, (3, 12, 8), None))
    assert runs_for_shapes(inputs, rules, ((1, 4, 22, 16), (1, 4, 3, 24, 16))) is None
