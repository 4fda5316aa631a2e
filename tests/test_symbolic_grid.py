"""chipmunk_compile/symbolic_grid.py: a grid that only a merge shows (a reshape of grid axes into the
token axis), read from a graph compiled with symbolic sizes and evaluated per call.

Before, such models ran every resolution after the first ungrouped under Dynamo's automatic
dynamic shapes (LTX-Video, Cosmos, Kandinsky 5, PRX, Lumina-Next), and every resolution under
`dynamic=True`. The tests check the exact permutation of each call's grid, and that nothing ran
ungrouped."""

import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import chipmunk_compile
from chipmunk_compile import symbolic_grid
from chipmunk_compile.grouping import GridInfo, image_order, site_perm
from chipmunk_compile.runtime import sessions_of

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import arch_zoo  # noqa: E402
from helpers import fresh_dynamo  # noqa: E402,F401
from zoo_common import _r  # noqa: E402


class ChannelsLastVideoDiT(nn.Module):
    """A (B, T, H, W, C) latent embedded per token, merged into (B, T·H·W, D) and through one block of
    attention and MLP; 4 text tokens appended after the image tokens. The merge alone shows the grid."""

    def __init__(self, c=4, d=32, heads=2):
        super().__init__()
        self.heads = heads
        self.embed, self.text = nn.Linear(c, d), nn.Parameter(torch.randn(4, d))
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Linear(d, c)

    def forward(self, x):
        b = x.shape[0]
        h = self.embed(x).flatten(1, 3)  # (B, T·H·W, D): the merge of the grid axes
        n_img = h.shape[1]
        h = torch.cat([h, self.text.expand(b, -1, -1)], 1)
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        h = h + self.fc2(F.gelu(self.fc1(h), approximate="tanh"))
        return self.out(h[:, :n_img]).unflatten(1, x.shape[1:4])


CFG = {"attn": {"min_tokens": 1, "first_n_dense_layers": 0, "top_keys": 0.5, "group": 16, "full_step_every": 4},
       "mlp": {"min_tokens": 1, "first_n_dense_layers": 0, "top_keys": 0.5, "block": 16, "full_step_every": 4},
       "step_signal": "calls"}


def _expected(site, n: int, grid: tuple, n_text: int):
    cg = site.call_grouping
    order, _ = image_order(GridInfo(grid, ""), cg.tile, cg.group)
    return site_perm(n, order, n_text, False)


def _graph_of(fn, *inputs):
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    torch.compile(fn, backend=backend, dynamic=True)(*inputs)
    return seen[0]


def test_merge_groups_reads_symbolic_merges_only():
    """A flatten of symbolic axes gives its groups; a split gives None."""
    gm = _graph_of(lambda x: x.flatten(1, 3).reshape(x.shape[0], -1, 2, 2) * 2, torch.randn(2, 3, 4, 5, 4))
    merges = [n for n in gm.graph.nodes if n.op == "call_method" and n.target in ("flatten", "reshape")]
    flat = symbolic_grid.merge_groups(merges[0])
    assert flat is not None and flat[1] == [[0], [1, 2, 3], [4]]
    assert symbolic_grid.merge_groups(merges[1]) is None  # a split (more axes out than in)


