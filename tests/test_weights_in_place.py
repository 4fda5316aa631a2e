"""Weights that change or move between generations: the next generation uses them, sparse steps too.

A model whose weights moved (off the device and back: diffusers' model CPU offload) is the same
instance of its compiled graph: its step tracking and caches carry on (until session 40 every call
after a move was a dense step 0, and each move added a set of caches). The Triton mm2 reads w2 through a column-major copy that the site keeps (`Site.column_major`).
Each branch's first dense MLP step of a generation copies the weight into it again (also inside
recorded step graphs, which run no Python; session 40 copied at every dense MLP step), so a weight
written in place between generations is used however it was written: by
`w.data` or on inference tensors, neither of which moves `w._version`. A model whose weights
moved gets new copies, at most one per weight, each eviction invalidating the step graphs.
Triton's CPU interpreter here (the conftest sets it where there is no GPU)."""

import os

import pytest
import torch
from torch._dynamo.utils import counters

import chipmunk_compile
from helpers import TwoTinyBlocks, fresh_dynamo  # noqa: F401

interpreter_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                      reason="CPU tensors on Triton's interpreter (tests/conftest.py sets it without a GPU)")

# MLP sites only: their sparse steps are what the w2 copy serves
CFG = {"attn": {"enabled": False}, "mlp": {"min_tokens": 0, "first_n_dense_layers": 0, "block": 64}}


def _generations(mode, monkeypatch, change, inference=False, regional=False):
    """Two 4-step generations of a fresh TwoTinyBlocks on kernels `mode`, `change(model)` between them;
    `regional`: each block compiled on its own (one graph serves both, as compile_repeated_blocks)."""
    monkeypatch.setenv("CHIPMUNK_KERNELS", mode)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    if inference:
        with torch.inference_mode():
            model = TwoTinyBlocks().eval()
    else:
        model = TwoTinyBlocks().eval()
    x = torch.randn(1, 150, 64)  # 150 tokens: a partial last block
    drift = torch.randn(1, 150, 64)  # not a constant shift, which the blocks' LayerNorms would remove
    options = {"config": CFG, "compiler": "eager"}
    if regional:
        for block in model.blocks:
            block.compile(backend="chipmunk", options=options, fullgraph=True)
        c = model
    else:
        c = torch.compile(model, backend="chipmunk", options=options, fullgraph=True)
    ctx = torch.inference_mode if inference else torch.no_grad
    gens = []
    for g in range(2):
        if g:
            change(model)
            chipmunk_compile.reset(c)
        with ctx():
            gens.append([c(x + 0.05 * i * drift) for i in range(4)])
    for site in (s for session in chipmunk_compile.sessions_of(c) for s in session.sites):
        n = len(site.graph.keys) if site.graph is not None else 1  # blocks it serves
        assert site.steps == {"dense": 2 * n, "sparse": 6 * n}, (site.path, site.steps)  # per generation: 1 + 3
    return gens, dict(counters["chipmunk"]), c


def _scale_w2_through_data(model):
    w = model.blocks[1].fc2.weight
    before = w._version
    w.data.mul_(1.5)  # as code that edits weights behind autograd's back does
    assert w._version == before  # what makes a version-keyed copy miss the change


def _scale_w2_inference(model):
    with torch.inference_mode():
        model.blocks[1].fc2.weight.mul_(1.5)


@interpreter_only
@pytest.mark.parametrize("change,inference", [(_scale_w2_through_data, False), (_scale_w2_inference, True)],
                         ids=["data", "inference_tensors"])
def test_a_weight_written_in_place_between_generations_reaches_the_sparse_steps(fresh_dynamo, monkeypatch,
                                                                                 change, inference):
    ref, _, _ = _generations("ref", monkeypatch, change, inference)
    tri, counts, _ = _generations("triton", monkeypatch, change, inference)
    assert not any(k.startswith("kernel_fallback") for k in counts), counts
    assert counts["w2_column_major_copy"] == 2  # one per MLP site, refreshed in place since
    # the change is real: the second generation's outputs differ from the first's
    assert ((ref[1][-1] - ref[0][-1]).norm() / ref[0][-1].norm()).item() > 1e-2
    for a, b in zip(tri[1], ref[1]):
        assert ((a - b).norm() / b.norm()).item() < 1e-5


def _move_weights(model):
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()  # new addresses, as a model moved off the device and back gets


@pytest.mark.parametrize("regional", [False, True], ids=["whole_model", "regional"])
def test_moved_weights_keep_their_instance_and_steps(fresh_dynamo, monkeypatch, regional):
    """Reference kernels: what a move does to step tracking and state, on any machine."""
    _, counts, c = _generations("ref", monkeypatch, _move_weights, regional=regional)
    assert counts["instance_weights_moved"] == (2 if regional else 1), counts
    sites = [s for session in chipmunk_compile.sessions_of(c) for s in session.sites]
    assert {len(s.graph.keys) for s in sites} == {2 if regional else 1}  # no new instance per move
    assert {len(s.states) for s in sites} == {2 if regional else 1}  # no second set of caches


@interpreter_only
def test_moved_weights_replace_their_copies_and_invalidate_step_graphs(fresh_dynamo, monkeypatch):
    ref, _, _ = _generations("ref", monkeypatch, _move_weights)
    tri, counts, c = _generations("triton", monkeypatch, _move_weights)
    assert counts["w2_column_major_copy"] == 4 and counts["w2_column_major_evicted"] == 2, counts
    sites = [s for s in chipmunk_compile.sessions_of(c)[0].sites if s.kind == "mlp"]
    assert [len(s._col_major) for s in sites] == [1, 1]  # the old copies are freed, not kept
    for a, b in zip(tri[1], ref[1]):
        assert ((a - b).norm() / b.norm()).item() < 1e-5


@interpreter_only
def test_w2_copy_refreshed_once_per_generation_not_at_every_dense_step(fresh_dynamo, monkeypatch):
    """Dense MLP steps at 0, 2, 4 and 6 of each 8-step generation: the copy is made at the first
    call and refreshed at the first dense step of each later generation only."""
    from chipmunk_compile.ops.sites import Site

    refreshes = []
    real = Site.column_major
    monkeypatch.setattr(Site, "column_major", lambda self, w, refresh=False: (
        refreshes.append(self.path) if refresh else None) or real(self, w, refresh))
    monkeypatch.setenv("CHIPMUNK_KERNELS", "triton")
    torch.manual_seed(0)
    model = TwoTinyBlocks().eval()
    cfg = {"attn": {"enabled": False}, "mlp": {**CFG["mlp"], "full_step_every": 2}}
    c = torch.compile(model, backend="chipmunk", options={"config": cfg, "compiler": "eager"}, fullgraph=True)
    x, drift = torch.randn(1, 150, 64), torch.randn(1, 150, 64)
    with torch.no_grad():
        for g in range(3):
            chipmunk_compile.reset(c)
            for i in range(8):
                c(x + 0.05 * i * drift)
    sites = chipmunk_compile.sessions_of(c)[0].sites
    assert all(s.steps == {"dense": 12, "sparse": 12} for s in sites), [s.steps for s in sites]
    assert sorted(refreshes) == sorted(s.path for s in sites for _ in range(3)), refreshes
    assert counters["chipmunk"]["w2_column_major_copy"] == len(sites)
