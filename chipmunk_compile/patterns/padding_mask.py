"""Boolean attention masks built from padding vectors, recognized from graph structure.

Models pass padding as a (B, N) vector and expand it into a 4-D boolean mask inside the graph:
a key-padding mask (B, 1, 1, N), the same repeated over queries (B, 1, N, N), or the outer
product `m[:, None, :, None] & m[:, None, None, :]` of HunyuanVideo 1.5 (padded queries attend to
nothing). `padding_vectors(mask)` proves such a form from the ops that build it and returns the
vectors, so the attention site can take a key mask and zero the rows of padded queries, which is
what SDPA returns for a fully masked row.

Invariants:
- Exact or nothing: the result says mask[b, h, i, j] == key[b, j] (and query[b, i]) for every
  element, where key/query are `src.flatten(1).bool()` of the returned nodes (batch 1 broadcasts).
  It follows only value-preserving reshapes (per-batch row-major order kept), expand/repeat along
  axes of size 1, swaps of the last two dims, casts into or out of bool, and one logical/bitwise
  AND of two such masks; anything else returns None and the site is rejected as before.
- Pure: reads nodes and their fake values, never edits the graph.
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.fx as fx

from .fx_utils import is_call, is_method, shape_of, val

_RESHAPES = ("view", "reshape", "unsqueeze", "flatten", "contiguous")
_BROADCASTS = ("expand", "repeat", "expand_as")
_ANDS_BITWISE = (operator.and_, torch.bitwise_and)
_ANDS_LOGICAL = (torch.logical_and,)
KEY, QUERY = 3, 2  # the 4-D axis a vector varies along


def _dtype(node) -> Optional[torch.dtype]:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _bool_cast(node: fx.Node) -> Optional[fx.Node]:
    """The input of a cast whose input or output is bool (so it keeps the truth of each value)."""
    if not (is_method(node, "bool", "float", "half", "int", "long", "to", "type") or is_call(node, torch.Tensor.to)):
        return None
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or shape_of(x) != shape_of(node):
        return None
    if torch.bool in (_dtype(x), _dtype(node)):
        return x
    return None


def _reshape_input(node: fx.Node) -> Optional[fx.Node]:
    """The input of a reshape-like op that keeps each batch's values in row-major order."""
    if is_method(node, *_RESHAPES) or is_call(node, torch.reshape, torch.unsqueeze, torch.flatten):
        x = node.args[0]
    elif is_call(node, operator.getitem) and isinstance(node.args[1], tuple) and all(
            i is None or i is Ellipsis or i == slice(None) for i in node.args[1]):
        x = node.args[0]
    else:
        return None
    return x if isinstance(x, fx.Node) and shape_of(x) is not None else None


def _axis_of(shape: tuple, n: int) -> Optional[int]:
    """KEY for (B, 1, 1, n), QUERY for (B, 1, n, 1), else None."""
    if len(shape) != 4 or shape[1] != 1:
        return None
    if shape[3] == n and shape[2] == 1:
        return KEY
    if shape[2] == n and shape[3] == 1:
        return QUERY
    return None


def vector_axis(node, n: int) -> Optional[tuple[fx.Node, int]]:
    """(src, axis) when the 4-D boolean-valued `node` equals src's per-batch vector of length `n`
    along `axis` (KEY or QUERY), broadcast over the other dims; else None."""
    shape = shape_of(node)
    if not isinstance(node, fx.Node) or shape is None or len(shape) != 4:
        return None
    cast_in = _bool_cast(node)
    if cast_in is not None:
        return vector_axis(cast_in, n)
    x = _reshape_input(node)
    if x is not None:
        sx = shape_of(x)
        if sx == shape:
            return vector_axis(x, n)
        axis = _axis_of(shape, n)
        if axis is not None and sx and sx[0] == shape[0] and math.prod(sx[1:]) == n:
            return x, axis
        return None
    if is_method(node, *_BROADCASTS):
        x = node.args[0]
        found = vector_axis(x, n)
        sx = shape_of(x)
        if found is None or sx is None:
            return None
        # only axes of size 1 may grow (repeat along a size-n axis would tile the vector)
        if sx[found[1]] != shape[found[1]] or any(a != b and a != 1 for a, b in zip(sx, shape)):
            return None
        return found
    if is_method(node, "transpose") or is_call(node, torch.transpose):
        dims = sorted(int(d) % 4 for d in node.args[1:3])
        found = vector_axis(node.args[0], n) if dims == [2, 3] else None
        return (found[0], KEY + QUERY - found[1]) if found else None
    return None


def padding_vectors(mask: fx.Node, n: int) -> Optional[tuple[Optional[fx.Node], Optional[fx.Node]]]:
    """(key_src, query_src) for a boolean (B, 1, n, n) / (B, 1, 1, n) mask built from padding
    vectors; either may be None (no key / no query padding). None when the form is not proven."""
    if _dtype(mask) != torch.bool:
        return None
    while (inner := _bool_cast(mask)) is not None and _dtype(inner) == torch.bool:
        mask = inner
    single = vector_axis(mask, n)
    if single is not None:
        src, axis = single
        return (src, None) if axis == KEY else (None, src)
    if is_call(mask, *_ANDS_BITWISE, *_ANDS_LOGICAL) or is_method(mask, "__and__", "logical_and", "bitwise_and"):
        a, b = mask.args[0], mask.args[1]
        if not is_call(mask, *_ANDS_LOGICAL) and not is_method(mask, "logical_and"):
            if _dtype(a) != torch.bool or _dtype(b) != torch.bool:
                return None  # bitwise AND of integers is not the AND of their truths
        fa, fb = vector_axis(a, n), vector_axis(b, n)
        if fa is None or fb is None or {fa[1], fb[1]} != {KEY, QUERY}:
            return None
        key, query = (fa, fb) if fa[1] == KEY else (fb, fa)
        return key[0], query[0]
    return None
