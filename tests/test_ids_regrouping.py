"""A static graph whose grid came from a position-id input (FLUX's img_ids) at another aspect ratio
of the same token count (chipmunk_compile/ids_regrouping.py). Dynamo does not recompile for new
id values, so until session 41 a 16×8 latent ran on the perms of the 8×16 it was compiled for.
Now each generation's first call reads the ids and the sites group on their grid: the outputs
equal those of a model compiled at that ratio, and the ids are read once per generation."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import chipmunk_compile
from chipmunk_compile import grouping
from chipmunk_compile.runtime import sessions_of

from helpers import cfg, chip, flux, flux_inputs, fresh_dynamo  # noqa: F401

# 16-query groups: two 8×8 tiles of 4×4 sub-tiles each, so the order depends on the grid's shape
CFG = cfg(attn={"top_keys": 0.3, "group": 16}, mlp={"block": 16})
STEPS = (1.0, 0.9, 0.8, 0.7)


def _generation(compiled, h, w, ids=None):
    outs = []
    with torch.no_grad():
        for t in STEPS:
            kw = flux_inputs(t, h=h, w=w)
            if ids is not None:
                kw["img_ids"] = ids
            outs.append(compiled(**kw)[0])
    return outs


def _perms(compiled):
    """Each site's perm for its own token count (text + image, or image only)."""
    return [s.perm_on(torch.device("cpu"), grouping._site_tokens(s)) for ses in sessions_of(compiled) for s in ses.sites]


def test_other_aspect_ratio_of_a_count_groups_on_its_own_grid(fresh_dynamo):
    model = flux()
    c = chip(model, CFG)
    _generation(c, 16, 8)
    swapped = _generation(c, 8, 16)  # same token count, same graph
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["chipmunk"]["grouping_ids_regrid"] == 1
    perms_swapped = _perms(c)
    rows = [r for r in chipmunk_compile.stats(c)["sites"] if "grouping_now" in r]
    assert len(rows) == 8 and all("8×16" in r["grouping_now"] and "16×8" in r["grouping"] for r in rows), rows
    back = _generation(c, 16, 8)
    perms_back = _perms(c)

    torch._dynamo.reset()
    direct = chip(model, CFG)  # compiled at 8×16 itself
    expected = _generation(direct, 8, 16)
    perms_direct = _perms(direct)
    assert sum(p is not None for p in perms_direct) == 8  # all but the text stream's MLPs
    same = [(a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
            for a, b in zip(perms_swapped, perms_direct)]
    assert all(same)
    assert not any(a is not None and torch.equal(a, b) for a, b in zip(perms_back, perms_direct))  # the 16×8 perms again
    for i, (a, b) in enumerate(zip(swapped, expected)):  # sparse steps included: same groups, same result
        assert torch.equal(a, b), (i, (a - b).abs().max())
    assert counters["chipmunk"]["attention_sparse"] > 0
    assert all(torch.isfinite(o).all() for o in back)


def test_ids_read_once_per_generation_and_not_for_the_same_tensor(fresh_dynamo, monkeypatch):
    import chipmunk_compile.ids_regrouping as ids_regrouping

    reads = []
    real = grouping._ids_grid
    monkeypatch.setattr(ids_regrouping, "_ids_grid", lambda ids: reads.append(ids.shape) or real(ids))
    c = chip(flux(), CFG)
    ids = flux_inputs(1.0, h=16, w=8)["img_ids"]
    _generation(c, 16, 8, ids)
    _generation(c, 16, 8, ids)  # the same tensor, unchanged: not read again
    assert len(reads) == 1
    ids[:, 1:] = ids[:, 1:].flip(-1)  # written in place (8×16 positions): read again
    _generation(c, 8, 16, ids)
    assert len(reads) == 2 and counters["chipmunk"]["grouping_ids_regrid"] == 1
    _generation(c, 16, 8)  # a new tensor each generation: one read each
    _generation(c, 16, 8)
    assert len(reads) == 4


def test_ids_that_make_no_grid_run_ungrouped_counted(fresh_dynamo):
    """Ungrouped, counted, with the text keys still kept (the same index width as before)."""
    c = chip(flux(), CFG)
    _generation(c, 16, 8)
    ids = flux_inputs(1.0, h=16, w=8)["img_ids"]
    ids[:, 1] = ids[:, 1] ** 2  # rows at 0, 1, 4, 9, ...: they fill no box, so no grid (ids offset by 0.5,
    # this test's first choice, are evenly spaced and since session 49 give their grid, as FLUX.3's scaled ones do)
    outs = _generation(c, 16, 8, ids)
    assert all(torch.isfinite(o).all() for o in outs)
    assert counters["chipmunk"]["grouping_ungrouped_count"] > 0
    assert all(p is None for p in _perms(c))  # the text stream's MLPs have none anyway


def test_ids_of_another_text_count_rebuild_the_caches(fresh_dynamo):
    """Ids whose first rows leave the image's box (read as 8 more text rows before a 15×8 grid)
    keep 16 keys always instead of 8: the index caches of the earlier generation are too narrow,
    so the branch gets caches of its own for the new width (an in-place copy into them raised until
    session 41), and keeps the old ones for that grid's return (`state_shapes`)."""
    c = chip(flux(), CFG)

    def widths():  # of each branch's most recently used state
        return [st.cache["indices"].shape[-1] for ses in sessions_of(c) for s in ses.sites if s.kind == "attention"
                for st in {key: st for (key, _), st in s.states.items()}.values()]

    _generation(c, 16, 8)
    before = widths()
    ids = flux_inputs(1.0, h=16, w=8)["img_ids"]
    ids[:8, 1] = 100.0
    outs = _generation(c, 16, 8, ids)
    assert all(torch.isfinite(o).all() for o in outs)
    assert counters["chipmunk"]["grouping_ids_regrid"] == 1 and counters["chipmunk"]["attention_sparse"] > 0
    assert len(before) == 4 and widths() == [w + 8 for w in before]
    assert sum(len(s.states) for ses in sessions_of(c) for s in ses.sites if s.kind == "attention") == 8


def _kontext_ids(rh, rw, h=8, w=8):
    ref = flux_inputs(0.0, h=rh, w=rw)["img_ids"]
    ref[:, 0] = 1  # the reference image's frame index
    return torch.cat([flux_inputs(0.0, h=h, w=w)["img_ids"], ref])


def _kontext_generation(compiled, ids):
    outs = []
    with torch.no_grad():
        for t in STEPS:
            kw = flux_inputs(t, h=1, w=ids.shape[0])  # the packed latents of both images
            kw["img_ids"] = ids
            outs.append(compiled(**kw)[0])
    return outs


def test_kontext_reference_of_another_shape_regroups_each_run(fresh_dynamo):
    """FLUX.1 Kontext: the ids are the generated image's grid, then the reference image's. A reference
    of another shape with as many tokens (4×12, then 12×4) runs the same graph, grouped per
    generation on both runs of its own ids: the same outputs as a graph compiled at that shape."""
    model = flux()
    c = chip(model, CFG)
    _kontext_generation(c, _kontext_ids(4, 12))
    rows = chipmunk_compile.stats(c)["sites"]
    assert sum("2 runs" in r["grouping"] for r in rows) == 8, [r["grouping"] for r in rows]
    swapped = _kontext_generation(c, _kontext_ids(12, 4))
    assert counters["stats"]["unique_graphs"] == 1 and counters["chipmunk"]["grouping_ids_regrid"] == 1
    perms = _perms(c)
    torch._dynamo.reset()
    direct = chip(model, CFG)
    expected = _kontext_generation(direct, _kontext_ids(12, 4))
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(perms, _perms(direct)))
    for a, b in zip(swapped, expected):
        assert torch.equal(a, b), (a - b).abs().max()
    assert counters["chipmunk"]["attention_sparse"] > 0


