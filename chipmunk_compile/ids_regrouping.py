"""The token grid of each generation, for graphs whose grid came from a position-id input.

Dynamo guards on shapes, not on values: FLUX at 768×1280 after 1280×768 (one token count, img_ids
of one shape) runs the graph compiled for the first, whose sites were grouped on the first grid.
Until session 41 the second aspect ratio was grouped on the transposed grid: its query groups
and MLP token blocks were strips across the image, not tiles, with no error, count or log.

The same holds for the rotary tables a block is passed under regional compilation, from which
`rotary_grid.py` decodes the positions. `IdsRegrouping` belongs to one compiled graph. The backend
hands it every call's inputs (`update`); it reads the ids (or the tables' decoding columns) on the
first call of each generation only. A graph with symbolic token counts has one too (since session
66): its sites' per-count grids (`grouping.CallGrouping`, read at a count's first call) would keep
8×12 for a later 12×8 of the same count; with a generation's grid other than the compiled one, the
sites take this one's.

Invariants:
- One device→host copy of the ids (or the decoding columns of the tables) per generation, at its
  first call, outside any CUDA-graph recording (the backend's wrapper calls `update` before the
  graph runner). An ids tensor (cos table) read before, the same object at the same version, is
  not read again.
- A new grid takes effect at a generation's first call. Every cache a call reads was filled in
  its own generation, which begins with a dense step, so no cache built in one order is read in
  another.
- `key` (0 = the compiled grid, the sites' own perms) is in every site's step-graph signature, so
  no graph recorded on one grid replays on another.
- A site whose token count does not fit the new grid (other tokens as many as the image's or
  more, a text side the compile could not tell) runs ungrouped on it, counted as
  `grouping_ungrouped_count` and logged once per grid and count; its text keys stay always kept
  (in place: the compiled text side), so its key count does not change.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Optional

import torch

from .grouping import GridInfo, _ids_grid, _ids_info, image_order, site_perm, text_mask

log = logging.getLogger("chipmunk_compile")


def grid_key(info: Optional[GridInfo]) -> tuple:
    """What tells two grids apart: axes, text side, and the token at each raster position."""
    if info is None:
        return ("no grid",)
    order = info.token_of_raster
    runs = None if info.segments is None else tuple(
        (start, grid, None if r is None else tuple(r.tolist())) for start, grid, r in info.segments)
    return (info.grid, info.text_first, None if order is None else tuple(order.tolist()), runs)


class IdsRegrouping:
    """One compiled graph's grid per generation, and the sites' perms on it (cached per grid)."""

    def __init__(self, compiled: GridInfo, tile):
        """`compiled`: the graph's grid, from its position-id input (`input_index`) or rotary
        tables (`rotary`)."""
        self.input_index, self.rotary, self.tile = compiled.input_index, compiled.rotary, tile
        self._keys: dict[tuple, int] = {grid_key(compiled): 0}
        self._infos: list[Optional[GridInfo]] = [compiled]
        self.key = 0
        self._generation: Any = None
        self._read: Optional[tuple] = None  # (weak reference to the ids read last, their version)
        self._perms: dict[tuple, tuple] = {}
        self._logged: set = set()

    def update(self, args: tuple, generation: int) -> None:
        """Take this generation's grid from the call's ids or rotary tables (a no-op after the
        generation's first call)."""
        if generation == self._generation:
            return
        self._generation = generation
        src = self.rotary.sources(args)[0] if self.rotary is not None else args[self.input_index]
        if not isinstance(src, torch.Tensor):
            return
        version = None if src.is_inference() else src._version  # inference tensors have no version
        if self._read is not None and version is not None and self._read[0]() is src and self._read[1] == version:
            return
        self._read = (weakref.ref(src), version)
        try:
            ids = self.rotary.ids(args) if self.rotary is not None else src
            res = _ids_grid(ids) if ids is not None else None
        except Exception:  # noqa: BLE001 — odd ids: no grid, the sites run ungrouped
            res = None
        what = "rotary tables of this generation" if self.rotary is not None else "position ids of this generation"
        info = _ids_info(res, what) if res is not None else None
        key = grid_key(info)
        if key not in self._keys:
            self._keys[key] = len(self._infos)
            self._infos.append(info)
        self.key = self._keys[key]
        if self.key:
            from .ops.sites import count

            count("grouping_ids_regrid")
            if self.key not in self._logged:
                self._logged.add(self.key)
                log.info("chipmunk: this generation's position ids / rotary tables give another grid than the "
                         "compiled one (%s): its sites are grouped on it", info.describe() if info else "none")

    def describe(self) -> str:
        """The current grid, for reports."""
        info = self._infos[self.key]
        return info.describe() if info is not None else "no grid (ungrouped)"

    def for_site(self, n: int, group: Optional[int], text_first: Optional[bool], keep_text: bool) -> tuple:
        """(perm, always_keep) of a site with n tokens on the current grid (key > 0)."""
        key = (self.key, n, group, text_first, keep_text)
        hit = self._perms.get(key)
        if hit is None:
            hit = self._perms[key] = self._build(n, group, text_first, keep_text)
        return hit

    def _build(self, n: int, group, text_first, keep_text) -> tuple:
        info = self._infos[self.key]
        n_text = n - info.n if info is not None else -1
        if info is None or n_text < 0 or (n_text and (n_text >= info.n or text_first is None)):
            from .ops.sites import count

            count("grouping_ungrouped_count")
            if (self.key, n) not in self._logged:
                self._logged.add((self.key, n))
                log.info("chipmunk: %d tokens do not fit the grid of this generation's position ids / rotary "
                         "tables (%s): those sites run ungrouped", n, info.describe() if info else "none")
            # the text tokens stay where the compiled graph found them (ungrouped: in place)
            n_text = n - self._infos[0].n
            whole = keep_text and text_first is not None and 0 < n_text < n
            return None, (text_mask(n, n_text, text_first) if whole else None)
        order, _ = image_order(info, self.tile, group)
        if not n_text:
            return site_perm(n, order, 0, True), None
        return site_perm(n, order, n_text, text_first), (text_mask(n, n_text, text_first) if keep_text else None)
