"""Spatial token grouping (method.md §3) without model edits: a `perm` per site from the graph.

Chipmunk's sparsity unit is a group of queries (attention) or a block of tokens (MLP) that share
one set of key columns / neurons. Groups of spatially close tokens share far more than groups of
raster-consecutive ones. Here the grouping is only a permutation (`Site.perm`, docs/design.md):
query group g = queries perm[g*G:(g+1)*G]; outputs stay in the original order.

Where the token grid comes from, in this order:
1. a Conv2d/Conv3d patch embedding whose output is flattened/transposed into a (B, N, C)-like
   token tensor (DiT, PixArt, SD3, Wan, HunyuanVideo, CogVideoX, Mochi). The view chain is
   followed symbolically, so per-frame 2-D convs whose batch is later unflattened into frames
   (CogVideoX, Mochi; Allegro, which does it after the (B*T, hw, C) token layout) give a t×h×w
   grid; size-1 axes are dropped (one video frame = an image). Several such embeddings joined on
   the token axis (FramePack's 4× / 2× history, clean frames and current latent; Helios) are one
   image stream of runs, each on its own conv's grid (`_conv_runs`), valid for the input shapes
   they were read at (a call with others runs ungrouped, counted: `CallGrouping`).
2. a position-id input (Flux style): a graph input of shape (N, 2|3|4) or (B, N, 2|3|4) whose rows
   are distinct integer positions filling a box, or whose rows at one end do, after or before a
   minority of other rows (a joint text + image table, Krea 2; the side of those rows is then the
   text side the grid knows); or whose rows are consecutive runs that each fill a box (an image and
   its reference images: FLUX.1 Kontext), one image stream tiled run by run. Its values are read
   once at compile time (the backend's example
   inputs are real tensors); the order then follows the actual positions, whatever order the
   tokens come in.
3. a (B, C, H, W) / (B, C, T, H, W) latent input patchified by views before a linear embedding
   (CogView4, Lumina2): the same view walk, from the graph input.
4. a reshape that merges 2-3 grid axes into the token axis (`_merged_grids`): a (B, T, H, W, C)
   channels-last token tensor flattened (Cosmos, Kandinsky 5), or a rotary table / coordinate
   tensor built on the grid in the graph and flattened to one row per token (Qwen-Image, LTX-Video);
   such tables of several images joined along the token axis (Qwen-Image-Edit) are one image
   stream of runs, each tiled on its own grid. In a graph with symbolic sizes such a merge is read
   symbolically (`symbolic_grid.py`), and each call's grid is evaluated from its size symbols.
5. the candidates of 1-3 seen in an earlier graph of the same model that found no grid for its
   own sites (a patchify or position-id computation before a graph break: Lumina2, Z-Image,
   HiDream, HunyuanVideo 1.5), kept on the outermost model's session, which the sessions of its
   submodules' frames read too; from a graph without sites also a rotary table of per-axis tables
   expanded over the grid and flattened to one row per token (`_table_grids`; NucleusMoE's
   rotary embedder runs in a graph of its own), or gathered row by row with index vectors that the
   graph computes from its inputs (`_indexed_table_grids`: evaluated at compile time and read as
   position ids; Qwen-Image 2.1).
6. `config.grouping.grid` (with `text_tokens` / `text_first`).
7. last, rotary-table inputs (cos/sin pairs or complex, `rotary_grid.py`) whose angles decode into
   integer positions, read like position ids: a block under regional compilation is passed the
   model's rotary embedding and nothing else that shows the grid (FLUX's image_rotary_emb; since
   session 41). Such a grid is not handed on to later graphs as an earlier graph's.
Else no grouping (perm None; the reason is reported in `Site.grouping`). A site graph that finds
no grid of its own reuses the grid of the model's previous site graph.

Order inside the image tokens (`tile_order`): 2-D grids in (8, 8) tiles, tile-major, each tile as
four 4×4 sub-tiles (raster of sub-tiles, raster inside), and when a site's group (attention) or
block (MLP) is k > 1 tiles, the tiles go in groups of k that are r×c boxes, as many as fit
(`tile_groups`; e.g. 3×1 boxes for groups of 192 on FLUX's 10-tile-wide grid); 3-D grids in
(4, 6, 8) voxels, voxel-major, raster inside (`config.grouping.tile` overrides; a tile axis longer
than the grid is clamped to it).
The part of the grid outside the full tiles (the "tail") follows in raster order, unpadded:
the t-remainder slab, then the h-remainder, then the w-remainder (method.md §3).

Non-grid ("text") tokens: a site with N_site = N_image + n tokens has n text tokens, before or after
the image tokens. Their side comes from the graph (a torch.cat along the token axis that joins an
N_image-token part with the rest, nested concats flattened, or a slice write of N_image tokens
into a token buffer, found upstream of the site's input; else a concat of N_site tokens in an
earlier graph of the model), else from the config. The
perm lists the image tokens first (so image groups start aligned to tiles), then the text tokens
whole, in their original order; text never splits a tile. When the side is unknown or the evidence
disagrees, the site is not grouped. `Site.always_keep` marks the text keys (attention sites, when
`attn.keep_text_keys`). Sites whose token count matches neither case get no perm.
A site whose token count is symbolic (dynamic shapes) gets a `CallGrouping` instead: the grid,
image order and text side are fixed here, the perm is built per count on that count's first call.
A static site whose grid came from this graph's position ids or rotary tables takes each
generation's grid from them (`ids_regrouping.py`: another aspect ratio of the same token count
runs the same graph). When the grid came from position-id inputs, that call's ids give the count its grid; when it came
from a conv patch embedding or a latent patchified by views, the size of that input in the call
does (conv arithmetic on shapes).

Invariants: pure analysis of the graph and of example-input values; the graph is never changed.
Every perm is a permutation of range(N_site), int32, on the CPU (the ops move it once).
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import weakref
import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import runtime, sequence_parallel, symbolic_grid
from .patterns.fx_utils import IDENTITY_METHODS, RESHAPE_METHODS, op_name, source_name

log = logging.getLogger("chipmunk_compile")

DEFAULT_TILE_2D = (8, 8)
DEFAULT_TILE_3D = (4, 6, 8)
SUBTILE_2D = (4, 4)

_CONV2D = {torch.conv2d, F.conv2d}
_CONV3D = {torch.conv3d, F.conv3d}
_CAT = {torch.cat, torch.concat, torch.concatenate}


# ---------------------------------------------------------------------------------------------
# Token orders
# ---------------------------------------------------------------------------------------------
def _raster(idx: torch.Tensor) -> torch.Tensor:
    return idx.reshape(-1)


def _box_shapes(k: int, tile: Sequence[int], rows: int, cols: int) -> list[tuple[int, int]]:
    """r×c boxes of k tiles that fit a rows×cols region, closest to square first (then wider)."""
    fits = [(r, k // r) for r in range(1, k + 1) if k % r == 0 and r <= rows and k // r <= cols]
    return sorted(fits, key=lambda rc: (max(rc[0] * tile[0], rc[1] * tile[1]) / min(rc[0] * tile[0], rc[1] * tile[1]),
                                        rc[0]))


def _pack_tiles(r0: int, c0: int, rows: int, cols: int, k: int, tile: Sequence[int], out: list) -> None:
    """Tile ids (row, col) of the region in groups of k that are boxes: the best box shape over
    the largest sub-region it tiles, then the strip to its right and the strip below, each packed
    the same way; tiles no box fits go last in raster order."""
    shapes = _box_shapes(k, tile, rows, cols)
    if not shapes:
        out += [(r0 + i, c0 + j) for i in range(rows) for j in range(cols)]
        return
    r, c = shapes[0]
    R, C = rows - rows % r, cols - cols % c
    for bi in range(0, R, r):
        for bj in range(0, C, c):
            out += [(r0 + bi + i, c0 + bj + j) for i in range(r) for j in range(c)]
    if cols > C:
        _pack_tiles(r0, c0 + C, R, cols - C, k, tile, out)
    if rows > R:
        _pack_tiles(r0 + R, c0, rows - R, cols, k, tile, out)


def tile_groups(tiles: Sequence[int], tile: Sequence[int], group: Optional[int]) -> Optional[list]:
    """The order of the 2-D tiles when a group of `group` tokens is k > 1 whole tiles: groups of k
    consecutive tiles are r×c boxes (`_pack_tiles`), as many as fit. None when `group` is not such
    a multiple or the order is plain tile-major anyway (1×k boxes on a grid k divides). Groups of
    3 tiles on a 4-tile-wide grid would otherwise straddle tile rows (not compact: worse than
    raster rows on the trained tiny DiT)."""
    area = tile[0] * tile[1]
    if not group or group % area or group // area < 2:
        return None
    order: list = []
    _pack_tiles(0, 0, tiles[0], tiles[1], group // area, tile, order)
    flat = [i * tiles[1] + j for i, j in order]
    return None if flat == list(range(len(flat))) else flat


def tile_order(grid: Sequence[int], tile: Optional[Sequence[int]] = None, group: Optional[int] = None) -> torch.Tensor:
    """Raster indices of a (h, w) or (t, h, w) grid in tile order, tail last (int64, (prod(grid),)).

    2-D: full (8, 8) tiles tile-major, each as 4×4 sub-tiles in raster-of-sub-tile order; with
    `group` (the site's tokens per query group / MLP block) a multiple k > 1 of the tile area, the
    tiles go in groups of k that are boxes (`tile_groups`); 3-D: full (4, 6, 8) voxels
    voxel-major, raster inside. Then the tail in raster order: the slab beyond the last full tile
    along the first axis, then along the second, then along the third."""
    grid = tuple(int(g) for g in grid)
    nd = len(grid)
    if nd not in (2, 3):
        raise ValueError(f"grid must be (h, w) or (t, h, w), got {grid}")
    tile = tuple(int(t) for t in (tile or (DEFAULT_TILE_2D if nd == 2 else DEFAULT_TILE_3D)))
    if len(tile) != nd:
        raise ValueError(f"tile {tile} does not fit grid {grid}")
    tile = tuple(max(1, min(t, g)) for t, g in zip(tile, grid))
    idx = torch.arange(math.prod(grid)).reshape(grid)
    full = tuple((g // t) * t for g, t in zip(grid, tile))
    parts = []
    body = idx[tuple(slice(0, f) for f in full)]
    if body.numel():
        if nd == 2:
            (H, W), (th, tw) = full, tile
            sh, sw = SUBTILE_2D
            if th % sh == 0 and tw % sw == 0 and (th, tw) != (sh, sw):
                v = body.reshape(H // th, th // sh, sh, W // tw, tw // sw, sw).permute(0, 3, 1, 4, 2, 5)
            else:
                v = body.reshape(H // th, th, W // tw, tw).permute(0, 2, 1, 3)
            order = tile_groups((H // th, W // tw), (th, tw), group)
            if order is not None:  # tiles (each one contiguous run) in groups that are boxes
                v = v.reshape(-1, th * tw)[torch.tensor(order)]
        else:
            (T, H, W), (tt, th, tw) = full, tile
            v = body.reshape(T // tt, tt, H // th, th, W // tw, tw).permute(0, 2, 4, 1, 3, 5)
        parts.append(v.reshape(-1))
    # tail: for axis a, the tokens inside the full range on axes < a and beyond it on axis a
    for a in range(nd):
        sl = tuple(slice(0, full[i]) for i in range(a)) + (slice(full[a], grid[a]),)
        parts.append(_raster(idx[sl]))
    out = torch.cat(parts)
    assert out.numel() == idx.numel()
    return out


def site_perm(n_site: int, img_order: torch.Tensor, n_text: int, text_first: bool) -> torch.Tensor:
    """(n_site,) int32: image tokens in `img_order` (indices into the image stream) first, then the
    n_text text tokens whole, in their original order."""
    n_img = img_order.numel()
    assert n_img + n_text == n_site
    off, txt0 = (n_text, 0) if text_first else (0, n_img)
    perm = torch.cat([img_order.long() + off, torch.arange(txt0, txt0 + n_text)])
    return perm.to(torch.int32)


def text_mask(n_site: int, n_text: int, text_first: bool) -> torch.Tensor:
    keep = torch.zeros(n_site, dtype=torch.bool)
    if n_text:
        if text_first:
            keep[:n_text] = True
        else:
            keep[n_site - n_text:] = True
    return keep


# ---------------------------------------------------------------------------------------------
# Grid inference
# ---------------------------------------------------------------------------------------------
@dataclass
class GridInfo:
    grid: tuple  # (h, w) or (t, h, w), size-1 axes dropped
    source: str  # for reports
    token_of_raster: Optional[torch.Tensor] = None  # image-stream token at each raster position
    text_first: Optional[bool] = None  # when the source knows it
    input_index: Optional[int] = None  # the graph input it was read from (a position-id input)
    conv: Optional[tuple] = None  # (kernel, stride, padding, dilation) of the patch-embedding conv
    # whose output dims, size-1 axes dropped, are `grid` in order: a new input size gives a new grid
    # (a latent patchified by views counts as a conv with kernel = stride = patch)
    size_input: Optional[str] = None  # that patchified input's name (a conv is found by its params)
    # the grid of this very call's latent (not of an earlier resolution): tokens past it are not
    # image tokens, however many (padding, text, reference images)
    exact: bool = False
    rotary: Any = None  # rotary_grid.RotaryDecoder when the grid came from rotary-table inputs
    # position ids that are several boxes one after another (an image and its reference images:
    # FLUX.1 Kontext): ((start, grid, token_of_raster or None), ...) over the whole image stream,
    # in stream order; `grid` is then the largest one's, for the tile's dimensionality and reports
    segments: Optional[tuple] = None
    # runs of conv-embedded token tensors (`_conv_runs`): ((graph input name, its shape), ...) of the
    # inputs those convs read, at compile time; a call whose inputs have other shapes has other runs,
    # which `run_rules` give: per run (its input's index in run_inputs, conv params, conv output
    # sizes at compile time), see `runs_for_shapes`
    run_inputs: Optional[tuple] = None
    run_rules: Optional[tuple] = None

    @property
    def n(self) -> int:
        if self.segments is not None:
            return sum(math.prod(g) for _, g, _ in self.segments)
        return math.prod(self.grid)

    def describe(self) -> str:
        if self.segments is not None:
            return f"{self.source} {' + '.join('×'.join(map(str, g)) for _, g, _ in self.segments)}"
        return f"{self.source} {'×'.join(map(str, self.grid))}"


def _val(node: Any) -> Any:
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get("example_value", node.meta.get("val"))


def _shape(node: Any) -> Optional[tuple]:
    """Static shape, or None. Symbolic sizes (dynamic shapes) give None: int() on a SymInt would
    specialize it and add a guard, so the symbolic graph would recompile at the next size."""
    v = _val(node)
    if not isinstance(v, torch.Tensor) or not all(isinstance(s, int) for s in v.shape):
        return None
    return tuple(v.shape)


def _dims(node: Any, hints: bool = False) -> Optional[tuple]:
    """Shape with None for each symbolic size (read without specializing it), or None. `hints`:
    a symbolic size as its value at the call that compiled the graph instead (no guard either)."""
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        return None
    return tuple(d if isinstance(d, int) else _hint(d) if hints else None for d in v.shape)


def _hint(d: Any) -> Optional[int]:
    """A SymInt's value at the compiling call (its hint), None when it has none (unbacked)."""
    hint = getattr(getattr(d, "node", None), "hint", None)
    try:
        return None if hint is None else int(hint)
    except (TypeError, ValueError):  # (a symbolic expression, not a number)
        return None


def _static(shape) -> bool:
    return shape is not None and all(isinstance(s, int) for s in shape)


# Layouts: a tensor's dims, each a tuple of atoms (label, size) in row-major order.
def _reshape_layout(layout: list, out_shape: tuple) -> Optional[list]:
    atoms = [a for d in layout for a in d if a[1] != 1]
    out, i = [], 0
    for s in out_shape:
        dim = []
        need = s
        while need > 1:
            if i >= len(atoms):
                return None
            label, size = atoms[i]
            if size <= need and need % size == 0:
                dim.append(atoms[i])
                need //= size
                i += 1
            elif size % need == 0:  # split the atom: outer part here, inner part next
                dim.append((label, need))
                atoms[i] = (label + "'", size // need)
                need = 1
            else:
                return None
        out.append(tuple(dim))
    return out if i == len(atoms) else None


def _dims_arg(node: fx.Node, first: int) -> list:
    rest = list(node.args[first:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    return rest


def _step_layout(node: fx.Node, src: fx.Node, layout: list) -> Optional[list]:
    """Layout of `node`'s output when it is a view-like op of `src`, else None."""
    name = op_name(node)
    if not node.args or node.args[0] is not src:
        return None
    nd = len(layout)
    out_shape = _shape(node)
    if out_shape is None:
        return None
    if name in IDENTITY_METHODS:
        return layout if out_shape == tuple(math.prod(a[1] for a in d) for d in layout) else None
    if name in ("transpose", "swapaxes"):
        a, b = (int(x) % nd for x in node.args[1:3])
        new = list(layout)
        new[a], new[b] = new[b], new[a]
        return new
    if name == "permute":
        dims = [int(d) % nd for d in _dims_arg(node, 1)]
        return [layout[d] for d in dims]
    if name in RESHAPE_METHODS:
        return _reshape_layout(layout, out_shape)
    return None


def _token_grid(layout: list, spatial: set) -> Optional[tuple[tuple, bool]]:
    """(grid, has_frames) when one dim holds all spatial atoms (plus at most one batch-split
    frame atom) and nothing else; else None."""
    for d in layout:
        labels = [a[0] for a in d]
        if not any(lab.rstrip("'") in spatial for lab in labels):
            continue
        if any(lab.startswith("c") for lab in labels):
            return None
        present = {lab.rstrip("'") for lab in labels}
        if not spatial <= present or len(d) > 3:
            return None
        if any(lab.endswith("'") and lab.rstrip("'") in spatial for lab in labels):
            return None  # a spatial axis was split: not a plain token grid
        frames = [lab for lab in labels if lab.startswith("n")]
        if len(frames) > 1:
            return None
        return tuple(a[1] for a in d), bool(frames)
    return None


def _conv_kind(gm: fx.GraphModule, node: fx.Node) -> Optional[str]:
    """'conv2d' / 'conv3d' for a conv call (function or module), else None."""
    if node.op == "call_function":
        return "conv2d" if node.target in _CONV2D else "conv3d" if node.target in _CONV3D else None
    if node.op == "call_module":
        return {torch.nn.Conv2d: "conv2d", torch.nn.Conv3d: "conv3d"}.get(type(gm.get_submodule(node.target)))
    return None


def _conv_grids(gm: fx.GraphModule) -> list[GridInfo]:
    out = []
    for node in gm.graph.nodes:
        kind = _conv_kind(gm, node)
        if kind is None:
            continue
        params, shape = conv_params(gm, node), _shape(node)
        for grid, frames in _follow_views(node, min_spatial=1):
            src = f"{kind} patch embed (per frame) t×h×w" if frames else f"{kind} patch embed {_axes(grid)}"
            own = not frames and shape is not None and grid == tuple(d for d in shape[2:] if d > 1)
            out.append(GridInfo(grid, src, conv=params if own else None))
    return _conv_runs(gm) + out


def _conv_token_views(gm: fx.GraphModule, depth: int = 6) -> dict:
    """{node: (grid, token axis, conv node)} for the views of each conv output (view-like ops only, up to
    `depth` of them) that hold its whole token grid in one dim, raster order of the grid as listed
    (size-1 axes dropped; 2 or 3 axes; not per frame)."""
    out: dict = {}
    for conv in gm.graph.nodes:
        shape = _shape(conv) if _conv_kind(gm, conv) is not None else None
        if shape is None or len(shape) not in (4, 5):
            continue
        layout = [(("n", shape[0]),), (("c", shape[1]),)] + [((f"s{i}", s),) for i, s in enumerate(shape[2:])]
        spatial = {f"s{i}" for i, s in enumerate(shape[2:]) if s > 1}
        frontier = [(conv, layout)]
        for _ in range(depth):
            nxt = []
            for src, lay in frontier:
                for user in src.users:
                    new = _step_layout(user, src, lay)
                    if new is None:
                        continue
                    nxt.append((user, new))
                    tg = _token_grid(new, spatial)
                    grid = tuple(g for g in tg[0] if g > 1) if tg is not None and not tg[1] else ()
                    if len(grid) in (2, 3):
                        axis = next(i for i, d in enumerate(new) if any(a[0].rstrip("'") in spatial for a in d))
                        out[user] = (grid, axis, conv)
            frontier = nxt
    return out


def _cat_part_nodes(n: fx.Node, depth: int = 4) -> Optional[list]:
    """The parts of a torch.cat node along a token axis, nested concats on the same axis flattened
    (FramePack joins cat(4x history, cat(2x history, cat(clean frames, current)))), each through row
    copies and casts; None for other nodes."""
    axis = _cat_axis(n)
    parts = n.args[0] if axis is not None and n.args else None
    if not isinstance(parts, (list, tuple)) or (axis[0] == axis[1] - 1 and axis[1] > 2):
        return None
    out: list = []
    for p in parts:
        p = _through(p, _ROW_COPIES, limit=4)
        inner = _cat_part_nodes(p, depth - 1) if depth > 0 and _cat_axis(p) == axis else None
        out.extend(inner if inner is not None else [p])
    return out


def _conv_runs(gm: fx.GraphModule) -> list[GridInfo]:
    """Grids of torch.cats that join 2 to MAX_SEGMENTS conv-embedded token tensors along their
    token axis: one image stream of runs, each on its own conv's grid (HunyuanVideo-FramePack embeds
    its 4× / 2× / 1× history latents and the current latent with four convs and joins them in that
    order, before the text). The outermost such concat is listed first; `_pick` scores them all."""
    views = _conv_token_views(gm)
    if len(views) < 2:
        return []
    out = []
    for node in reversed(gm.graph.nodes):
        parts = _cat_part_nodes(node)
        if parts is None or not 2 <= len(parts) <= MAX_SEGMENTS:
            continue
        found = [views.get(p) for p in parts]
        if any(f is None or f[1] != _cat_axis(node)[0] for f in found):
            continue
        grids = [g for g, _, _ in found]
        sources = [_conv_source(conv) for _, _, conv in found]
        inputs = tuple(dict.fromkeys(sources)) if None not in sources else None
        rules = [(conv_params(gm, conv), _shape(conv)) for _, _, conv in found]
        rules = (tuple((inputs.index(src), params, tuple(shape[2:])) for src, (params, shape) in zip(sources, rules))
                 if inputs is not None and all(p is not None and sh is not None for p, sh in rules) else None)
        out.append(GridInfo(max(grids, key=math.prod), f"conv patch embeds {node.name} in {len(grids)} runs",
                            segments=_segments_of(grids), run_inputs=inputs, run_rules=rules))
    return out


def runs_for_shapes(inputs: tuple, rules: tuple, shapes: tuple) -> Optional[tuple]:
    """The runs (`GridInfo.segments`) that the convs of `rules` make of inputs of these `shapes`
    (one per entry of `inputs`, the compile-time (name, shape) pairs), or None where a size does
    not follow. Per axis, the conv's own formula, or the input padded to a multiple of the stride
    first (FramePack pads its history latents to the kernel), whichever gave the compile-time size."""
    grids = []
    for idx, (kernel, stride, pad, dil), out_then in rules:
        then, now = inputs[idx][1][2:], shapes[idx][2:]
        if len(now) != len(kernel) or len(then) != len(kernel):
            return None
        out = []
        for x0, x, k, st, p, d, o in zip(then, now, kernel, stride, pad, dil, out_then):
            formula = lambda v: (v + 2 * p - d * (k - 1) - 1) // st + 1  # noqa: E731
            if formula(x0) == o:
                out.append(formula(x))
            elif -(-x0 // st) == o:  # padded to a multiple of the stride
                out.append(-(-x // st))
            else:
                return None
        grid = tuple(d for d in out if d > 1)
        if len(grid) not in (2, 3):
            return None
        grids.append(grid)
    return _segments_of(grids)


def _conv_source(conv: fx.Node, depth: int = 8) -> Optional[tuple]:
    """(name, shape) of the graph input a conv reads, through single-tensor ops (pads, casts, views:
    FramePack pads its history latents to the kernel), or None."""
    node = conv.args[0] if conv.args else None
    for _ in range(depth):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "placeholder":
            shape = _shape(node)
            return (_input_name(node), shape) if shape is not None and not _is_param(node) else None
        tensors = [a for a in node.all_input_nodes if isinstance(_val(a), torch.Tensor)]
        if len(tensors) != 1:
            return None
        node = tensors[0]
    return None


def run_input_indices(gm: fx.GraphModule, session=None, memo: Optional[dict] = None) -> Optional[list]:
    """Indices of the graph inputs whose shapes fix the runs of a conv-embedded image stream, for
    the backend to note per call; else None. This graph's own runs (the outermost concat), else the
    inputs of the same names and ranks that an earlier graph's runs read (that graph recompiled with
    symbolic sizes shows no runs, but its calls must still tell their shapes)."""
    runs = next((g for g in _graph_sources(gm, None, memo)[0]() if g.run_inputs), None)  # conv grids: runs first
    outer = outermost_session(session)
    inputs = runs.run_inputs if runs is not None else getattr(outer, "_chipmunk_run_inputs", None)
    if inputs is None:
        return None
    if runs is not None and outer is not None:
        outer._chipmunk_run_inputs = runs.run_inputs
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    idx = [_named_input(gm, name) for name, _ in inputs]
    if None in idx or any(_dims(places[i]) is None or len(_dims(places[i])) != len(shape)
                          for i, (_, shape) in zip(idx, inputs)):
        return None
    return idx


def _ints(v: Any, n: int) -> Optional[tuple]:
    if isinstance(v, int):
        return (v,) * n
    if isinstance(v, (list, tuple)) and len(v) == n and all(isinstance(x, int) for x in v):
        return tuple(v)
    return None


def conv_params(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple]:
    """(kernel, stride, padding, dilation) of a conv2d/conv3d node (function or module), each a
    tuple per spatial axis, or None (string padding, symbolic weight, anything unusual)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        n = mod.weight.dim() - 2
        vals = (tuple(mod.weight.shape[2:]), mod.stride, mod.padding, mod.dilation)
    else:
        weight = _shape(node.args[1]) if len(node.args) > 1 else _shape(node.kwargs.get("weight"))
        if weight is None:
            return None
        n = len(weight) - 2
        names = ("stride", "padding", "dilation")
        rest = [node.args[3 + i] if len(node.args) > 3 + i else node.kwargs.get(k, 0 if k == "padding" else 1)
                for i, k in enumerate(names)]
        vals = (weight[2:], *rest)
    out = tuple(_ints(v, n) for v in vals)
    return out if all(v is not None for v in out) else None


def conv_out_grid(conv: tuple, spatial: Sequence[int]) -> tuple:
    """The token grid a conv with `conv` params makes of an input with `spatial` sizes (size-1
    axes dropped, as GridInfo.grid)."""
    kernel, stride, pad, dil = conv
    out = [(x + 2 * p - d * (k - 1) - 1) // s + 1 for x, k, s, p, d in zip(spatial, kernel, stride, pad, dil)]
    return tuple(d for d in out if d > 1)


def _named_input(gm: fx.GraphModule, name: str) -> Optional[int]:
    """Index of the one non-parameter tensor input named `name` (its source name), or None (a
    symbolic size read from that input has the same source name: it is not a tensor)."""
    idx = [i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")
           if not _is_param(n) and isinstance(_val(n), torch.Tensor) and _input_name(n) == name]
    return idx[0] if len(idx) == 1 else None


def _conv_input(gm: fx.GraphModule, conv: tuple) -> Optional[int]:
    """Index of the graph input that the one conv with params `conv` reads (through casts), or None
    when there is no such conv, several, or its input is computed."""
    found = set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in gm.graph.nodes:
        if _conv_kind(gm, node) is None or conv_params(gm, node) != conv:
            continue
        src = _through(node.args[0], IDENTITY_METHODS)
        found.add(placeholders.index(src) if isinstance(src, fx.Node) and src.op == "placeholder" else None)
    return found.pop() if len(found) == 1 else None


def _axes(grid: tuple) -> str:
    return "t×h×w" if len(grid) == 3 else "h×w"


def _follow_views(start: fx.Node, min_spatial: int, extra_depth: int = 4) -> list[tuple[tuple, bool]]:
    """(grid, has_frames) token grids reached from `start`, an (N, C, *spatial) tensor of static
    shape with at least `min_spatial` spatial axes longer than 1 (a conv output or a latent
    input), through view-like users (breadth-first). Grids have their size-1 axes dropped and
    2 or 3 axes.

    The first token layout reached is a candidate. When it still has the batch (or batch x frames,
    for a per-frame 2-D conv) as a dim of its own, the walk goes on a few more view steps: a later
    unflatten of the batch into frames that are then merged into the token dim (Allegro:
    (B*T, hw, C) -> (B, T, hw, C) -> (B, T*hw, C)) gives a t×h×w candidate too, listed first. Only
    a rank-3 (batch, tokens, channels) layout counts for that, so a (B*N, C) flattening of batch
    and tokens is never taken for frames. `_pick` chooses by the sites' token counts."""
    shape = _shape(start)
    if shape is None or len(shape) not in (4, 5):
        return []
    layout = [(("n", shape[0]),), (("c", shape[1]),)] + [((f"s{i}", s),) for i, s in enumerate(shape[2:])]
    spatial = {f"s{i}" for i, s in enumerate(shape[2:]) if s > 1}
    if len(spatial) < min_spatial:
        return []
    frontier = [(start, layout)]
    first, framed = None, None
    seen: set = set()
    depth = 0
    while frontier and framed is None and (first is None or depth <= extra_depth):
        nxt = []
        for src, lay in frontier:
            for user in src.users:
                if user in seen:
                    continue
                seen.add(user)
                new = _step_layout(user, src, lay)
                if new is None:
                    continue
                tg = _token_grid(new, spatial)
                if tg is not None and len(tg[0]) >= 2 and math.prod(tg[0]) >= 4:
                    if first is None:
                        first = tg
                        if tg[1]:  # frames already merged into the tokens (CogVideoX, Mochi)
                            return _squeezed([tg])
                    elif tg[1] and len(new) == 3:
                        framed = tg
                        break
                nxt.append((user, new))
            if framed is not None:
                break
        frontier = nxt
        if first is not None:
            depth += 1
    return _squeezed([g for g in (framed, first) if g is not None])


def _squeezed(cands: list) -> list[tuple[tuple, bool]]:
    """(grid, has_frames) candidates with size-1 axes dropped; grids of 2 or 3 axes only."""
    out = []
    for grid, frames in cands:
        grid = tuple(g for g in grid if g > 1)
        if len(grid) in (2, 3):
            out.append((grid, frames))
    return out


def _patchify_grids(gm: fx.GraphModule) -> list[GridInfo]:
    """Grids of image/video latent inputs patchified by views alone (CogView4, Lumina2: (B, C, H, W)
    -> (B, C, H/p, p, W/p, p) -> permute -> (B, HW/p², C·p²) before a linear embedding): the same
    symbolic walk as for conv outputs, from a rank-4 (B, C, H, W) or rank-5 (B, C, T, H, W) graph
    input (not a parameter). A token dim made of the outer parts of the split spatial axes is the
    grid; the patch pixels go with the channels."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "placeholder" or _is_param(node):
            continue
        spatial = _shape(node)[2:] if _shape(node) is not None else ()
        for grid, _ in _follow_views(node, min_spatial=2):
            rule = _patch_rule(spatial, grid)
            out.append(GridInfo(grid, f"patchified input {_input_name(node)} {_axes(grid)}", conv=rule,
                                size_input=_input_name(node) if rule is not None else None))
    return out


def _patch_rule(spatial: tuple, grid: tuple) -> Optional[tuple]:
    """Conv params (kernel = stride = patch per axis) that turn `spatial` into `grid`, or None."""
    long = [i for i, d in enumerate(spatial) if d > 1]
    if len(long) != len(grid) or any(spatial[i] % g for i, g in zip(long, grid)):
        return None
    patch = [1] * len(spatial)
    for i, g in zip(long, grid):
        patch[i] = spatial[i] // g
    n = len(spatial)
    rule = (tuple(patch), tuple(patch), (0,) * n, (1,) * n)
    return rule if conv_out_grid(rule, spatial) == grid else None


def _merged_grids(gm: fx.GraphModule, counts: list[int]) -> list[GridInfo]:
    """Grids seen where a reshape merges 2-3 adjacent axes (size-1 axes aside) into one token axis
    of a site's size or less: tokens built channels-last from a (B, T, H, W, C) latent (Cosmos,
    Kandinsky 5) or a rotary table / coordinate tensor laid out on the grid and then flattened to
    one row per token (Qwen-Image (1, h, w, d) -> (hw, d); LTX-Video (B, 3, t, h, w) -> (B, 3, thw)).
    Rows of such a merge are in raster order of the merged axes, and the site's tokens are in the
    same order when the rotary rows meet them one for one.

    Guards against shape coincidences: the merged size is a site's token count or a part of a
    torch.cat that builds one (text + image), at least 4; each axis is wholly inside the merge; no other axis of the merge's input has a
    site's token count of at least a quarter of the merged size (a head merge (B, N, H, D) ->
    (B, N, H·D) has its tokens beside it; a short text count equal to a rotary width is no sign);
    no merged axis is itself a merge made just before (`_composite_axes`: a local-tile order).
    Distinct grids are listed once, by first appearance; `_pick` then scores them by the sites."""
    if not counts:
        return []
    top, sizes = max(counts), set(counts)
    joined = _joined_parts(gm, sizes)
    out, seen = [], set()
    merges: dict = {}  # merge node -> (its merged output axis, grid), whatever its size
    for node in gm.graph.nodes:
        found = _merge_layout(node)
        if found is None:
            continue
        src, layout = found
        for axis, d in enumerate(layout):
            grid = tuple(a[1] for a in d)
            n = math.prod(grid)
            if len(grid) not in (2, 3) or any("'" in a[0] for a in d) or not 4 <= n <= top:
                continue
            merged = {int(a[0][1:]) for a in d}
            if any(s in sizes and 4 * s >= n for i, s in enumerate(src) if i not in merged):
                continue  # its tokens are beside the merge
            if _composite_axes(node.args[0], merged):
                continue  # (tiles, tokens per tile): already a tiled order, not a raster grid
            if sequence_parallel.exchanged(node.args[0]):
                continue  # (ranks, tokens per rank) of a Ulysses all-to-all: shards, not a grid
            merges[node] = (axis, grid)
            if n not in sizes and n not in joined:
                continue  # neither a site's tokens nor the image part of a joined sequence
            if grid not in seen:
                seen.add(grid)
                out.append(GridInfo(grid, f"merged axes {node.name} {_axes(grid)}"))
    return _merged_runs(gm, merges, sizes | joined) + out


def _merged_grids_once(gm: fx.GraphModule, counts: list[int], memo: Optional[dict]) -> list[GridInfo]:
    """`_merged_grids`, computed once per set of counts with a `memo` (one per `assign_grouping`
    call: `infer_grid` and `_level_grids` both scan the graph's merges)."""
    if memo is None:
        return _merged_grids(gm, counts)
    key = ("merged", frozenset(counts))
    if key not in memo:
        memo[key] = _merged_grids(gm, counts)
    return memo[key]


def _merged_runs(gm: fx.GraphModule, merges: dict, sizes: set) -> list[GridInfo]:
    """Grids of torch.cats that join two or more merges (`_merged_grids`) along their merged axis
    into a site's token count (or the image part of one): the rotary tables of an image and its
    reference images laid one after the other (Qwen-Image-Edit's `img_shapes` of several entries),
    one image stream of several runs."""
    out = []
    for node in gm.graph.nodes:
        axis = _cat_axis(node)
        parts = node.args[0] if axis is not None and node.args else None
        if not isinstance(parts, (list, tuple)) or len(parts) < 2 or len(parts) > MAX_SEGMENTS:
            continue
        found = [merges.get(_through(p, _ROW_COPIES, limit=4)) for p in parts]
        if any(f is None or f[0] != axis[0] for f in found):
            continue
        grids = [g for _, g in found]
        if sum(math.prod(g) for g in grids) not in sizes:
            continue
        out.append(GridInfo(max(grids, key=math.prod), f"merged axes {node.name} in {len(grids)} runs",
                            segments=_segments_of(grids)))
    return out


def _segments_of(grids: list) -> tuple:
    """`GridInfo.segments` of runs on these grids, one after the other in raster order each."""
    starts = [sum(math.prod(g) for g in grids[:i]) for i in range(len(grids))]
    return tuple((start, g, None) for start, g in zip(starts, grids))


_ROW_COPIES = frozenset({"clone", "contiguous", "to", "detach", "_to_copy"})  # copies that keep a table's rows


def _through(node: Any, names, limit: Optional[int] = None) -> Any:
    """The node a chain of calls named in `names` (one input each: copies, casts) starts from,
    following at most `limit` of them."""
    steps = 0
    while (isinstance(node, fx.Node) and node.op in ("call_method", "call_function") and node.args
           and isinstance(node.args[0], fx.Node) and op_name(node) in names and (limit is None or steps < limit)):
        node, steps = node.args[0], steps + 1
    return node


def _merge_layout(node: fx.Node) -> Optional[tuple]:
    """(input shape, `_reshape_layout` of the output) when `node` is a view / reshape / flatten that
    merges axes (static shapes), else None."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if name not in ("view", "reshape", "flatten") or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src, dst = _shape(node.args[0]), _shape(node)
    if src is None or dst is None or len(src) <= len(dst):
        return None
    layout = _reshape_layout([((f"a{i}", s),) for i, s in enumerate(src)], dst)
    return (src, layout) if layout is not None else None


def _composite_axes(node: fx.Node, axes: set) -> bool:
    """Whether any of `axes` of `node` is itself a merge of two or more axes (of size > 1) by the
    reshape that made `node` (through `contiguous`). Kandinsky 6 SR orders its tokens by local
    tiles, (T/1, H/8, W/8, 1, 8, 8) -> (tiles, 64) -> tokens: the last merge's (tiles, 64) looks like
    a 2-D grid, but consecutive tokens are already 8x8 neighbourhoods."""
    while node.op == "call_method" and node.target == "contiguous":
        node = node.args[0]
    found = _merge_layout(node)
    return found is not None and any(len(found[1][i]) >= 2 for i in axes if i < len(found[1]))


def _broadcast_table(part: Any, depth: int = 3) -> bool:
    """A part of a rotary table: a per-axis table broadcast over the grid by `expand` (through views)."""
    for _ in range(depth):
        if not isinstance(part, fx.Node) or part.op != "call_method":
            return False
        if part.target == "expand":
            return True
        if part.target not in ("view", "reshape", "contiguous"):
            return False
        part = part.args[0]
    return False


def _table_grids(gm: fx.GraphModule) -> list[GridInfo]:
    """Grids of rotary tables built in a graph without sites (a rotary embedder behind a graph
    break: NucleusMoE; Wan under context parallelism): per-axis tables expanded over (t, h, w) /
    (h, w), joined along their last axis and flattened to one row per token, (…, h, w, d) -> (h·w, d)
    (size-1 axes around it aside: Wan's (1, t·h·w, 1, d)). Only this construction
    counts here (no site token counts to check a merge against); the sites of a later graph still
    pick such a grid by their counts (`_pick`)."""
    out = []
    for node in gm.graph.nodes:
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
        if name not in ("view", "reshape", "flatten") or not node.args:
            continue
        src, dst = node.args[0], _shape(node)
        axis = _cat_axis(src)
        shape = _shape(src)
        rows = tuple(d for d in dst if d != 1) if dst is not None else None  # Wan: (1, thw, 1, d)
        if axis is None or shape is None or rows is None or len(rows) != 2 or axis[0] != len(shape) - 1:
            continue
        grid = tuple(g for g in shape[:-1] if g > 1)
        if rows != (math.prod(shape[:-1]), shape[-1]) or len(grid) not in (2, 3) or math.prod(grid) < 16:
            continue
        if all(_broadcast_table(p) for p in src.args[0]) and grid not in {g.grid for g in out}:
            out.append(GridInfo(grid, f"rotary table {node.name} {_axes(grid)}"))
    return out


# What an index computation may contain to be evaluated at compile time (`_index_values`): building
# and indexing small integer tensors, never a mutation of a graph input.
_INDEX_FUNCS = {torch.tensor, torch.arange, torch.zeros, torch.ones, torch.full, torch.cat, torch.stack, torch.where,
                torch.repeat_interleave, operator.getitem, operator.setitem, operator.add, operator.sub,
                operator.mul, operator.floordiv, operator.mod, operator.neg}
_INDEX_METHODS = {"clone", "to", "long", "int", "view", "reshape", "flatten", "expand", "repeat", "unsqueeze",
                  "squeeze", "contiguous", "repeat_interleave", "flip", "add", "sub", "mul"}
_FRESH = {"clone", "tensor", "zeros", "ones", "full", "arange"}


def _index_values(gm: fx.GraphModule, example_inputs, targets: list, limit: int = 64) -> Optional[list]:
    """The values of `targets` (nodes of integer index tensors) computed from the graph's real
    example inputs by evaluating only their ancestors, when those are few and harmless (graph
    inputs, `_INDEX_FUNCS` / `_INDEX_METHODS`, slice writes only into tensors made in the graph)."""
    need, todo = {}, list(targets)
    while todo:
        n = todo.pop()
        if n in need:
            continue
        need[n] = True
        if len(need) > limit:
            return None
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", None)
        for u in n.users:  # a slice write into n happens before n is read: evaluate it too
            if u.op == "call_function" and u.target is operator.setitem and u.args[0] is n:
                if name not in _FRESH:
                    return None  # a write into a graph input or into a view of another tensor
                todo.append(u)
        if n.op == "placeholder":
            continue
        if not (n.op == "call_function" and n.target in _INDEX_FUNCS or n.op == "call_method" and name in _INDEX_METHODS):
            return None
        todo += [a for a in n.all_input_nodes]
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if example_inputs is None or len(example_inputs) < len(places):
        return None
    env = {p: v for p, v in zip(places, example_inputs)}
    if any(isinstance(env[p], torch.Tensor) and (isinstance(env[p], torch._subclasses.FakeTensor) or env[p].is_meta)
           for p in places if p in need):
        return None
    load = lambda a: fx.node.map_arg(a, lambda x: env[x])  # noqa: E731
    try:
        for n in gm.graph.nodes:
            if n not in need or n.op == "placeholder":
                continue
            args, kwargs = load(n.args), load(n.kwargs)
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs) if n.op == "call_method" else n.target(*args, **kwargs)
    except Exception:
        return None
    return [env[t] for t in targets]


def _indexed_table_grids(gm: fx.GraphModule, example_inputs) -> list[GridInfo]:
    """Grids of rotary tables gathered row by row: cat([T_0[i_0], T_1[i_1], ...], -1) with integer
    index vectors i_a of one length (Qwen-Image 2.1 builds them from the image shapes and a mask of
    the image tokens). The index vectors, evaluated at compile time, are position ids (N, 2-4):
    read like a position-id input (`_ids_grid`, text rows split off)."""
    out = []
    for node in gm.graph.nodes:
        axis = _cat_axis(node)
        if axis is None or axis[0] != axis[1] - 1 or not 2 <= len(node.args[0]) <= 4:
            continue
        idx = []
        for part in node.args[0]:
            if not (isinstance(part, fx.Node) and part.op == "call_function" and part.target is operator.getitem
                    and isinstance(part.args[1], fx.Node)):
                break
            v = _val(part.args[1])
            if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.dtype not in (torch.int32, torch.int64):
                break
            idx.append(part.args[1])
        if len(idx) != len(node.args[0]) or len({_shape(i) for i in idx}) != 1:
            continue
        vals = _index_values(gm, example_inputs, idx)
        if vals is None:
            continue
        res = _ids_grid(torch.stack([v.long() for v in vals], -1))
        if res is not None:
            out.append(_ids_info(res, f"rotary index {node.name}"))
    return out


def _joined_parts(gm: fx.GraphModule, sizes: set) -> set:
    """Token counts of the parts of every torch.cat along a token axis whose result has a site's
    token count: the image part of a joint text + image sequence is one of them."""
    parts: set = set()
    for node in gm.graph.nodes:
        cat = _token_cat(node)
        if cat is not None and cat[0] in sizes:
            parts.update(p for p in cat[1] if p is not None)
    return parts


def _input_name(node: fx.Node) -> str:
    name = source_name(node)
    keys = [k for k in name.replace('"', "'").split("'") if k and k[0].isalpha()] if name else []
    return keys[-1] if keys else node.name


def _is_param(node: fx.Node) -> bool:
    return "_parameters" in source_name(node) or "parameters_" in node.name


def _box(x: torch.Tensor) -> Optional[tuple[tuple, torch.Tensor]]:
    """(grid, raster index of each row) when the integer rows x (n, c) are distinct positions
    filling a box with 2 or 3 non-constant columns."""
    lo, hi = x.min(0).values, x.max(0).values
    ext = hi - lo + 1
    axes = [i for i in range(x.shape[1]) if ext[i] > 1]
    if len(axes) not in (2, 3):
        return None
    grid = tuple(int(ext[i]) for i in axes)
    n = x.shape[0]
    if math.prod(grid) != n:
        return None
    raster = torch.zeros(n, dtype=torch.long)
    for i in axes:
        raster = raster * int(ext[i]) + (x[:, i] - lo[i])
    if torch.unique(raster).numel() != n:
        return None
    return grid, raster


def _box_sizes(x: torch.Tensor) -> torch.Tensor:
    """For every k: the box volume of rows x[k:] over its non-constant columns (cumulative
    min/max from the end), or 0 when that suffix has not 2 or 3 such columns."""
    rev = x.flip(0)
    ext = (rev.cummax(0).values - rev.cummin(0).values + 1).flip(0)
    spread = (ext > 1).sum(1)
    vol = torch.where(ext > 1, ext, torch.ones_like(ext)).prod(1)
    return torch.where((spread == 2) | (spread == 3), vol, torch.zeros_like(vol))


MAX_SEGMENTS = 16


def _box_runs(x: torch.Tensor) -> Optional[tuple]:
    """((start, grid, raster), ...) when the rows x (n, c) are 2 to MAX_SEGMENTS consecutive runs
    that each fill a box, else None. The runs are where a column's value changes (an image's ids,
    then a reference image's with another frame index: FLUX.1 Kontext, FLUX.2), the column with
    the fewest runs that all are boxes; neighbouring runs that together fill a box are one (the
    frames of a video before a reference image). Not the longest prefix that fills a box: a
    reference as wide as the image would lend its first rows to a two-frame box with it."""
    n, best = x.shape[0], None
    for c in range(x.shape[1]):
        cuts = ((x[1:, c] != x[:-1, c]).nonzero().flatten() + 1).tolist()
        if not 1 <= len(cuts) < MAX_SEGMENTS or (best is not None and len(cuts) + 1 >= len(best)):
            continue
        bounds = [0, *cuts, n]
        if all(_box(x[a:b]) is not None for a, b in zip(bounds, bounds[1:])):
            best = list(zip(bounds, bounds[1:]))
    if best is None:
        return None
    merged = [best[0]]
    for a, b in best[1:]:
        if _box(x[merged[-1][0]:b]) is not None:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    if len(merged) < 2:
        return None
    return tuple((a, *_box(x[a:b])) for a, b in merged)


def _layout(info: GridInfo) -> tuple:
    """The grid and its runs' starts and grids (not their token orders, tensors): what tells two
    candidates apart."""
    return info.grid, tuple((start, grid) for start, grid, _ in info.segments or ())


def _largest_run(segments: tuple) -> tuple:
    """(grid, raster) of the run with the most tokens: the grid that stands for all of them."""
    return max(((g, r) for _, g, r in segments), key=lambda gr: math.prod(gr[0]))


def _integral(x: torch.Tensor) -> Optional[torch.Tensor]:
    """Position ids (N, c) as integers: each column that is not integral divided by its smallest
    step between distinct values, from its smallest value (FLUX.3's modular pipeline scales the
    image's h and w ids by its rope scale, 0.5: until session 49 such ids gave no grid); None when
    a column has no such step or does not become integral."""
    if not bool(torch.isfinite(x).all()):
        return None
    cols = []
    for c in x.unbind(-1):
        if not bool((c == c.round()).all()):
            values = c.unique()
            step = (values[1:] - values[:-1]).min() if values.numel() > 1 else None
            if step is None or step <= 0:
                return None
            c = (c - values[0]) / step
            if not bool(((c - c.round()).abs() < 1e-6).all()):
                return None
        cols.append(c.round())
    return torch.stack(cols, -1).long()


# columns of a position-id input: (h, w) pairs as research code passes them, Flux's (0, h, w),
# FLUX.2's (t, h, w, l); the constant ones are ignored (`_box`)
ID_COLUMNS = (2, 3, 4)


def _ids_grid(ids: torch.Tensor) -> Optional[tuple]:
    """(grid, raster index of each grid row, number of other rows, other rows first?[, segments])
    for position ids (N, c) / (B, N, c) with identical batch rows: all rows fill a box (Flux's
    img_ids); or they are consecutive runs that each fill one (`_box_runs`: an image and its
    reference images, FLUX.1 Kontext; `grid` is then the largest run's, `segments` all of them);
    or a run of rows at one end does and the rest are a minority of other positions (text rows of
    a joint table, e.g. Krea 2: text at the origin, then the image grid), the largest such run."""
    if ids.dim() == 3:
        if not bool((ids == ids[:1]).all()):
            return None
        ids = ids[0]
    if ids.dim() != 2 or ids.shape[-1] not in ID_COLUMNS or ids.shape[0] < 4:
        return None
    x = _integral(ids.detach().cpu().double())
    if x is None:
        return None
    whole = _box(x)
    if whole is not None:
        return (*whole, 0, None)
    segments = _box_runs(x)
    if segments is not None:
        return (*_largest_run(segments), 0, None, segments)
    n = x.shape[0]
    k = torch.arange(n)
    # other rows before the grid (the grid is a suffix x[j:]), then after it (a prefix x[:j+1]);
    # vol[j] is that run's box volume, part[j] its length; the longest run that fills its box wins
    for first, vol, part in ((True, _box_sizes(x), n - k), (False, _box_sizes(x.flip(0)).flip(0), k + 1)):
        ok = ((vol == part) & (part * 2 > n) & (part < n)).nonzero().flatten().tolist()
        for j in (ok if first else ok[::-1]):
            rows = x[j:] if first else x[:j + 1]
            box = _box(rows)
            if box is not None:
                return (*box, n - rows.shape[0], first)
    # runs of boxes beside a minority of equal rows (the joint table of a FLUX.1 Kontext block under
    # regional compilation, decoded from its rotary tables: text rows at the origin, then both images)
    # (the image's first position may equal theirs: the origin)
    for first, equal in ((True, int((x == x[0]).all(1).cumprod(0).sum())),
                         (False, int((x == x[-1]).all(1).flip(0).cumprod(0).sum()))):
        for same in (equal, equal - 1):
            if 0 < same and (n - same) * 2 > n:
                segments = _box_runs(x[same:] if first else x[:n - same])
                if segments is not None:
                    return (*_largest_run(segments), same, first, segments)
    return None


def _id_grids(gm: fx.GraphModule, example_inputs) -> list[GridInfo]:
    if example_inputs is None:
        return []
    out = []
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(places, example_inputs)):
        if not isinstance(value, torch.Tensor) or value.dim() not in (2, 3) or value.shape[-1] not in ID_COLUMNS:
            continue
        if isinstance(value, torch._subclasses.FakeTensor) or value.is_meta or _is_param(node):
            continue
        if value.is_complex() or value.dtype == torch.bool:
            continue
        try:
            res = _ids_grid(value)
        except Exception:
            res = None
        if res is not None:
            out.append(_ids_info(res, f"position ids input {_input_name(node)}"))
            out[-1].input_index = i
    return out


def _rotary_grids(gm: fx.GraphModule, example_inputs) -> list[GridInfo]:
    """Grids of the positions decoded from rotary-table inputs (rotary_grid.py): a block under
    regional compilation that is passed the model's rotary embedding (FLUX's image_rotary_emb)."""
    from .rotary_grid import rotary_decoders

    out = []
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for dec in rotary_decoders(gm, example_inputs):
        ids = dec.ids(example_inputs)
        res = _ids_grid(ids) if ids is not None else None
        if res is not None:
            names = [_input_name(places[i]) for i in dec.inputs]
            names = list(dict.fromkeys(n if n.isidentifier() else places[i].name  # a resumed frame's stack slot
                                       for n, i in zip(names, dec.inputs)))  # a tuple input: one name
            names = "/".join(names) + (" (cos, sin)" if len(dec.inputs) == 2 else "")
            out.append(_ids_info(res, f"rotary table input {names}"))
            out[-1].rotary = dec
    return out


def _ids_info(res: tuple, what: str) -> GridInfo:
    """GridInfo of an `_ids_grid` result; `what` names the source."""
    grid, raster, n_other, other_first = res[:4]
    joint = "" if not n_other else f" after {n_other} other rows" if other_first else f" before {n_other} other rows"
    if len(res) > 4:  # consecutive boxes: one image stream of several grids
        segments = tuple((start, g, _token_of_raster(r)) for start, g, r in res[4])
        return GridInfo(grid, f"{what}{joint} in {len(segments)} runs", None, other_first, segments=segments)
    return GridInfo(grid, f"{what}{joint} {_axes(grid)}", _token_of_raster(raster), other_first)


def _token_of_raster(raster: torch.Tensor) -> Optional[torch.Tensor]:
    """The token at each raster position (None: the tokens are in raster order)."""
    token_of_raster = torch.empty_like(raster)
    token_of_raster[raster] = torch.arange(raster.numel())
    return None if torch.equal(token_of_raster, torch.arange(raster.numel())) else token_of_raster


# ---------------------------------------------------------------------------------------------
# Text side from the graph
# ---------------------------------------------------------------------------------------------
def _cat_sides(node: fx.Node, n_site: int, n_img: int, limit: int = 200_000, own_grid: bool = False) -> set:
    """Sides ("first"/"last"/"mixed") of the non-image tokens seen in torch.cat nodes upstream of
    `node` that join an n_img-token part with others into n_site tokens along a token axis.
    `own_grid`: n_img is the image of the call that compiled this graph (not an earlier graph's)."""
    sides: set = set()
    seen = {node}
    stack = [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n.op == "call_function" and n.target in _CAT:
            side = _cat_side(n, n_site, n_img, own_grid)
            if side is not None:
                sides.add(side)
                continue  # the join is found on this path
        written = [_setitem_side(u, n, n_site, n_img) for u in n.users
                   if u.op == "call_function" and u.target is operator.setitem and u.args[0] is n]
        if any(w is not None for w in written):  # a buffer the tokens are written into (Lumina2)
            sides.update(w for w in written if w is not None)
            continue
        for inp in n.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                stack.append(inp)
    return sides


def _setitem_side(u: fx.Node, buf: fx.Node, n_site: int, n_img: int) -> Optional[str]:
    """Side of the non-image tokens when `buf[..., a:b, :] = image_tokens` writes n_img tokens
    into a (B, n_site, C) or (n_site, C) buffer (Lumina2 fills its joint sequence per batch item:
    `joint[i, :n_txt] = text[i]; joint[i, n_txt:n] = image[i]`); None for other writes."""
    shape = _shape(buf)
    idx = u.args[1] if len(u.args) > 1 else None
    if shape is None or len(shape) not in (2, 3) or shape[-2] != n_site:
        return None
    idx = idx if isinstance(idx, tuple) else (idx,)
    axis = len(shape) - 2
    if len(idx) <= axis or not isinstance(idx[axis], slice) or idx[axis].step not in (None, 1):
        return None
    a, b = idx[axis].start or 0, n_site if idx[axis].stop is None else idx[axis].stop
    if not (isinstance(a, int) and isinstance(b, int)) or b - a != n_img or not 0 <= a < b <= n_site:
        return None
    return "last" if a == 0 else "first" if b == n_site else "mixed"


def _token_cat(n: fx.Node, hints: bool = False) -> Optional[tuple[Optional[int], list]]:
    """(joined token count, each part's token count; None where unknown or symbolic, or with `hints`
    a symbolic one's value at the compiling call) when `n` is a torch.cat along a token axis (not the
    last axis of a rank > 2 tensor: channel concats), else None."""
    axis = _cat_axis(n)
    parts = n.args[0] if n.args else n.kwargs.get("tensors")
    if axis is None or not isinstance(parts, (list, tuple)):
        return None
    dim, rank = axis
    if dim == rank - 1 and rank > 2:
        return None
    out = _dims(n, hints)
    shapes = [_dims(p, hints) for p in parts]
    return out[dim], [s[dim] if s is not None and len(s) == rank else None for s in shapes]


def _cat_axis(n: Any) -> Optional[tuple[int, int]]:
    """(concat dim, rank) of a torch.cat node, else None; read from the ranks, so symbolic sizes
    are fine."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or n.target not in _CAT:
        return None
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    out = _dims(n)
    if out is None or not out or not isinstance(dim, int):
        return None
    return dim % len(out), len(out)


def _flat_token_cat(n: fx.Node, depth: int = 4, hints: bool = False) -> Optional[tuple[int, list]]:
    """`_token_cat` with parts that are themselves token concats (of the same rank and axis)
    replaced by their parts: HiDream joins cat([cat([image, text_a]), text_b])."""
    cat = _token_cat(n, hints)
    if cat is None or depth == 0:
        return cat
    parts = n.args[0] if n.args else n.kwargs.get("tensors")
    out: list = []
    for p, size in zip(parts, cat[1]):
        inner = _flat_token_cat(p, depth - 1, hints) if _cat_axis(p) == _cat_axis(n) else None
        out.extend(inner[1] if inner is not None and inner[0] == size else [size])
    return cat[0], out


def _side_of(sizes: list, n_img: int) -> Optional[str]:
    """Side of the non-image parts of a concat of part `sizes` around its n_img-token part: "first",
    "last", "mixed", or "repeat" when every part has the image's size (two token streams on the
    grid: Motif-Video's decoder blocks attend over cat(decoder tokens, encoder output))."""
    hits = [i for i, s in enumerate(sizes) if s == n_img]
    if len(sizes) >= 2 and len(hits) == len(sizes):
        return "repeat"
    if len(hits) != 1 or len(sizes) < 2:
        return "mixed" if len(hits) > 1 else None
    i = hits[0]
    return "first" if i == len(sizes) - 1 else "last" if i == 0 else "mixed"


def remember_joins(gm: fx.GraphModule, session) -> None:
    """Keep the token concats of this graph, flattened, on the outermost session: a later graph
    whose sites get the joined sequence as an input (HiDream's single-stream blocks, compiled as
    frames of their own) takes its text side from them."""
    if session is None:
        return
    joins = []
    for node in gm.graph.nodes:
        cat = _flat_token_cat(node)
        if cat is not None and cat[0] is not None and None not in cat[1] and len(cat[1]) > 1:
            joins.append((cat[0], tuple(cat[1])))
    session = outermost_session(session)
    if joins:
        kept = [j for j in getattr(session, "_chipmunk_token_joins", []) if j not in joins]
        session._chipmunk_token_joins = (kept + joins)[-64:]


def _earlier_sides(session, n_site: int, n_img: int) -> set:
    """Sides of the non-image tokens from earlier graphs' concats that built n_site tokens."""
    return {side for total, sizes in (_seen(session, "_chipmunk_token_joins") or [])
            if total == n_site and (side := _side_of(list(sizes), n_img)) is not None}


def _cat_side(n: fx.Node, n_site: Optional[int], n_img: int, own_grid: bool = False) -> Optional[str]:
    """Side of a concat that joins the n_img image tokens with others into n_site tokens; with
    n_site None (a symbolic site count), of a symbolic-length concat whose one part is the image."""
    cat = _flat_token_cat(n)
    if cat is None or cat[0] != n_site or (n_site is not None and None in cat[1]):
        return None
    side = _side_of(cat[1], n_img)
    if n_site is None and side in (None, "mixed") and len(cat[1]) >= 2 and None in cat[1]:
        # the part of the grid's size at the call that compiled the graph is the image, as a static
        # graph of that call sees it (where the grid is that call's: `own_grid`): with dynamic=True
        # the text length is symbolic too
        hinted = _flat_token_cat(n, hints=True)
        hinted = hinted[1] if hinted is not None and None not in hinted[1] and len(hinted[1]) == len(cat[1]) else None
        known = hinted is not None and own_grid
        if cat[1].count(None) == 1 and not (known and hinted[cat[1].index(None)] != n_img):
            # the one part of symbolic length is the image (a recompile after the resolution changed);
            # a static part of the old image size (FLUX.2's cached reference keys) is not
            side = _side_of([-1 if size is None else 0 for size in cat[1]], -1)
        elif known:  # (two streams of the grid, text on both sides: not read here)
            side = _side_of(hinted, n_img)
            side = side if side in ("first", "last") else None
    return side


# ---------------------------------------------------------------------------------------------
# Assignment
# ---------------------------------------------------------------------------------------------
def _token_node(match) -> Optional[fx.Node]:
    return match.q if match.kind == "attention" else match.x


def _site_token_dim(site):
    """The site's token count as traced: an int, a SymInt, or None without a token axis."""
    shape = site.shapes.get("q") if site.kind == "attention" else site.shapes.get("x")
    return shape[-2] if shape and len(shape) >= 2 else None


def _site_tokens(site) -> Optional[int]:
    n = _site_token_dim(site)
    return int(n) if isinstance(n, int) else None


def _site_token_hints(sites) -> list[int]:
    """The token counts of the call a graph was compiled for, where the sites' counts are symbolic."""
    dims = [_site_token_dim(s) for s in sites]
    hints = [getattr(n.node, "hint", None) for n in dims if isinstance(n, torch.SymInt)]
    return [h for h in hints if isinstance(h, int)]


def _site_score(n: int, grid_n: int) -> int:
    """How well a grid of `grid_n` tokens explains a site of `n`: 3 exactly, 2 as the larger part
    of it (grid + fewer other tokens: text), 1 as a minority of it, 0 not at all. The middle grade
    keeps the grid of a model with several patch embeddings (Helios, FramePack: one per history
    length, joined into one sequence) from going to the smallest one, which every site exceeds:
    with that one the rest of the sequence would be taken for text."""
    if n == grid_n:
        return 3
    if n > grid_n:
        return 2 if n - grid_n < grid_n else 1
    return 0


def _pick(cands: list[GridInfo], counts: list[int]) -> Optional[GridInfo]:
    """The candidate grid that explains the sites best (`_site_score` summed over them).
    With no concrete count (every site symbolic), the one grid the candidates agree on, if any."""
    if not counts:
        grids = {g.grid for g in cands}
        return cands[-1] if len(grids) == 1 else None
    best, best_score = None, 0
    for g in cands:
        score = sum(_site_score(n, g.n) for n in counts)
        if score > best_score:
            best, best_score = g, score
    return best


def _graph_sources(gm: fx.GraphModule, example_inputs, memo: Optional[dict] = None) -> tuple:
    """The grid sources that need no site token counts, in priority order (called lazily). With a
    `memo` (one per `assign_grouping` call) each is computed once: `infer_grid`, `_keep_candidates`
    and `run_input_indices` all read them."""
    memo = {} if memo is None else memo

    def once(key, fn):
        return lambda: memo[key] if key in memo else memo.setdefault(key, fn())

    return (once("conv", lambda: _conv_grids(gm)), once("ids", lambda: _id_grids(gm, example_inputs)),
            once("patchify", lambda: _patchify_grids(gm)))


def infer_grid(gm: fx.GraphModule, example_inputs, config, counts: list[int],
               memo: Optional[dict] = None) -> tuple[Optional[GridInfo], str]:
    """(grid info, why not) for the graph; `counts` are the sites' token counts."""
    gcfg = config.grouping
    for source in (*_graph_sources(gm, example_inputs, memo), lambda: _merged_grids_once(gm, counts, memo)):
        info = _pick(source(), counts)
        if info is not None:
            return info, ""
    if gcfg.grid is not None:
        grid = tuple(int(g) for g in gcfg.grid)
        grid = tuple(g for g in grid if g > 1)
        if len(grid) not in (2, 3):
            return None, f"config.grouping.grid {list(gcfg.grid)} has {len(grid)} axes longer than 1 (need 2 or 3)"
        return GridInfo(grid, f"config {_axes(grid)}", None, gcfg.text_first), ""
    why = "no conv patch embedding, position-id input, patchified latent input, rotary table input or config.grouping.grid"
    if example_inputs is None:
        why += " (input values not available)"
    return None, why


def _outward(session):
    """`session`, then the sessions of the models that contain its module, innermost first (a
    block compiled as its own frame after the model's graph break has a session of its own)."""
    while session is not None:
        yield session
        enclosing = getattr(session, "enclosing", None)
        session = enclosing() if enclosing is not None else None


def outermost_session(session):
    """The session of the outermost compiled model around `session` (None stays None)."""
    for session in _outward(session):
        pass
    return session


def _seen(session, attr: str):
    """What an earlier graph left on `session` or on an enclosing model's session."""
    return next((found for s in _outward(session) if (found := getattr(s, attr, None)) is not None), None)


# Grid candidates per compiled root model, for frames whose sessions share no enclosing session: a
# model whose own forward yields no graph (it only calls submodules, between graph breaks) gets no
# session, so its rotary embedder's frame and its blocks' frames have sessions unrelated by
# `enclosing` (NucleusMoE). The root is the outermost module on the Python stack that contains the
# frame's module, read while the frame compiles (the model's forward is running then).
_ROOT_CANDS: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


def _stack_root(session) -> Optional[torch.nn.Module]:
    """The outermost nn.Module on the call stack whose submodules include `session`'s module."""
    owner = session.owner() if session is not None and session.owner is not None else None
    return runtime.stack_root(owner) if owner is not None else None


def _root_candidates(session) -> list:
    root = _stack_root(session)
    return _ROOT_CANDS.setdefault(root, []) if root is not None else []


def _keep_candidates(gm: fx.GraphModule, example_inputs, gcfg, session, recipe: bool = True,
                     memo: Optional[dict] = None) -> None:
    """Remember the grids a graph shows (a graph before a break: the patch embedding) for the
    sites of a later graph, which `_pick` matches by token counts; on the outermost compiled model's
    session, which every nested frame's session reads through `_seen`. `recipe`: the first
    patch-embedding conv seen also becomes the model's latent recipe (`_latent_input`); only from a
    graph that found no grid of its own, as before candidates were kept from the others too."""
    if session is None or not gcfg.enabled:
        return
    extra = (lambda: _table_grids(gm), lambda: _indexed_table_grids(gm, example_inputs))
    cands = [g for source in (*_graph_sources(gm, example_inputs, memo), *extra) for g in source()]
    outer = outermost_session(session)  # a submodule's frame (a rotary embedder) may show the grid
    if cands:  # the latest few
        outer._chipmunk_grid_cands = (getattr(outer, "_chipmunk_grid_cands", []) + cands)[-16:]
        kept = _root_candidates(session)
        kept[:] = (kept + cands)[-16:]
    recipe = next((g for g in cands if g.conv is not None and g.input_index is None), None) if recipe else None
    if recipe is not None and getattr(outer, "_chipmunk_latent_recipe", None) is None:
        outer._chipmunk_latent_recipe = recipe  # the first model-level latent seen: see _latent_input


def _latent_input(gm: fx.GraphModule, session) -> Optional[int]:
    """Index of this graph's input that is the latent of the remembered recipe (a latent patchified
    by views or fed to a patch-embedding conv, seen in the model's first graph with a grid), or None.
    The backend keeps a reference to it per call (`_chipmunk_call_latent` on the outermost session):
    a later graph compiled for a new resolution takes its grid from that call's latent size, also
    when the graph that shows the patchify recompiled with symbolic sizes and shows no grid."""
    recipe = _seen(session, "_chipmunk_latent_recipe")
    if recipe is None:
        return None
    return _latent_index(gm, recipe)


def _latent_index(gm: fx.GraphModule, info: GridInfo) -> Optional[int]:
    """Index of the graph input that `info`'s conv (or patchify by views) reads: found by name or
    by the conv, and only a (B, C, *spatial) tensor with the conv's spatial rank (a later graph's
    token tensor may carry the latent's name)."""
    idx = _named_input(gm, info.size_input) if info.size_input else _conv_input(gm, info.conv)
    if idx is None:
        return None
    v = _val([n for n in gm.graph.nodes if n.op == "placeholder"][idx])
    return idx if isinstance(v, torch.Tensor) and v.dim() == 2 + len(info.conv[0]) else None


def _input_latent_grid(gm: fx.GraphModule, session, counts: list[int]) -> Optional[GridInfo]:
    """The remembered recipe's grid on this graph's latent input, from its sizes at compile time
    (hints of symbolic sizes, read without specializing them), if the sites' counts fit it; its
    `size_input` then gives each later count its own grid per call."""
    recipe = _seen(session, "_chipmunk_latent_recipe")
    idx = _latent_index(gm, recipe) if recipe is not None else None
    if idx is None:
        return None
    v = _val([n for n in gm.graph.nodes if n.op == "placeholder"][idx])
    dims = [d if isinstance(d, int) else getattr(d.node, "hint", None) for d in v.shape[2:]]
    if not all(isinstance(d, int) for d in dims):
        return None
    return _recipe_grid(recipe, dims, counts, exact=False)


def _latent_recorded(session) -> bool:
    return _seen(session, "_chipmunk_latent_recipe") is not None and _seen(session, "_chipmunk_call_latent") is not None


def _call_latent_grid(session, counts: list[int]) -> Optional[GridInfo]:
    """The remembered recipe's grid on the latent of the current call (recorded by an earlier graph
    of this model call), if the sites' token counts fit it."""
    recipe, x = _seen(session, "_chipmunk_latent_recipe"), _seen(session, "_chipmunk_call_latent")
    if recipe is None or not isinstance(x, torch.Tensor) or x.dim() != 2 + len(recipe.conv[0]):
        return None
    return _recipe_grid(recipe, tuple(int(d) for d in x.shape[2:]), counts, exact=True)


def _recipe_grid(recipe: GridInfo, spatial, counts: list[int], exact: bool) -> Optional[GridInfo]:
    """The recipe's conv applied to a latent of `spatial` sizes, as a candidate the sites' counts
    must fit (`exact`: the sizes are this call's, not the compiling call's)."""
    grid = _conv_grid(recipe.conv, spatial, len(recipe.grid))
    if grid is None:
        return None
    source = recipe.source.split(" (")[0] + (", this call's size" if exact else "")
    return _pick([GridInfo(grid, source, conv=recipe.conv, size_input=recipe.size_input, exact=exact)], counts)


def _conv_grid(conv: tuple, spatial, axes: Optional[int]) -> Optional[tuple]:
    """`conv_out_grid`, or None when it has another number of axes than the compiled grid (one
    frame compiled, several now: the token order is unknown)."""
    grid = conv_out_grid(conv, spatial)
    return grid if len(grid) == axes else None


def assign_grouping(gm: fx.GraphModule, example_inputs, pairs: list, config, session=None) -> dict:
    """Set `perm`, `always_keep` and `grouping` on every site of `pairs` ((match, site) tuples).

    Returns a summary dict (grid, source, tile, per-site decisions) for `Plan.grouping`; with
    "run_inputs" when this graph embeds an image stream of conv runs, whose inputs' shapes the
    backend notes per call (`CallGrouping` checks them against the compiled runs)."""
    memo: dict = {}  # the graph's grid sources, computed once for this call
    summary = _assign_grouping(gm, example_inputs, pairs, config, session, memo)
    runs = run_input_indices(gm, session, memo) if config.grouping.enabled else None
    if runs is not None:
        summary["run_inputs"] = runs
    return summary


def _assign_grouping(gm: fx.GraphModule, example_inputs, pairs: list, config, session, memo: dict) -> dict:
    gcfg = config.grouping
    sites = [s for _, s in pairs]
    if gcfg.enabled:
        remember_joins(gm, session)
    if not pairs:
        _keep_candidates(gm, example_inputs, gcfg, session, memo=memo)
        idx = _latent_input(gm, session) if gcfg.enabled else None
        return {"latent_input": idx} if idx is not None else {}
    if not gcfg.enabled:
        for s in sites:
            s.perm, s.always_keep, s.grouping = None, None, "none: grouping disabled"
        return {"source": "none: grouping disabled"}
    counts = [c for c in (_site_tokens(s) for s in sites) if c is not None]
    # symbolic counts (dynamic shapes): merges of symbolic grid axes give a grid per call
    sym_counts = [d for d in (_site_token_dim(s) for s in sites) if isinstance(d, torch.SymInt)]
    readable = functools.cache(lambda: symbolic_grid.placeholder_symbols(gm))
    sym_cands = functools.cache(lambda: symbolic_grid.symbolic_grids(gm, sym_counts, set(readable()))
                                if sym_counts else [])
    # symbolic counts (a recompile after the resolution changed) count with the sizes of the call that
    # compiled the graph, so its own grid is picked before an earlier graph's of another resolution
    info, why = infer_grid(gm, example_inputs, config, counts + _site_token_hints(sites), memo)
    # its sites (e.g. a text encoder's) may not be on the grid a later graph uses; and a grid found
    # for them may fit them by a coincidence of sizes (FramePack's 4 image-embed tokens and its 2×2
    # 4× history grid at toy sizes): a later graph then weighs the candidates against it
    _keep_candidates(gm, example_inputs, gcfg, session, recipe=info is None, memo=memo)
    earlier = _seen(session, "_chipmunk_grid")
    if info is None and earlier is not None:
        rivals = [g for g in (_seen(session, "_chipmunk_grid_cands") or []) if _layout(g) != _layout(earlier)]
        earlier = (_pick([earlier, *rivals], counts + _site_token_hints(sites)) if rivals else None) or earlier
    if info is None and earlier is None:  # candidates of an earlier graph without sites
        earlier = _pick(_seen(session, "_chipmunk_grid_cands") or _root_candidates(session),
                        counts or _site_token_hints(sites))
    sized = counts + _site_token_hints(sites)
    if info is None:
        # the latent of this call, an input of this graph (whose walk from it found nothing:
        # symbolic sizes) or recorded by an earlier graph of the same model call, has the grid of
        # this resolution; an earlier graph's grid (another resolution) only if it explains the
        # sites better
        latent = _input_latent_grid(gm, session, sized) or _call_latent_grid(session, sized)
        if latent is not None and (earlier is None or latent.grid != earlier.grid):
            earlier = _pick([g for g in (latent, earlier) if g is not None], sized)
    if info is None and earlier is not None:  # e.g. a graph after a graph break
        # (not its position-id input or rotary decoder: those index that graph's inputs)
        info = dataclasses.replace(earlier, source=earlier.source + " (earlier graph)", input_index=None, rotary=None)
    if info is None:  # last: the rotary tables a block is passed (regional compilation), read as ids
        info = _pick(_rotary_grids(gm, example_inputs), sized)
    sym_only = False
    if info is None and sym_cands():  # compiled with dynamic shapes from the start: only a symbolic merge
        found = tuple(h for h in sym_cands()[0].hint if h > 1)  # shows the grid (its sizes at this call)
        info = GridInfo(found, sym_cands()[0].source) if len(found) in (2, 3) else None
        sym_only = info is not None  # then a site that fits no symbolic merge has no grid at all
    if info is None:
        for s in sites:
            s.perm, s.always_keep, s.grouping = None, None, f"none: {why}"
        return {"source": f"none: {why}"}
    # (a grid from rotary tables is not handed on: a later graph of another resolution would take
    # it for its own, without the latent sizes the other sources follow per call)
    if session is not None and "earlier graph" not in info.source and info.rotary is None and not sym_only:
        session._chipmunk_grid = info
    eff_tile = _effective_tile(gcfg.tile, info.grid)
    orders: dict = {}

    def order_for(group):
        """(image order, key of that order: the group size when its tiles go in boxes, else None)."""
        if group not in orders:
            orders[group] = image_order(info, gcfg.tile, group)
        return orders[group]

    n_img = info.n
    desc = f"{info.describe()}, tile {'×'.join(map(str, eff_tile))}"

    # text side per token count: graph evidence from every site of that count, then config
    # (the first few sites of a count suffice: deeper sites repeat the same joins, at higher cost)
    sides_by_count: dict[int, set] = {}
    looked: dict[int, int] = {}
    for m, s in pairs:
        n = _site_tokens(s)  # None: a symbolic count, whose concats have symbolic lengths too
        if (n is None or n > n_img) and looked.get(n, 0) < 3:
            node = _token_node(m)
            if isinstance(node, fx.Node):
                found = _cat_sides(node, n, n_img, own_grid="earlier graph" not in info.source)
                sides_by_count.setdefault(n, set()).update(found)
                looked[n] = looked.get(n, 0) + bool(found)
    from_earlier = set()  # counts whose side comes from an earlier graph's concat
    for n in [c for c, found in sides_by_count.items() if not found and c is not None]:
        sides_by_count[n] = _earlier_sides(session, n, n_img)
        if sides_by_count[n]:
            from_earlier.add(n)
    cache: dict = {}
    decisions = []

    @functools.cache
    def regrouping():  # ids_regrouping.IdsRegrouping of this graph's ids or rotary tables, made once if asked
        from .ids_regrouping import IdsRegrouping

        return IdsRegrouping(info, gcfg.tile)

    shards = functools.cache(lambda: sequence_parallel.graph_sharding(gm, n_img))  # scans the graph once, if asked
    shard_sides: dict = {}  # text sides inside the shards, per token count (the first site's concat)
    # grids of their own for the counts the graph's grid does not explain (scans the graph once, if asked)
    # (none in a sequence-parallel graph: its sites see shards of the image stream)
    levels = functools.cache(lambda: {} if shards() is not None else
                             _level_grids(gm, counts, n_img, sides_by_count, info.grid, memo))
    # a conv-embedded grid: a symbolic count's grid follows the size of the conv's input per call
    shape_input = None
    if info.conv is not None and info.input_index is None:
        shape_input = _latent_index(gm, info)
    # no such input here (the patchify ran in an earlier graph): the latent that graph recorded
    call_latent = shape_input is None and info.conv is not None and _latent_recorded(session)
    # text side per site path, kept across graphs: a recompile with symbolic counts shows no concat
    # lengths, but the same module joins text and image the same way at every resolution
    outer = outermost_session(session)
    remembered_sides = getattr(outer, "_chipmunk_text_sides", {}) if outer is not None else {}
    remembered_text = getattr(outer, "_chipmunk_text_counts", {}) if outer is not None else {}
    # each level site's (scale, axes): a recompile with symbolic counts finds no merge of a known
    # count, and the module stays on its level at every resolution
    remembered_levels = getattr(outer, "_chipmunk_levels", {}) if outer is not None else {}
    if outer is not None:
        outer._chipmunk_text_sides, outer._chipmunk_text_counts = remembered_sides, remembered_text
        outer._chipmunk_levels = remembered_levels
    level_found = False
    sym_used: set = set()  # the size symbols the sites' symbolic grids read per call
    for m, s in pairs:
        n = _site_tokens(s)
        group = getattr(s.cfg, "group" if s.kind == "attention" else "block", None)
        img_order, key = order_for(group)
        keep_text = s.kind == "attention" and getattr(s.cfg, "keep_text_keys", False)
        boxes = f", {group // math.prod(eff_tile)}-tile groups as boxes" if key else ""
        if n is None and s.shapes:  # symbolic count: the permutation is built per call (CallGrouping)
            side, conflict = _text_side(sides_by_count.get(None, set()), info, gcfg, "text tokens")
            if side is None and not conflict:  # the side this site's text took in an earlier graph
                side = remembered_sides.get(s.path)
            elif side is not None and "earlier graph" not in info.source and symbolic_grid.beyond(
                    _site_token_dim(s), n_img):  # text beside this graph's own grid: kept for a recompile
                remembered_sides.setdefault(s.path, side)  # (Mochi's valid text tokens, an unbacked count)
            s.perm, s.always_keep = None, None
            sym = None  # a symbolic merge of this site's tokens, where no other source follows the call
            if info.input_index is None and shape_input is None and not call_latent and info.run_rules is None:
                sym = symbolic_grid.grid_for(_site_token_dim(s), sym_cands())
                sym_used.update(sym.grid.symbols if sym is not None else ())
            if sym is None and sym_only:  # (a text encoder's block: no grid holds its tokens)
                s.grouping = "none: its symbolic token count fits no merge of grid axes"
                decisions.append({"path": s.path, "kind": s.kind, "tokens": None, "grouping": s.grouping})
                continue
            s.call_grouping = CallGrouping(n_img, img_order, side, keep_text, gcfg.text_tokens, bool(conflict),
                                           ids_input=info.input_index, tile=gcfg.tile, group=group,
                                           shape_input=shape_input, conv=info.conv, img_grid=info.grid,
                                           call_latent=call_latent, run_inputs=info.run_inputs,
                                           run_rules=info.run_rules, level=remembered_levels.get(s.path),
                                           sym_grid=sym, rotary=info.rotary)
            if info.input_index is not None or info.rotary is not None:
                # ids or rotary tables of this graph: each generation's grid from its first call (the
                # per-count grid is the first call's of that count: 12×8 after 8×12 kept 8×12)
                s.regroup = (regrouping(), group, side, keep_text)
            where = (f", text {'first' if side else 'last'}" if side is not None else
                     f" (text: {conflict})" if conflict else " (text side from earlier concats of the call's count)")
            per_call = ("; grid of each new count from its call's ids" if info.input_index is not None else
                        f"; grid of each new count from its {'input' if info.size_input else 'conv input'}'s size"
                        if shape_input is not None else
                        "; grid of each new count from the call's latent (an earlier graph's input)"
                        if call_latent else "")
            if s.call_grouping.level is not None and (shape_input is not None or call_latent):
                where, per_call = "", (f"; a level of its own of each new count (the call's grid scaled by "
                                       f"2^-{s.call_grouping.level[0]})")
            if sym is not None:  # (a site of image tokens alone has no text side to tell)
                where = "" if sym.no_other else where
                by_sizes = f", {sym.other} other tokens" if sym.other else ""
                s.grouping = (f"{sym.grid.describe()}, tile per call's grid{boxes}, per call (symbolic token count)"
                              f"{where}{by_sizes}; grid of each call from its sizes")
            else:
                s.grouping = f"{desc}{boxes}, per call (symbolic token count){where}{per_call}"
            decisions.append({"path": s.path, "kind": s.kind, "tokens": None, "grouping": s.grouping})
            continue
        sides = sides_by_count.get(n, set())
        if not sides and n is not None and n > n_img and s.path in remembered_sides and (
                info.exact or n - n_img == remembered_text.get(s.path)):
            # no concat of n tokens in this graph or an earlier one (it recompiled with symbolic
            # lengths): the side this module's text took at an earlier resolution, as many tokens
            # (or any number past an exact grid: HiDream pads non-square images, then the text)
            sides = {"first" if remembered_sides[s.path] else "last"}
            side_note = " (text side of this module at an earlier resolution)"
        else:
            side_note = " (concat in an earlier graph)" if n in from_earlier else ""
        gathered = sequence_parallel.gathered_tokens(_token_node(m)) if s.kind == "attention" else None
        if gathered is not None and n is not None:  # Ulysses: every rank's shard, rank-major
            perm, keep, note = _decide_gathered(gathered, n, n_img, img_order, info, gcfg, shard_sides)
        elif n is not None and n < n_img and (sharding := shards()) is not None:  # one rank's shard
            perm, keep, note = _decide_shard(m, n, n_img, img_order, sharding, info, gcfg, cache, key, shard_sides)
        else:
            perm, keep, note = _decide(n, n_img, img_order, sides, info, gcfg, cache, key)
            if perm is None and n is not None and (level := levels().get(n)) is not None:
                s.perm, s.always_keep = _level_perm(level, n, group, gcfg, cache), None
                remembered_levels[s.path] = (_level_scale(info.grid, level.grid), len(level.grid))
                level_found = True
                level_tile = _effective_tile(gcfg.tile, level.grid)
                s.grouping = f"{level.describe()} (a level of its own), tile {'×'.join(map(str, level_tile))}"
                decisions.append({"path": s.path, "kind": s.kind, "tokens": n, "grouping": s.grouping})
                continue
            if perm is not None and (info.input_index is not None or info.rotary is not None):
                # ids or rotary tables of this graph: re-read per generation
                s.regroup = (regrouping(), group, None if keep is None else bool(keep[0]), keep_text)
        if keep is not None and 0 < int(keep.sum()) < keep.numel():  # text found: first or last
            remembered_sides[s.path], remembered_text[s.path] = bool(keep[0]), int(keep.sum())
        s.perm = perm
        s.always_keep = keep if keep_text else None
        if perm is not None:
            note += side_note
        s.grouping = f"{desc}{boxes}{note}" if perm is not None else f"none: {note}"
        decisions.append({"path": s.path, "kind": s.kind, "tokens": n, "grouping": s.grouping})
    if level_found and outer is not None and info.conv is not None and info.input_index is None \
            and "earlier graph" not in info.source and getattr(outer, "_chipmunk_latent_recipe", None) is None \
            and _latent_index(gm, info) is not None:
        # a multi-resolution model: a recompile for another resolution sees symbolic conv sizes and
        # would score this resolution's grids (its levels among them) against its new counts; the
        # latent's recipe gives it the grid of its own latent instead, and its levels from that
        outer._chipmunk_latent_recipe = info
    summary = {"source": info.source, "grid": list(info.grid), "tile": list(eff_tile), "sites": decisions}
    if sym_used:  # where the backend reads them from each call's inputs (host ints)
        summary["symbol_readers"] = tuple((sym, *readable()[sym]) for sym in sorted(sym_used, key=str))
    return summary


def _level_scale(grid: tuple, level: tuple) -> Optional[int]:
    """k when `level` is `grid` scaled by 2^-k (k != 0, either sign) on its last two (spatial) axes,
    rounded either way (a stride-2 conv of an odd side), with the frame axis of a 3-D level kept or
    scaled: what a U-Net's downsampling gives; else None. A text or pooling merge that happens to
    have a site's count (Mochi's 16 caption tokens as an 8×2 merge) is no level."""
    if len(level) > len(grid) or len(level) < 2:
        return None

    def scaled(a, b, s):  # b is a scaled by 2^-s
        return b in (a >> s, -(-a >> s)) if s > 0 else a in (b >> -s, -(-b >> -s))

    for s in (k for k in range(-4, 5) if k):
        if all(scaled(a, b, s) for a, b in zip(grid[-2:], level[-2:])):
            if len(level) == 2 or any(level[0] == grid[0] or scaled(grid[0], level[0], t) for t in range(-4, 5)):
                return s
            return None
    return None


def _a_level_of(grid: tuple, level: tuple) -> bool:
    return _level_scale(grid, level) is not None


def _scaled_levels(grid: tuple, k: int, dims: int) -> set:
    """The grids that level k (`_level_scale`) of `grid` may be, with `dims` axes: each spatial side
    rounded down or up; a 3-D level keeps the frames (a level that scaled them is not followed)."""
    sides = [{a >> k, -(-a >> k)} if k > 0 else {a << -k} for a in grid[-2:]]
    lead = tuple(grid[:-2]) if dims == len(grid) else ()
    return {lead + (h, w) for h in sides[0] for w in sides[1]}


def _level_grids(gm: fx.GraphModule, counts: list[int], n_img: int, sides_by_count: dict, grid: tuple,
                 memo: Optional[dict] = None) -> dict:
    """{token count: GridInfo} for site counts that the graph's grid of `n_img` tokens does not
    explain but a reshape of the graph merges into exactly (`_merged_grids`): the lower levels of a
    U-Net or an hourglass DiT, each an (h, w) or (t, h, w) grid of its own in raster order, the
    graph's `grid` scaled by a power of two (`_a_level_of`). Only exact counts, and only where no
    concat joins other tokens to them (text on the main grid keeps its own rules); a count with two
    different such grids gets none (which one is unknown). The caller asks only of graphs that are not
    sequence-parallel."""
    others = {c for c in counts if c != n_img and c > 0}
    if not others:
        return {}
    # (all the sites' counts, so that the guards against tokens beside a merge see the grid's too)
    cands = [g for g in _merged_grids_once(gm, sorted(set(counts)), memo)
             if g.segments is None and g.n in others and not sides_by_count.get(g.n) and _a_level_of(grid, g.grid)]
    out = {}
    for g in cands:
        if len({c.grid for c in cands if c.n == g.n}) == 1:
            out.setdefault(g.n, g)
    return out


def _level_perm(level: GridInfo, n: int, group, gcfg, cache: dict) -> torch.Tensor:
    key = ("level", n, level.grid, group)
    if key not in cache:
        order, _ = image_order(level, gcfg.tile, group)
        cache[key] = site_perm(n, order, 0, True)
    return cache[key]


def _effective_tile(tile_cfg, grid: tuple) -> tuple:
    """The tile for `grid`: the config's (if of the grid's dimensionality) or the default, each
    axis clamped to the grid."""
    tile = tile_cfg if tile_cfg is not None and len(tile_cfg) == len(grid) else None
    tile = tuple(tile) if tile else (DEFAULT_TILE_2D if len(grid) == 2 else DEFAULT_TILE_3D)
    return tuple(max(1, min(t, g)) for t, g in zip(tile, grid))


def image_order(info: GridInfo, tile_cfg, group) -> tuple:
    """(image-token order of the grid, the group size when its tiles go in boxes else None). Several
    runs (`info.segments`): each run's own tile order, the runs in stream order."""
    if info.segments is not None:
        parts, keys = [], set()
        for start, grid, token_of_raster in info.segments:
            order, key = image_order(GridInfo(grid, "", token_of_raster), tile_cfg, group)
            parts.append(order + start)
            keys.add(key)
        return torch.cat(parts), (group if group in keys else None)
    eff_tile = _effective_tile(tile_cfg, info.grid)
    tiles = tuple(g // t for g, t in zip(info.grid, eff_tile))
    key = group if len(eff_tile) == 2 and tile_groups(tiles, eff_tile, group) is not None else None
    raster = tile_order(info.grid, eff_tile, key)
    return (raster if info.token_of_raster is None else info.token_of_raster[raster]), key


def _text_side(sides: set, info: GridInfo, gcfg, what: str) -> tuple[Optional[bool], str]:
    """(text first?, "") from the graph's concat evidence `sides`, else the config / grid source;
    (None, why) when they conflict; (None, "") when nothing tells. `what` names the text tokens."""
    if len(sides) > 1 or "mixed" in sides or "repeat" in sides:
        return None, f"{what} on both sides / between image tokens"
    graph = None if not sides else next(iter(sides)) == "first"
    cfg = gcfg.text_first if gcfg.text_first is not None else info.text_first
    if graph is not None and cfg is not None and graph != cfg:
        return None, f"config text_first={cfg} contradicts the graph's concat order"
    return (graph if graph is not None else cfg), ""


class CallGrouping:
    """Grouping of a site whose token count is symbolic (Dynamo's dynamic shapes): the image order
    and text side are known at compile time, the count only per call. `for_count(n, session)`
    builds (perm, always_keep) for n once, on that count's first call, and caches them on the host
    (a perm never changes for a count and input size, so recorded CUDA graphs keep one order).
    When the graph's grid came from a position-id input (`ids_input`), the first call of a count
    reads that input's values (`session._chipmunk_call_ids`, set by the backend per call; one host
    copy per new count, never while a CUDA graph records) and takes its grid: a later resolution
    is grouped on its own grid (an aspect ratio of an earlier count keeps that count's perm).
    Otherwise the compile-time grid: n == n_img has no text, n > n_img needs the text side (from
    the graph, the config, or an earlier graph's concat of n tokens, unless the graph's own
    evidence conflicts) and fewer other tokens than image tokens (as `_site_score` asks of a grid
    at compile time: a larger resolution must not pass its extra image tokens off as text).
    When it came from a conv patch embedding or a latent input patchified by views (`shape_input`,
    `conv`), the first call of a count takes the grid from the size of that input
    (`session._chipmunk_call_conv_input`, shapes only: no host copy, no sync), if it has as many
    axes as the compiled grid; when an earlier graph of the model call took that latent
    (`call_latent`), from the size of the latent it recorded (`_chipmunk_call_latent`). A grid
    from this graph's own conv input is cached per (count, input size), so an aspect ratio with
    an earlier count (10×8 after 8×10) gets its own grid (since session 40); the others stay per
    count (ids: telling the ratios apart would read the ids on every call; a recorded latent:
    not in this graph's step-graph signatures). The caches a call reads were filled in its
    generation, which begins with a dense step, so a perm that changes with the size between
    generations rebuilds them in its order.
    A site that was on a level of its own at an earlier resolution (`_level_grids`; remembered per
    module path with its scale) takes that level of the grid of the call's input size.
    Where none of these follows the call, a merge of grid axes with symbolic sizes whose tokens
    are the site's (`sym_grid`, a `symbolic_grid.Fit`) gives the grid of each call: its sizes at the
    call's size symbols (`session._chipmunk_call_symbols`, host ints the backend reads from the
    call's inputs), cached per (count, symbol values).
    A count that fits neither gives (None, None): those calls run ungrouped, as any unknown layout
    does, counted as `grouping_ungrouped_count` and logged once per count."""

    def __init__(self, n_img: int, img_order, text_first: Optional[bool], keep_text: bool, text_tokens,
                 text_conflict: bool = False, *, ids_input: Optional[int] = None, tile=None, group=None,
                 shape_input: Optional[int] = None, conv: Optional[tuple] = None, img_grid: Optional[tuple] = None,
                 call_latent: bool = False, run_inputs: Optional[tuple] = None, run_rules: Optional[tuple] = None,
                 level: Optional[tuple] = None, sym_grid=None, rotary=None):
        self.n_img, self.img_order, self.text_first = n_img, img_order, text_first
        self.sym_grid = sym_grid  # symbolic_grid.Fit: the grid of each call from its size symbols
        self.rotary = rotary  # rotary_grid.RotaryDecoder: a new count's grid from its call's tables
        self.level = level  # (scale k, axes) of a site on a level of its own (`_level_scale`)
        self.run_inputs, self.run_rules = run_inputs, run_rules
        self.run_shapes = tuple(sh for _, sh in run_inputs) if run_inputs else None
        self.keep_text, self.text_tokens, self.text_conflict = keep_text, text_tokens, text_conflict
        self.ids_input, self.tile, self.group = ids_input, tile, group
        self.shape_input, self.conv, self.call_latent = shape_input, conv, call_latent
        self.grid_axes = len(img_grid) if img_grid is not None else None
        self.cache: dict = {}

    def for_count(self, n: int, session) -> tuple:
        if self.sym_grid is not None:  # per call's size symbols (`session._chipmunk_call_symbols`)
            values = getattr(session, "_chipmunk_call_symbols", None) or {}
            key = (n, tuple(values.get(sym) for sym in self.sym_grid.grid.symbols))
            hit = self.cache.get(key)
            if hit is None:
                hit = self.cache[key] = self._from_symbols(n, values, session)
                if hit[0] is None:
                    _ungrouped(n, self.n_img)
            return hit
        # 8×10 and 10×8 latents: one count, two grids. Only for a conv input of this very graph:
        # its shape is part of every step graph's signature, so no recording made for one size
        # replays for the other (a latent an earlier graph took is not: read on a miss only)
        own = self._input_size(session) if self.shape_input is not None else None
        key = n if own is None else (n, own)
        runs_now = _seen(session, "_chipmunk_call_run_shapes") if self.run_shapes is not None else None
        if self.run_shapes is not None and runs_now != self.run_shapes:
            # runs of conv-embedded grids whose inputs have other shapes in this call (another
            # resolution of FramePack's latents): the runs the convs make of them, else (shapes not
            # noted, sizes that do not follow) ungrouped, counted
            key = (n, runs_now)
            if key not in self.cache:
                self.cache[key] = self._from_run_shapes(n, runs_now, session)
                if self.cache[key][0] is None:
                    _ungrouped(n, self.n_img)
            return self.cache[key]
        hit = self.cache.get(key)
        if hit is None:
            size = own if self.shape_input is not None else self._input_size(session)
            hit = (self._from_call_ids(n, session) or self._from_conv_input(n, size, session)
                   or self._build(n, self.n_img, self.img_order, self.text_first, session))
            self.cache[key] = hit
            if hit[0] is None:
                _ungrouped(n, self.n_img)
        return hit

    def orders_cached(self, n: int) -> list:
        """The (perm, always_keep) pairs this grouping built for calls of n tokens so far (one per
        grid or size it met at that count), without grouping anything."""
        return [hit for key, hit in self.cache.items() if (key if isinstance(key, int) else key[0]) == n]

    def _input_size(self, session) -> Optional[tuple]:
        """The spatial size of this call's conv-embedded or patchified latent (shapes only), when the
        grid comes from it; else None."""
        if self.conv is None:
            return None
        x = (getattr(session, "_chipmunk_call_conv_input", None) if self.shape_input is not None else
             _seen(session, "_chipmunk_call_latent") if self.call_latent else None)
        if not isinstance(x, torch.Tensor) or x.dim() < len(self.conv[0]):
            return None
        return tuple(x.shape[x.dim() - len(self.conv[0]):])

    def _from_call_ids(self, n: int, session) -> Optional[tuple]:
        """(perm, keep) on the grid of this call's position ids (or of the positions its rotary tables
        decode to), or None (no ids, no grid in them)."""
        ids = getattr(session, "_chipmunk_call_ids", None) if self.ids_input is not None else None
        tables = getattr(session, "_chipmunk_call_rotary", None) if self.rotary is not None else None
        if not isinstance(ids, torch.Tensor) and tables is None:
            return None
        if runtime.RECORDING is not None:  # reading values syncs: the count's first call runs eagerly
            raise runtime.NeedsEagerCall("grid of a new token count not read yet")
        if tables is not None:  # the rotary tables a block is passed (regional compilation), decoded
            try:
                ids = self.rotary.ids_of(tables)
            except Exception:  # noqa: BLE001 — tables that decode to no positions: no grid from them
                ids = None
            if ids is None:
                return None
        res = _ids_grid(ids)
        if res is None:
            return None
        info = _ids_info(res, "position ids")
        order, _ = image_order(info, self.tile, self.group)
        first = self.text_first if self.text_first is not None else info.text_first
        hit = self._build(n, info.n, order, first, session)
        return hit if hit[0] is not None else None

    def _from_symbols(self, n: int, values: dict, session) -> tuple:
        """(perm, keep) on the symbolic merge's grid at this call's size symbols, or (None, None)."""
        fit = self.sym_grid
        if not all(sym in values for sym in fit.grid.symbols):
            return None, None
        grid = fit.grid.at({sym: values[sym] for sym in fit.grid.symbols})
        if grid is None or fit.other is not None and n - math.prod(grid) != fit.other:
            return None, None
        order, _ = image_order(GridInfo(grid, "symbolic merge"), self.tile, self.group)
        return self._build(n, math.prod(grid), order, self.text_first, session, exact=True)

    def _from_run_shapes(self, n: int, shapes: Optional[tuple], session) -> tuple:
        """(perm, keep) on the runs of this call's input shapes, or (None, None)."""
        segments = runs_for_shapes(self.run_inputs, self.run_rules, shapes) \
            if shapes is not None and self.run_rules is not None else None
        if segments is None:
            return None, None
        info = GridInfo(_largest_run(segments)[0], "conv runs of the call", segments=segments)
        order, _ = image_order(info, self.tile, self.group)
        return self._build(n, info.n, order, self.text_first, session, exact=True)

    def _from_conv_input(self, n: int, size: Optional[tuple], session) -> Optional[tuple]:
        """(perm, keep) on the grid the conv makes of this call's input size, or None."""
        if size is None:
            return None
        grid = _conv_grid(self.conv, size, self.grid_axes)
        if grid is None:
            return None
        if self.level is not None:  # this call's level: the one scaled grid of n tokens, if one
            fits = [g for g in _scaled_levels(grid, *self.level) if math.prod(g) == n]
            if len(fits) != 1:
                return None
            order, _ = image_order(GridInfo(fits[0], "level of the conv input size"), self.tile, self.group)
            return site_perm(n, order, 0, True), None
        order, _ = image_order(GridInfo(grid, "conv input size"), self.tile, self.group)
        hit = self._build(n, math.prod(grid), order, self.text_first, session, exact=True)
        return hit if hit[0] is not None else None

    def _build(self, n: int, n_img: int, img_order, first: Optional[bool], session, exact: bool = False) -> tuple:
        """`exact`: the grid is this call's own (from its latent's size), so the other tokens may
        outnumber the image's (padding, text); otherwise they must be fewer."""
        n_text = n - n_img
        if n_text < 0 or (n_text >= n_img and not exact):
            return None, None
        if n_text and (self.text_conflict or self.text_tokens is not None and n_text != self.text_tokens):
            return None, None
        if n_text == 0:
            return site_perm(n, img_order, 0, True), None
        if first is None:
            sides = _earlier_sides(session, n, n_img)
            if len(sides) != 1 or "mixed" in sides or "repeat" in sides:
                return None, None
            first = sides.pop() == "first"
        return site_perm(n, img_order, n_text, first), (text_mask(n, n_text, first) if self.keep_text else None)


_logged_counts: set = set()


def _ungrouped(n: int, n_img: int) -> None:
    """Count and log, once per token count (its perm is cached), a count whose calls run ungrouped."""
    from .ops.sites import count

    count("grouping_ungrouped_count")
    if n not in _logged_counts:
        _logged_counts.add(n)
        log.info("chipmunk: %d tokens do not fit this graph's %d-token grid (a resolution other than the one "
                 "that compiled it?): those calls run ungrouped; torch.compile(..., dynamic=False) gives every "
                 "resolution a graph and a grid of its own", n, n_img)


def _decide_gathered(gathered, n, n_img, img_order, info: GridInfo, gcfg, shard_sides: dict):
    """(perm, text keys, note) of an attention site whose tokens are W ranks' shards gathered by a
    Ulysses all-to-all (`sequence_parallel.gathered_tokens`): each shard is its rank's text and image
    tokens, the text side read from the concat that built the local sequence."""
    local, world = gathered
    n_text = n - n_img
    if n_img % world or n_text < 0 or n_text % world:
        return None, None, f"{n} tokens from {world} sequence shards ≠ grid {n_img} (+ text) in equal shards"
    if n_text and gcfg.text_tokens is not None and n_text != gcfg.text_tokens:
        return None, None, f"{n} tokens ≠ grid {n_img} + text_tokens {gcfg.text_tokens}"
    first = True
    if n_text:
        key = ("gathered", n)
        if key not in shard_sides:
            shard_sides[key] = _cat_sides(local, n // world, n_img // world)
        first, conflict = _text_side(shard_sides[key], info, gcfg, f"{n_text // world} non-grid tokens per shard")
        if conflict or first is None:
            return None, None, conflict or (f"cannot tell whether the {n_text // world} non-grid tokens of each "
                                            "sequence shard come before or after its image tokens")
    perm, keep = sequence_parallel.gathered_perm(img_order, n_img, n_text, first, world)
    text = f", text {n_text} ({n_text // world} per shard) {'first' if first else 'last'} in each shard" if n_text else ""
    return perm, (keep if n_text else None), f", {world} sequence shards gathered by an all-to-all{text}"


def _decide_shard(match, n, n_img, img_order, sharding, info: GridInfo, gcfg, cache, order_key, shard_sides: dict):
    """(perm, text keys, note) of a site that sees one rank's shard of the image stream (and maybe of
    the text): the grid's order restricted to that shard."""
    if n_img % sharding.world:
        return None, None, f"{n} tokens ≠ grid {n_img}, which {sharding.world} shards do not divide"
    img_l = n_img // sharding.world
    order = sequence_parallel.shard_order(img_order, n_img, sharding)
    node = _token_node(match)
    if ("shard", n) not in shard_sides:
        shard_sides[("shard", n)] = _cat_sides(node, n, img_l) if n > img_l and isinstance(node, fx.Node) else set()
    key = ("shard", sharding.world, sharding.rank, order_key)
    perm, keep, note = _decide(n, img_l, order, shard_sides[("shard", n)], info, gcfg, cache, key)
    if perm is None:
        return None, None, note
    return perm, keep, f", sequence shard: {sharding.source}{note}"


def _decide(n, n_img, img_order, sides, info: GridInfo, gcfg, cache, order_key=None):
    if n is None:
        return None, None, "unknown or symbolic token count"
    if n < n_img or (n > n_img and gcfg.text_tokens is not None and n - n_img != gcfg.text_tokens):
        extra = "" if n < n_img else f" + text_tokens {gcfg.text_tokens}"
        return None, None, f"{n} tokens ≠ grid {n_img}{extra}"
    n_text = n - n_img
    if n_text == 0:
        key = (n, 0, True, order_key)
        if key not in cache:
            cache[key] = site_perm(n, img_order, 0, True)
        return cache[key], None, ""
    if sides == {"repeat"} and n % n_img == 0:  # k token streams on the grid, each in the image order
        key = (n, "repeat", order_key)
        if key not in cache:
            cache[key] = torch.cat([img_order.long() + j * n_img for j in range(n // n_img)]).to(torch.int32)
        return cache[key], None, f", {n // n_img} token streams of the grid"
    first, conflict = _text_side(sides, info, gcfg, f"{n_text} non-grid tokens")
    if conflict:
        return None, None, conflict
    if first is None:
        return None, None, f"cannot tell whether the {n_text} non-grid tokens come before or after the image"
    key = (n, n_text, first, order_key)
    if key not in cache:
        cache[key] = (site_perm(n, img_order, n_text, first), text_mask(n, n_text, first))
    perm, keep = cache[key]
    return perm, keep, f", text {n_text} {'first' if first else 'last'}"
