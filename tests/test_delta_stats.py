"""benchmarks/delta_stats.py: the explained-fraction statistic on synthetic deltas (CPU, < 5 s)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import delta_stats as ds  # noqa: E402

FRACS = (0.05, 0.10, 0.15, 0.25)


def test_kept_counts():
    assert ds.kept_counts(1032, FRACS) == [52, 103, 155, 258]
    assert ds.kept_counts(10, (0.0, 0.01, 1.0, 2.0)) == [1, 1, 10, 10]


def test_concentrated_delta_is_fully_explained_at_its_fraction():
    # 1024 columns; every group's change lives in 10% of the columns (its own set per group)
    g = torch.Generator().manual_seed(0)
    R, C, G = 512, 1000, 128
    a = torch.zeros(R, C)
    for grp in range(R // G):
        cols = torch.randperm(C, generator=g)[:100]
        a[grp * G:(grp + 1) * G][:, cols] = torch.rand(G, 100, generator=g) + 0.1
    f = ds.explained_fraction(a, G, FRACS)
    assert f.shape == (4,)
    assert f[1].item() == pytest.approx(1.0, abs=1e-6)  # 10% kept: everything
    assert f[2].item() == pytest.approx(1.0, abs=1e-6)
    assert 0.45 < f[0].item() < 0.8  # 5% kept: the larger half of the 10%
    # per row is at least as good as any grouping
    assert (ds.explained_fraction(a, 1, FRACS) >= f - 1e-6).all()


def test_uniform_delta_gives_about_x():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 1032, 1032, generator=g)  # (B, H, N, N), unstructured
    f = ds.explained_fraction(a, 128, FRACS, pool_dims=3)
    assert f.shape == (2, 4)
    for i, x in enumerate(FRACS):
        assert f[:, i].min().item() == pytest.approx(x, abs=0.02)  # k/C ≈ x; the top of a group's sum barely beats x
    assert (f[:, 1:] > f[:, :-1]).all()  # monotone in the kept fraction
    ones = torch.ones(256, 400)
    assert ds.explained_fraction(ones, 128, FRACS)[1].item() == pytest.approx(40 / 400)


def test_grouping_matters_only_through_the_perm():
    # two interleaved row populations with disjoint hot columns: raster groups mix them, the
    # perm that puts each population together separates them
    R, C, G = 256, 200, 128
    a = torch.full((R, C), 1e-3)
    a[0::2, :20] = 1.0
    a[1::2, 100:120] = 1.0
    perm = torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)])
    raster = ds.explained_fraction(a, G, (0.10,))
    grouped = ds.explained_fraction(a, G, (0.10,), perm=perm)
    assert grouped.item() > 0.98
    assert raster.item() < 0.55
    # group_mass: matmul form equals the explicit sum, partial last group included
    b = torch.rand(3, 300, 50)
    p = torch.randperm(300)
    m = ds.group_mass(b, 128, p)
    ref = torch.stack([b[:, p[i:i + 128]].sum(1) for i in range(0, 300, 128)], 1)
    torch.testing.assert_close(m, ref)


def test_lagged_selection_and_row_bound():
    g = torch.Generator().manual_seed(2)
    mass_prev = torch.rand(4, 9, 1032, generator=g)
    cap, tot, top = ds.captured(mass_prev, FRACS, return_order=True)
    # the same mass under its own ranking = oracle
    cap2, tot2 = ds.captured(mass_prev, FRACS, top)
    torch.testing.assert_close(cap, cap2)
    # an unrelated mass under a stale ranking explains about x, less than its oracle
    mass = torch.rand(4, 9, 1032, generator=g)
    lag = ds._pool(ds.captured(mass, FRACS, top), 2)  # (4, F)
    orc = ds._pool(ds.captured(mass, FRACS), 2)
    assert (lag < orc).all()
    assert lag[:, 1].sub(0.10).abs().max() < 0.02
    # row_captured with stride pools the chosen rows only
    a = torch.rand(2, 64, 100, generator=g)
    c1, t1 = ds.row_captured(a, FRACS, stride=4)
    assert c1.shape == (2, 16, 4) and t1.shape == (2, 16)
    torch.testing.assert_close(t1, a[:, ::4].sum(-1))
    torch.testing.assert_close(c1[..., 1], a[:, ::4].topk(10, -1).values.sum(-1))