def test_axis_atoms_see_through_an_earlier_merge():
    """A per-frame conv's output (B·T, C, h, w): h and w merged first, then the frames and h·w
    merged into tokens (CogVideoX's order). The token merge shows (t, h, w), not (t, h·w). A local
    tile order (h/4, 4, w/4, 4) permuted to (h/4, w/4, 4, 4) and merged shows four atoms: no grid."""
    def per_frame(x):  # x: (B, T, C, H, W)
        b, t = x.shape[:2]
        y = x.reshape(b * t, *x.shape[2:]) * 2  # per frame, as the conv would see it
        y = y.view(b, t, *y.shape[1:]).flatten(3).transpose(2, 3)  # (B, T, h·w, C)
        return y.flatten(1, 2)  # (B, T·h·w, C)

    gm = _graph_of(per_frame, torch.randn(1, 3, 4, 12, 8))
    last = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "flatten"][-1]
    sizes, groups = symbolic_grid.merge_groups(last)
    atoms = [a for j in groups[1] for a in symbolic_grid.axis_atoms(last.args[0], j)]
    assert [symbolic_grid._hint(a) for a in atoms] == [3, 12, 8]
    tokens = [n for n in gm.graph.nodes if n.op == "output"][0].args[0][0].meta["example_value"].shape[1]
    grids = symbolic_grid.symbolic_grids(gm, [tokens], set(symbolic_grid.placeholder_symbols(gm)))
    assert [g.hint for g in grids] == [(3, 12, 8)]

    def tiled(x):  # x: (B, H, W, C) -> local 4×4 tiles, tile-major
        b, h, w, c = x.shape
        y = x.view(b, h // 4, 4, w // 4, 4, c).permute(0, 1, 3, 2, 4, 5)
        return y.reshape(b, h * w, c)

    gm = _graph_of(tiled, torch.randn(1, 12, 8, 4))
    tokens = [n for n in gm.graph.nodes if n.op == "output"][0].args[0][0].meta["example_value"].shape[1]
    assert symbolic_grid.symbolic_grids(gm, [tokens], set(symbolic_grid.placeholder_symbols(gm))) == []


def test_dynamic_true_groups_every_call_on_its_grid(fresh_dynamo):
    """Compiled with dynamic=True from the first call: the only grid source is the symbolic merge.
    Each size (one count at two aspect ratios among them) is grouped on its own grid, the text last;
    the dense first call is exact."""
    torch.manual_seed(0)
    model = ChannelsLastVideoDiT().eval()
    compiled = torch.compile(model, backend="chipmunk", dynamic=True, options={"config": CFG, "compiler": "eager"})
    counters.clear()
    with torch.no_grad():
        for size in ((2, 16, 12), (2, 12, 16), (3, 8, 8)):
            x = torch.randn(1, *size, 4)
            out, ref = compiled(x), model(x)
            if size == (2, 16, 12):
                assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
            sites = [s for ses in sessions_of(compiled) for s in ses.sites]
            assert len(sites) == 2 and all(s.call_grouping.sym_grid is not None for s in sites), \
                [s.grouping for s in sites]
            n = size[0] * size[1] * size[2] + 4
            for s in sites:
                perm, keep = s.call_grouping.for_count(n, s.session)
                assert torch.equal(perm, _expected(s, n, size, 4)), (size, s.path)
                if s.kind == "attention":
                    assert keep[-4:].all() and not keep[:-4].any()
    assert counters["chipmunk"]["grouping_ungrouped_count"] == 0
    assert all("(symbolic)" in s["grouping"] and "grid of each call from its sizes" in s["grouping"]
               for s in chipmunk_compile.stats(compiled)["sites"])



def test_dynamic_true_groups_a_joint_attention_whose_text_length_is_symbolic_too(fresh_dynamo):
    """SD3 compiled with dynamic=True from the first call: the text length is a symbol as well, so
    no part of the joint attention's cat([image, text]) has a static size. The image part is the
    one of the grid's size at the compiling call: the text is last, and each aspect ratio's joint
    attention is grouped on its own grid with the 8 text keys kept (it ran ungrouped)."""
    from helpers import sd3

    model = sd3()
    compiled = torch.compile(model, backend="chipmunk", dynamic=True, options={"config": CFG, "compiler": "eager"})
    counters.clear()
    with torch.no_grad():
        for i, (h, w) in enumerate(((16, 24), (24, 16))):
            x = dict(hidden_states=_r(1, 4, h, w), encoder_hidden_states=_r(1, 8, 32),
                     pooled_projections=_r(1, 64), timestep=torch.tensor([0.5]), return_dict=False)
            out, ref = compiled(**x)[0], model(**x)[0]
            if i == 0:
                assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
            n = (h // 2) * (w // 2) + 8
            joint = [s for ses in sessions_of(compiled) for s in ses.sites if s.kind == "attention"]
            assert joint, [s.grouping for ses in sessions_of(compiled) for s in ses.sites]
            for s in joint:
                perm, keep = s.call_grouping.for_count(n, s.session)
                assert torch.equal(perm, _expected(s, n, (h // 2, w // 2), 8)), ((h, w), s.path)
                assert keep[-8:].all() and not keep[:-8].any()
    assert counters["chipmunk"]["grouping_ungrouped_count"] == 0


def _set_size(key: str, kw: dict, size: tuple) -> None:
    if key == "ltx_video":  # tokens + the sizes as ints (its coordinate table is built from them)
        f, h, w = size
        kw.update(hidden_states=_r(1, f * h * w, 4), num_frames=f, height=h, width=w)
    elif key == "qwen_image":  # packed tokens + the grid as ints (its rotary table is built from them)
        h, w = size
        kw.update(hidden_states=_r(1, h * w, 16), img_shapes=[(1, h, w)])
    elif key == "cogvideox":  # (B, T, C, H, W): a per-frame conv, then frames and h·w merged
        kw["hidden_states"] = _r(1, 3, 4, *size)
    elif key == "kandinsky5":  # channels-last latent and per-axis rotary positions
        t, h, w = size
        kw.update(hidden_states=_r(1, t, h, w, 4),
                  visual_rope_pos=[torch.arange(t), torch.arange(h // 2), torch.arange(w // 2)])
    else:
        kw["hidden_states"] = _r(1, 4, *size)


@pytest.mark.parametrize("key,sizes,n_text", [
    ("ltx_video", ((3, 8, 8), (3, 6, 8), (3, 8, 6)), 0),  # coordinates (B, 3, t, h, w) flattened
    ("kandinsky5", ((3, 16, 16), (3, 12, 16), (3, 16, 12)), 0),  # channels-last latent, patch 1×2×2
    ("cosmos", ((3, 16, 16), (3, 12, 16), (3, 16, 12)), 0),
    ("cogvideox", ((16, 16), (12, 16), (16, 12)), 8),  # 8 text tokens first; grid t×h×w, not t×(h·w)
    # its 16 valid text tokens (last) are an unbacked count (nonzero()), in every graph: their side
    # is kept from the first graph's concat for the recompile
    ("mochi", ((3, 16, 16), (3, 12, 16), (3, 16, 12)), 16),
    ("prx", ((24, 24), (16, 24), (24, 16)), 0),  # image queries (over text + image keys)
    ("lumina_next", ((24, 24), (16, 24), (24, 16)), 0),
    # its tokens and its rotary table's sizes come from separate inputs: symbols Dynamo does not
    # relate at the third size, matched by the compiling call's sizes (8 text tokens first)
    ("qwen_image", ((10, 10), (8, 10), (10, 8)), 8)])
def test_new_resolutions_group_on_their_merged_grid(fresh_dynamo, key, sizes, n_text):
    """Automatic dynamic shapes: the second size recompiles with symbolic sizes, and the third reuses
    that graph. Each is grouped on its own grid, read from the symbolic merge per call."""
    case = arch_zoo.MODELS[key][1]()
    c = torch.compile(case.model, backend="chipmunk", options={"config": arch_zoo.CFG, "compiler": "eager"})
    kw = dict(case.kwargs)
    counters.clear()
    for i, size in enumerate(sizes):
        _set_size(key, kw, size)
        with torch.no_grad(), torch._dynamo.config.patch(**case.patches):
            c(**kw)
        if i == 0:
            continue
        grid = (tuple(size) if key in ("ltx_video", "qwen_image") else (3, size[0] // 2, size[1] // 2)
                if key == "cogvideox" else tuple(size[:-2]) + (size[-2] // 2, size[-1] // 2))
        n_img = grid[0] * grid[1] * (grid[2] if len(grid) == 3 else 1)
        sym = [s for ses in sessions_of(c) for s in ses.sites
               if s.call_grouping is not None and s.call_grouping.sym_grid is not None]
        checked = 0
        for s in sym:  # the perms of this size's calls (a third size may have recompiled once more)
            cg, n = s.call_grouping, n_img + n_text
            for (count, values), (perm, _) in cg.cache.items():
                if count == n and cg.sym_grid.grid.at(dict(zip(cg.sym_grid.grid.symbols, values))) == grid:
                    order, _ = image_order(GridInfo(grid, ""), cg.tile, cg.group)
                    first = key != "mochi"
                    assert torch.equal(perm, site_perm(n, order, n_text, first)), (size, s.path, s.grouping)
                    checked += 1
        assert checked >= 2, (size, [s.grouping for s in sym])
    assert counters["chipmunk"]["grouping_ungrouped_count"] == 0
    by_sizes = [s for s in sym if s.call_grouping.sym_grid.other]
    assert bool(by_sizes) == (key == "qwen_image"), [s.grouping for s in by_sizes]
    for s in by_sizes:  # matched by sizes: a call with another number of other tokens runs ungrouped, counted
        assert s.call_grouping.for_count(n_img + n_text + 1, s.session) == (None, None)
    assert counters["chipmunk"]["grouping_ungrouped_count"] == len(by_sizes)


def test_unet_levels_follow_new_resolutions(fresh_dynamo):
    """An SD-style U-Net (zoo row `unet2d`): its grid comes from a 1×1 conv inside the graph, and
    its middle level's from a merge of its own. At new resolutions (automatic dynamic shapes) each
    level's merge gives that level its grid per call: the latent's size at the outer level, half of
    it (rounded up) in the middle. Before, all 8 sites ran ungrouped at 24×16 after 16×16."""
    case = arch_zoo.MODELS["unet2d"][1]()
    c = torch.compile(case.model, backend="chipmunk", options={"config": arch_zoo.CFG, "compiler": "eager"})
    kw = dict(case.kwargs)
    counters.clear()
    for size in ((16, 16), (24, 16), (16, 20)):
        kw["sample"] = _r(1, 4, *size)
        with torch.no_grad():
            c(**kw)
    assert counters["chipmunk"]["grouping_ungrouped_count"] == 0
    sym = [s for ses in sessions_of(c) for s in ses.sites
           if s.call_grouping is not None and s.call_grouping.sym_grid is not None]
    assert len(sym) >= 8, [s.grouping for ses in sessions_of(c) for s in ses.sites]
    seen = set()
    for s in sym:
        cg = s.call_grouping
        for (n, values), (perm, _) in cg.cache.items():
            grid = cg.sym_grid.grid.at(dict(zip(cg.sym_grid.grid.symbols, values)))
            assert grid in {(24, 16), (16, 20), (12, 8), (8, 10)} and n == grid[0] * grid[1], (s.path, grid, n)
            order, _ = image_order(GridInfo(grid, ""), cg.tile, cg.group)
            assert torch.equal(perm, site_perm(n, order, 0, True)), (s.path, grid)
            seen.add((s.path.startswith("mid_block"), grid))
    assert seen == {(False, (24, 16)), (False, (16, 20)), (True, (12, 8)), (True, (8, 10))}, seen
