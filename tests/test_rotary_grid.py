"""Token positions decoded from rotary-table graph inputs (chipmunk_compile/rotary_grid.py): the
grid a block under regional compilation gets from the tables the model passes it."""

from __future__ import annotations

import math

import pytest
import torch

from chipmunk_compile.grouping import _ids_grid
from chipmunk_compile.rotary_grid import decoder_for

diffusers = pytest.importorskip("diffusers")


def _flux_ids(h, w, text=8, frames=1):
    ids = torch.zeros(frames, h, w, 3)
    ids[..., 0] = torch.arange(frames)[:, None, None]
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return torch.cat([torch.zeros(text, 3), ids.reshape(-1, 3)])


def _flux_tables(ids, axes=(16, 56, 56)):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    return FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)


def _same_grid(decoded, ids):
    a, b = _ids_grid(decoded), _ids_grid(ids)
    assert a is not None and b is not None
    assert a[0] == b[0] and a[2:] == b[2:] and torch.equal(a[1], b[1])
    return a


@pytest.mark.parametrize("h,w,text", [(12, 20, 8), (64, 40, 512), (96, 160, 0)])
def test_flux_tables_give_the_grid_of_their_ids(h, w, text):
    ids = _flux_ids(h, w, text)
    cos, sin = _flux_tables(ids)
    dec = decoder_for([cos, sin], (3, 4))
    assert dec is not None and len(dec.columns) == 2  # h and w; the frame axis is constant
    grid, _, n_other, first = _same_grid(dec.ids({3: cos, 4: sin}), ids)
    assert grid == (h, w) and n_other == text and (first or not text)


def test_video_tables_and_the_transposed_ratio_with_the_compiled_columns():
    ids = _flux_ids(6, 10, 8, frames=3)
    cos, sin = _flux_tables(ids)
    dec = decoder_for([cos, sin], (0, 1))
    assert dec is not None and len(dec.columns) == 3
    assert _same_grid(dec.ids([cos, sin]), ids)[0] == (3, 6, 10)
    # another ratio of the count, read with the columns and steps found on the first (ids_regrouping)
    other = _flux_ids(10, 6, 8, frames=3)
    assert _same_grid(dec.ids(list(_flux_tables(other))), other)[0] == (3, 10, 6)


def test_complex_table_with_batch_and_head_axes():
    ids = _flux_ids(8, 12, 4)
    cos, sin = _flux_tables(ids, axes=(8, 32, 32))
    z = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[None, :, None]  # (1, N, 1, D) complex
    dec = decoder_for([z], (2,))
    assert dec is not None
    assert _same_grid(dec.ids({2: z}), ids)[0] == (8, 12)


def test_not_a_rotary_table():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(200, 64, generator=g), torch.rand(200, 64, generator=g)
    assert decoder_for([a, b], (0, 1)) is None  # cos² + sin² ≠ 1
    # a 1-D sequence's table (one axis of positions): no grid to decode
    pos = torch.arange(200, dtype=torch.float64)[:, None]
    freqs = 10000 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    ang = pos * freqs[None]
    assert decoder_for([ang.cos(), ang.sin()], (0, 1)) is None


def test_positions_that_are_not_integers_give_no_ids():
    ids = _flux_ids(12, 20, 8)
    cos, sin = _flux_tables(ids)
    dec = decoder_for([cos, sin], (0, 1))
    half = ids.clone()
    half[8:, 1] += 0.5 * (torch.arange(half.shape[0] - 8) % 2)  # every other row half a step off
    assert dec.ids(list(_flux_tables(half))) is None
    assert math.isfinite(dec.steps[0]) and dec.steps[0] > 0
