"""Token positions decoded from rotary tables that a graph takes as inputs.

Under regional compilation (`compile_repeated_blocks`) a block's graph sees no patch embedding and
no position ids: the model computes its rotary embedding outside the blocks and passes each block
the tables, FLUX's `image_rotary_emb` = (cos, sin) of shape (N, D). Until session 41 such blocks
ran ungrouped. The tables hold the positions: column j of an axis is cos/sin(p · f_j), so the
angle atan2(sin, cos) is p · f_j wherever |p · f_j| < π. Columns of one axis are proportional
to each other across the rows; the one with the widest range that stays well inside ±π (no
wrap, even at a 4× longer axis) gives p = angle / f_j, with f_j the smallest step between its
distinct angles (consecutive positions). The decoded rows go through the position-id grid
search (`grouping._ids_grid`), so text rows at the origin (FLUX's txt_ids) are found as such.

`rotary_grids(gm, example_inputs)` finds candidate tables: a pair of real graph inputs of one
shape with cos² + sin² = 1 (cos first, sin second, as diffusers passes them), or one complex input
of unit modulus; size-1 axes are squeezed, and a table must be (N, D) then (a batch of differing
tables is not read). `RotaryDecoder.ids(args)` decodes a call's tables with the columns and steps
found at compile time (per generation: ids_regrouping).

Invariants: analysis of example values only (the graph is never changed); a decode that does not
give integer positions on every row gives None, never a guessed grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

MAX_ANGLE = math.pi / 4  # a decoding column's widest angle: no wrap at up to 4× the axis length
PROPORTIONAL_TOL = 1e-2  # columns of one axis: normalized angles agree to this
INTEGER_TOL = 0.2  # decoded positions must be this close to integers


@dataclass(frozen=True)
class RotaryDecoder:
    """Which inputs hold the table and how to read positions from it."""

    inputs: tuple  # (cos index, sin index) or (complex index,)
    columns: tuple  # one column per non-constant axis, in table order
    steps: tuple  # the angle of one position step in each column

    def ids(self, args) -> Optional[torch.Tensor]:
        """(N, 3|4) float64 positions from a call's tables (a device→host copy of the columns), or None."""
        return self.ids_of(self.sources(args))

    def ids_of(self, tables: tuple) -> Optional[torch.Tensor]:
        """`ids` from the tables themselves (`sources` of a call)."""
        angles = _angles(list(tables), list(self.columns))
        if angles is None:
            return None
        return _positions(angles, torch.tensor(self.steps, dtype=torch.float64))

    def sources(self, args) -> tuple:
        return tuple(args[i] for i in self.inputs)


def _table(t: Any) -> Optional[torch.Tensor]:
    """The (N, D) view of a table with size-1 axes squeezed, else None."""
    if not isinstance(t, torch.Tensor) or isinstance(t, torch._subclasses.FakeTensor) or t.is_meta:
        return None
    shape = [d for d in t.shape if d != 1]
    if len(shape) != 2 or shape[0] < 4:
        return None
    return t.reshape(shape)


def _angles(tables: list, columns: Optional[list] = None) -> Optional[torch.Tensor]:
    """atan2(sin, cos) (or the complex angle) of the tables' columns, float64 on the host."""
    views = [_table(t) for t in tables]
    if any(v is None for v in views):
        return None
    if columns is not None:
        views = [v[:, columns] for v in views]
    if len(views) == 1:
        z = views[0].detach().cpu()
        return torch.angle(z.to(torch.complex128))
    cos, sin = (v.detach().cpu().double() for v in views)
    return torch.atan2(sin, cos)


def _positions(angles: torch.Tensor, steps: torch.Tensor) -> Optional[torch.Tensor]:
    p = angles / steps
    r = p.round()
    if not bool(torch.isfinite(p).all()) or bool(((p - r).abs() > INTEGER_TOL).any()):
        return None
    if r.shape[1] > 4:
        return None
    return r


def decoder_for(tables: list, indices: tuple) -> Optional[RotaryDecoder]:
    """The decoder of one table (cos/sin pair or complex), or None when it is no rotary table of
    integer positions."""
    views = [_table(t) for t in tables]
    if any(v is None for v in views) or not all(v.is_floating_point() or v.is_complex() for v in views):
        return None
    if len(views) == 2:
        cos, sin = (v.detach().double() for v in views)
        if cos.shape != sin.shape or not bool(((cos * cos + sin * sin - 1).abs() < 1e-2).all()):
            return None
    elif not views[0].is_complex() or not bool(((views[0].detach().abs() - 1).abs() < 1e-2).all()):
        return None
    a = _angles(tables)
    spread = a.max(0).values - a.min(0).values
    axes: list[tuple[torch.Tensor, list]] = []  # (normalized angles of the axis, its columns)
    for j in range(a.shape[1]):
        if spread[j] < 1e-6 or a[:, j].abs().max() >= math.pi * 0.95:  # constant, or may have wrapped
            continue
        col = a[:, j]
        unit = col / col.abs().max()
        for ref, cols in axes:
            if bool(((unit - ref).abs() < PROPORTIONAL_TOL).all()):
                cols.append(j)
                break
        else:
            axes.append((unit, [j]))
    # an axis has columns of small angles (its low frequencies); a group without any is a
    # high-frequency column that wrapped (its angles are no multiple of one step)
    safe_axes = [[j for j in cols if a[:, j].abs().max() <= MAX_ANGLE] for _, cols in axes]
    safe_axes = [cols for cols in safe_axes if cols]
    if len(safe_axes) not in (2, 3, 4):
        return None
    columns, steps = [], []
    for safe in safe_axes:
        j = max(safe, key=lambda c: float(a[:, c].abs().max()))
        values = torch.unique(a[:, j])
        gaps = values[1:] - values[:-1]
        gaps = gaps[gaps > 1e-4 * float(a[:, j].abs().max())]  # rounding noise between equal positions
        step = float(gaps.min()) if gaps.numel() else 0.0
        if step <= 0:
            return None
        columns.append(j)
        steps.append(step)
    dec = RotaryDecoder(tuple(indices), tuple(columns), tuple(steps))
    return dec if _positions(a[:, columns], torch.tensor(steps, dtype=torch.float64)) is not None else None


def rotary_decoders(gm: fx.GraphModule, example_inputs) -> list[RotaryDecoder]:
    """Decoders of the rotary tables among the graph's non-parameter inputs."""
    if example_inputs is None:
        return []
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    cands = [(i, v) for i, (n, v) in enumerate(zip(places, example_inputs))
             if _table(v) is not None and "_parameters" not in n.name and "_buffers" not in n.name]
    out, used = [], set()
    for i, v in cands:
        if i in used:
            continue
        if v.is_complex():
            dec = decoder_for([v], (i,))
        else:  # its sin: the next input of its shape that makes cos² + sin² = 1 with it
            dec = next((d for k, w in cands if k > i and k not in used and w.shape == v.shape and not w.is_complex()
                        for d in [decoder_for([v, w], (i, k))] if d is not None), None)
        if dec is not None:
            out.append(dec)
            used.update(dec.inputs)
    return out