def _symbolic_perms_check(compiled, model, h, w, only_ran: bool, text=8):
    """Every symbolic attention site (text + image tokens) has the perm of the h×w grid; `only_ran`:
    those that ran this count in this generation (regional blocks: a later size may compile a graph
    of its own, which then serves the blocks an earlier graph served)."""
    n = h * w + text
    checked = 0
    for ses in sessions_of(model):
        for s in ses.sites:
            ran = any(st.key[0][-2] == n and st.used_generation == ses.position().generation for st in s.states.values())
            if s.kind != "attention" or s.call_grouping is None or (only_ran and not ran):
                continue
            perm, keep = s._for_count(n)
            order, _ = grouping.image_order(grouping.GridInfo((h, w), ""), s.call_grouping.tile, s.call_grouping.group)
            assert perm is not None and torch.equal(perm, grouping.site_perm(n, order, text, True)), (h, w, s.path)
            assert keep[:text].all() and not keep[text:].any()
            checked += 1
    assert checked >= 1, (h, w)


@pytest.mark.parametrize("regional", [False, True])
def test_symbolic_graph_groups_each_generation_on_its_grid(fresh_dynamo, regional):
    """A graph recompiled with symbolic token counts (a second resolution) whose grid comes from its
    position ids (whole model) or its rotary tables (compile_repeated_blocks): an aspect ratio of an
    earlier count (8×12 after 12×8) is grouped on its own grid, read at its generation's first call;
    a new count (10×10) on the grid of its first call's ids or decoded rotary tables. Before, the
    count kept its first grid (8×12 ran on 12×8 perms), and under regional compilation a new count
    was cut on the compiled grid (10×10 on 12×8, with 4 image tokens taken for text), uncounted.
    No cache refills: a block that moves to a graph compiled for a later block takes its caches."""
    model = flux()
    if regional:
        model.compile_repeated_blocks(backend="chipmunk", options={"config": CFG, "compiler": "eager"})
        c = model
    else:
        c = chip(model, CFG)
    for h, w in ((16, 8), (12, 8), (8, 12), (10, 10)):
        with torch.no_grad():
            for i, t in enumerate(STEPS[:2]):
                if regional and sessions_of(model):  # the blocks see no timestep: steps given
                    chipmunk_compile.set_step(model, i)
                c(**flux_inputs(t, h=h, w=w))
        if (h, w) != (16, 8):
            _symbolic_perms_check(c, model, h, w, only_ran=regional)
    assert counters["chipmunk"]["grouping_ungrouped_count"] == 0
    assert counters["chipmunk"]["grouping_ids_regrid"] >= 2
    assert not any(k.startswith("fallback:") for k in counters["chipmunk"]), dict(counters["chipmunk"])
