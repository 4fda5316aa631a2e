"""Sites and caches live as long as the compiled graph they belong to (runtime.Session.watch /
prune): compiling a model again after torch._dynamo.reset() does not keep the first compile's
caches (they were twice the memory before), while a second live graph of the same model (a new
input shape) keeps its own sites beside the first graph's."""

import gc

import torch
from torch._dynamo.utils import counters

import chipmunk_compile
from chipmunk_compile.runtime import SITES

from helpers import chip, fresh_dynamo  # noqa: F401
from test_numerics import Net, run, sparse_cfg

CFG = sparse_cfg()


def _state(model):
    s = chipmunk_compile.stats(model)
    return s["state_bytes"], sorted(r["path"] for r in s["sites"])


def test_recompile_after_reset_frees_the_first_compile(fresh_dynamo):
    m = Net().eval()
    first, _ = run(m, chip(m, CFG), 6)
    bytes1, paths1 = _state(m)
    ids1 = [s.id for s in chipmunk_compile.runtime.sessions_of(m)[0].sites]
    assert bytes1 > 0 and paths1
    torch._dynamo.reset()
    gc.collect()
    second, _ = run(m, chip(m, CFG), 6)
    assert _state(m) == (bytes1, paths1)  # the same sites and caches, once
    assert not any(i in SITES for i in ids1)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_live_graphs_keep_their_sites(fresh_dynamo):
    m = Net().eval()
    cm = chip(m, CFG)
    run(m, cm, 4, n=64)
    _, paths64 = _state(m)
    run(m, cm, 4, n=48)  # a second graph (new shape); the first stays in Dynamo's cache
    gc.collect()
    _, paths_both = _state(m)
    assert len(paths_both) == 2 * len(paths64)
    counters["chipmunk"].clear()
    outs, refs = run(m, cm, 4, n=64)  # the first graph still finds its sites and caches
    assert not any(k.startswith("fallback") for k in counters["chipmunk"]), dict(counters["chipmunk"])
    for a, b in zip(outs, refs):
        assert (a - b).abs().max() / b.abs().max() < 0.1
