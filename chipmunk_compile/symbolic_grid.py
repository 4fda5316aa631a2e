"""Grids of symbolic size (Dynamo's dynamic shapes), read from a merge and evaluated per call.

A graph compiled with symbolic sizes (a second resolution under automatic dynamic shapes, or
`dynamic=True`) shows no merge of known sizes. So a model whose grid only a merge shows (a reshape
of 2-3 grid axes into the token axis: LTX-Video's coordinate table, Cosmos' and Kandinsky 5's
channels-last latent, PRX, Lumina-Next) ran every new resolution ungrouped. Here such a merge is
read symbolically: its axes are sympy expressions of the graph's size symbols, and the token axis
it makes must be a site's own token count, exactly or plus a constant (text tokens). A call's grid
is those expressions evaluated at the call's symbol values.

The backend reads the symbol values per call from the graph inputs that carry them
(`placeholder_symbols`, handed to it as the plan's `symbol_readers`): an int input (Dynamo lifts each size symbol as a SymInt placeholder) or a size
of a tensor input. These are host ints, so no device read and no sync.

Invariants:
- pure analysis: the graph is never changed;
- nothing is specialized (no int() of a SymInt, which would add a guard and recompile at the next size);
- the guards of the static merges (`grouping._merged_grids`) apply: no other axis of the merge
  carries the site's tokens, no Ulysses exchange; each merged axis is followed back to the sizes
  it was made of (`axis_atoms`), so an axis merged earlier (a per-frame conv's h·w) gives its
  (h, w), and a local-tile order (more than three atoms) no grid.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional

import sympy
import torch
import torch.fx as fx

from . import sequence_parallel

def _val(node: Any) -> Any:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else node


def expr(d: Any) -> sympy.Expr:
    """The sympy expression of a size: an int or a SymInt (read without specializing it)."""
    return d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(int(d))


def _hint(d: Any) -> Optional[int]:
    """The size at the call that compiled the graph (a SymInt's hint), or None."""
    h = getattr(d.node, "hint", None) if isinstance(d, torch.SymInt) else d
    return int(h) if isinstance(h, int) else None


def _same(a: sympy.Expr, b: sympy.Expr) -> bool:
    return a == b or sympy.expand(a - b) == 0


def _op(node: fx.Node) -> Optional[str]:
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", None)


def reshape_groups(src: tuple, dst: tuple) -> Optional[list[tuple[list, list]]]:
    """The axes of a reshape from `src` to `dst` sizes aligned into groups (input axes, output
    axes) of equal products, size-1 axes left out: one input axis to several is a split, several
    to one a merge. Which side to extend is read from the sizes at the compiling call (hints);
    None when the products never meet, or meet in size but not as expressions (sizes Dynamo did
    not relate)."""
    a = [(i, expr(x), _hint(x)) for i, x in enumerate(src) if expr(x) != 1]
    b = [(j, expr(x), _hint(x)) for j, x in enumerate(dst) if expr(x) != 1]
    if any(h is None for _, _, h in a + b):
        return None
    groups, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        gi, gj = [a[i]], [b[j]]
        i, j = i + 1, j + 1
        while not _same(math.prod(e for _, e, _ in gi), math.prod(e for _, e, _ in gj)):
            ha, hb = math.prod(h for _, _, h in gi), math.prod(h for _, _, h in gj)
            if ha < hb and i < len(a):
                gi, i = gi + [a[i]], i + 1
            elif hb < ha and j < len(b):
                gj, j = gj + [b[j]], j + 1
            else:
                return None
        groups.append(([k for k, _, _ in gi], [k for k, _, _ in gj]))
    return groups if i == len(a) and j == len(b) else None


RESHAPES = frozenset({"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"})
# ops that keep every axis's size but move tokens along one: the order behind them is not followed
REORDERING = frozenset({"flip", "roll", "sort", "argsort", "gather", "index_select", "take", "scatter",
                        "scatter_add", "index_put", "index_copy", "rot90"})
LAST_AXIS = frozenset({"linear"})  # ops that change only the last axis of their first input


def merge_groups(node: fx.Node) -> Optional[tuple[tuple, list]]:
    """(input sizes, per output axis the input axes merged into it) when `node` is a view /
    reshape / flatten that only merges axes (size-1 axes dropped or added), with at least one
    symbolic size; else None (static merges are `grouping._merge_layout`'s)."""
    if _op(node) not in RESHAPES or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    src, dst = _val(node.args[0]), _val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(dst, torch.Tensor) or src.dim() <= dst.dim():
        return None
    if all(isinstance(x, int) for x in src.shape):
        return None
    groups = reshape_groups(tuple(src.shape), tuple(dst.shape))
    if groups is None or any(len(out) != 1 for _, out in groups):
        return None
    merged = [[] for _ in range(dst.dim())]
    for into, (out,) in groups:
        merged[out] = into
    return tuple(src.shape), merged


def _axis_arg(node: fx.Node, ndim: int) -> Optional[list]:
    """The dims of a permute / transpose, normalized, or None."""
    rest = list(node.args[1:]) or list(node.kwargs.values())
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    return [int(d) % ndim for d in rest] if rest and all(isinstance(d, int) for d in rest) else None


def axis_atoms(node: Any, axis: int, depth: int = 16) -> list:
    """The sizes that make up `axis` of `node`'s output, outermost first: followed back through
    permutes, transposes, reshapes (an axis merged from several is their atoms; one split from a
    larger axis is an atom) and ops that keep the axis where it is (elementwise ops and norms of an
    input of the output's shape, a linear on the last axis); anything else is an atom. A grid axis that an earlier reshape merged
    (per-frame conv output (h, w) -> h·w, then frames and h·w merged into tokens) so shows its
    (t, h, w); a local-tile order shows more than three atoms."""
    v = _val(node)
    size = v.shape[axis]
    if depth == 0 or not isinstance(node, fx.Node) or node.op not in ("call_method", "call_function") \
            or not node.args or not isinstance(node.args[0], fx.Node):
        return [size]
    src, name = node.args[0], _op(node)
    sv = _val(src)
    if not isinstance(sv, torch.Tensor) or name in REORDERING:
        return [size]
    if name in ("permute", "transpose", "swapaxes", "swapdims"):
        dims = _axis_arg(node, sv.dim())
        if dims is None or sv.dim() != v.dim():
            return [size]
        if name != "permute":
            if len(dims) != 2:
                return [size]
            dims = [dims[1] if d == dims[0] else dims[0] if d == dims[1] else d for d in range(v.dim())]
        return axis_atoms(src, dims[axis], depth - 1)
    if name in RESHAPES:
        for into, out in reshape_groups(tuple(sv.shape), tuple(v.shape)) or ():
            if axis in out:
                if len(out) != 1:  # split from a larger axis (or a mixed regrouping)
                    return [size]
                return [atom for k in into for atom in axis_atoms(src, k, depth - 1)]
        return [size]
    same = [_same(expr(x), expr(y)) for x, y in zip(sv.shape, v.shape)] if sv.dim() == v.dim() else []
    if same and (all(same) or name in LAST_AXIS and all(same[:-1]) and axis < v.dim() - 1):
        return axis_atoms(src, axis, depth - 1)  # elementwise (no broadcast of this input), or a linear
    return [size]


@dataclass(frozen=True)
class SymGrid:
    """A grid whose axes are expressions of the graph's size symbols (size-1 axes dropped per call)."""

    axes: tuple  # sympy expressions, in the merge's order (t, h, w) or (h, w)
    hint: tuple  # their values at the call that compiled the graph
    source: str  # for reports
    tokens: sympy.Expr  # the merged token axis: the product of `axes`

    @functools.cached_property  # (read on every call of its sites: computed once)
    def symbols(self) -> tuple:
        return tuple(sorted(set().union(*(e.free_symbols for e in self.axes)), key=str))

    def at(self, values: dict) -> Optional[tuple]:
        """The grid at these symbol values ({symbol: int}), size-1 axes dropped; None when an axis
        does not evaluate to a positive int or fewer than 2 axes remain."""
        values = {s: sympy.Integer(v) for s, v in values.items()}
        grid = []
        for e in self.axes:
            v = e.xreplace(values) if e.free_symbols else e
            if not v.is_Integer or int(v) < 1:
                return None
            grid.append(int(v))
        grid = tuple(g for g in grid if g > 1)
        return grid if len(grid) in (2, 3) else None

    def describe(self) -> str:
        return f"{self.source} {'×'.join(f'({e})' if e.is_Add else str(e) for e in self.axes)}"


def symbolic_grids(gm: fx.GraphModule, site_tokens: list, readable: set) -> list[SymGrid]:
    """Distinct symbolic grids (by first appearance) of merges whose token axis is the image part
    of one of `site_tokens` (the sites' symbolic token counts, SymInts; `fit`), and whose symbols
    are all `readable` from a call's inputs."""
    out, seen = [], set()
    exprs = [expr(t) for t in site_tokens]
    for node in gm.graph.nodes:
        found = merge_groups(node)
        if found is None:
            continue
        sizes, groups = found
        src = node.args[0]
        for group in groups:
            if len(group) < 2:
                continue
            atoms = [a for j in group for a in axis_atoms(src, j) if expr(a) != 1]  # (sympy: no guard)
            if len(atoms) not in (2, 3) or all(isinstance(a, int) for a in atoms):
                continue  # (more than 3: a local-tile order, or a grid with batch or channels in it)
            key = tuple(expr(a) for a in atoms)
            hint = tuple(_hint(a) for a in atoms)
            if key in seen or None in hint or math.prod(hint) < 4:
                continue
            grid = SymGrid(key, hint, f"merged axes {node.name} {'t×h×w' if len(atoms) == 3 else 'h×w'} (symbolic)",
                           math.prod(key))
            if not grid.tokens.free_symbols <= readable or not any(fit(t, grid) for t in site_tokens):
                continue
            if any(j not in group and any(_same(expr(x), e) for e in exprs) for j, x in enumerate(sizes)):
                continue  # the site's tokens are beside the merge
            if sequence_parallel.exchanged(src):
                continue
            seen.add(key)
            out.append(grid)
    return out


@dataclass(frozen=True)
class Fit:
    """A site's tokens as a symbolic grid's image tokens plus others (text, padding)."""

    grid: SymGrid
    # None: proven by the symbols (the site's count is the grid's tokens plus a constant, or plus a
    # count of symbols of their own: a prompt length that varies too). An int: the count and the
    # grid's tokens are symbols Dynamo did not relate (Qwen-Image's tokens and its rotary table's
    # sizes, from separate inputs), matched at the compiling call with this many others, which
    # every call must have too
    other: Optional[int]
    no_other: bool = False  # the site's tokens are the grid's alone


def fit(site: Any, grid: SymGrid) -> Optional[Fit]:
    """How a site of `site` tokens (a SymInt) is the grid's tokens plus others, or None."""
    rest = sympy.expand(expr(site) - grid.tokens)
    total, img = _hint(site), math.prod(grid.hint)
    if rest.is_Integer:
        return Fit(grid, None, int(rest) == 0) if int(rest) >= 0 else None
    if not rest.free_symbols & grid.tokens.free_symbols:  # others of their own symbols (a prompt length;
        return Fit(grid, None) if total is None or total >= img else None  # Mochi's valid text tokens: unbacked)
    if total is not None and 0 <= total - img < img:  # by the compiling call's sizes (fewer others
        return Fit(grid, total - img, total == img)  # than image tokens, as a static grid asks: `_site_score`)
    return None


def beyond(site: Any, n_img: int) -> bool:
    """Whether a site of `site` tokens (a SymInt) has tokens beyond `n_img` image tokens (text) by
    its expression: a positive constant or a count of other symbols (Mochi's valid text tokens)."""
    rest = sympy.expand(expr(site) - n_img)
    return bool(rest.free_symbols) or (rest.is_Integer and int(rest) > 0)


def grid_for(site: Any, cands: list[SymGrid]) -> Optional[Fit]:
    """The first candidate that fits a site of `site` tokens (a SymInt) by its symbols, else the
    first that fits it by the compiling call's sizes."""
    fits = [f for f in (fit(site, g) for g in cands) if f is not None]
    return next((f for f in fits if f.other is None), fits[0] if fits else None)


def placeholder_symbols(gm: fx.GraphModule) -> dict:
    """{size symbol: (input index, dim, or None for an int input)} for each symbol that a graph
    input carries by itself: a SymInt input (Dynamo lifts each size symbol as one) or a tensor
    input's size. Symbols carried by none (unbacked sizes) cannot be read per call."""
    where: dict = {}
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        v = _val(node)
        if isinstance(v, torch.SymInt) and isinstance(v.node.expr, sympy.Symbol):
            where.setdefault(v.node.expr, (i, None))
        elif isinstance(v, torch.Tensor):
            for d, s in enumerate(v.shape):
                if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                    where.setdefault(s.node.expr, (i, d))
    return where


def read_symbols(readers: tuple, args) -> dict:
    """{symbol: int} of this call, from its inputs' int values and sizes (`readers`: ((symbol,
    input index, dim or None), ...)); host ints only."""
    return {s: int(args[i]) if d is None else int(args[i].shape[d]) for s, i, d in readers}
