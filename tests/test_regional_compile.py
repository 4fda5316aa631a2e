"""Regional compilation (diffusers' `compile_repeated_blocks`: one compiled graph serves every
block of a class): each block instance gets its own caches and layer number, so the results equal
whole-model compilation step for step, with real sparsity."""

import copy

import torch
import torch.nn as nn

import chipmunk_compile
from helpers import TinyBlock, fresh_dynamo  # noqa: F401


class Stack(nn.Module):
    def __init__(self, layers=4):
        super().__init__()
        self.blocks = nn.ModuleList([TinyBlock() for _ in range(layers)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


OPTIONS = {"config": {"attn": {"min_tokens": 0, "group": 64, "top_keys": 0.2, "random_keys": 0.0},
                      "mlp": {"min_tokens": 0, "block": 64, "top_keys": 0.3, "random_keys": 0.0},
                      "step_signal": "calls"}, "compiler": "eager"}


def _whole_and_regional(options):
    """(eager model, input, drift direction, whole-model compiled copy, per-block compiled copy)."""
    torch.manual_seed(0)
    model = Stack().eval()
    x, drift = torch.randn(2, 200, 64), torch.randn(2, 200, 64)
    whole = torch.compile(copy.deepcopy(model), backend="chipmunk", options=options)
    regional = copy.deepcopy(model)
    for block in regional.blocks:
        block.compile(backend="chipmunk", options=options)
    return model, x, drift, whole, regional


def test_regional_equals_whole_model(fresh_dynamo):
    model, x, drift, whole, regional = _whole_and_regional(OPTIONS)
    with torch.no_grad():
        for step in range(8):
            xs = x + 0.05 * step * drift  # (a constant shift would vanish in the LayerNorms)
            a, b, ref = whole(xs), regional(xs), model(xs)
            assert torch.equal(a, b), step
            if step > 1:
                assert ((a - ref).norm() / ref.norm()).item() > 1e-6  # really sparse
    sites = chipmunk_compile.stats(regional)["sites"]
    attn = [s for s in sites if s["kind"] == "attention"]
    assert len(attn) == 1  # one graph, one site ...
    assert sum(attn[0]["steps"].values()) == 4 * 8  # ... serving 4 blocks for 8 steps
    assert attn[0]["steps"]["dense"] == 2 * 8 + 2  # blocks 0-1 always dense, blocks 2-3 at step 0


def test_regional_with_step_graphs_equals_whole_model(fresh_dynamo, monkeypatch):
    """Recorded step graphs under regional compilation: one recording per block instance and step
    kind, replays bit-identical to whole-model compilation without graphs (emulated on CPU)."""
    from chipmunk_compile import graphs
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = Stack().eval()
    x, drift = torch.randn(2, 200, 64), torch.randn(2, 200, 64)
    whole = torch.compile(copy.deepcopy(model), backend="chipmunk", options=OPTIONS)
    with torch.no_grad():
        want = [whole(x + 0.05 * s * drift) for s in range(10)]
    monkeypatch.setattr(graphs, "EMULATE", True)
    regional = copy.deepcopy(model)
    for block in regional.blocks:
        block.compile(backend="chipmunk", options=OPTIONS)
    with torch.no_grad():
        for s in range(10):
            assert torch.equal(regional(x + 0.05 * s * drift), want[s]), s
    assert counters["chipmunk"]["graph_replays"] > 0


def test_step_graphs_of_many_blocks_are_replayed_not_rerecorded(fresh_dynamo, monkeypatch):
    """One compiled graph serving more blocks than MAX_GRAPHS: its recordings (one per block and step
    kind) all stay, so every signature is recorded once and then replayed (a fixed number of slots
    cycled by the blocks re-recorded on every call: 320 recordings and 6 replays here)."""
    from chipmunk_compile import graphs
    from torch._dynamo.utils import counters

    monkeypatch.setattr(graphs, "MAX_GRAPHS", 4)
    monkeypatch.setattr(graphs, "EMULATE", True)
    torch.manual_seed(0)
    model = Stack(layers=12).eval()
    x, drift = torch.randn(2, 200, 64), torch.randn(2, 200, 64)
    for block in model.blocks:
        block.compile(backend="chipmunk", options=OPTIONS)
    counters.clear()
    with torch.no_grad():
        for s in range(10):
            model(x + 0.05 * s * drift)
    c = counters["chipmunk"]
    signatures = c["graph_eager_calls"]  # each signature's first call runs eagerly
    assert c["graph_recorded"] <= signatures and "graph_evicted" not in c, dict(c)
    assert c["graph_replays"] >= 12 * 10 - 2 * signatures, dict(c)


def test_regional_forecasts_equal_whole_model(fresh_dynamo):
    """The residual and MLP-error forecasts keep their slope, rate and step scalars per block
    instance: regional compilation equals whole-model compilation step for step, and forecasts ran."""
    from torch._dynamo.utils import counters

    cfg = copy.deepcopy(OPTIONS)
    cfg["config"]["attn"].update(full_step_every=3, extrapolate=1.0)
    cfg["config"]["mlp"].update(full_step_every=3, extrapolate=1.0)
    _, x, drift, whole, regional = _whole_and_regional(cfg)
    with torch.no_grad():
        for step in range(10):
            xs = x + 0.05 * step * drift
            assert torch.equal(whole(xs), regional(xs)), step
    assert counters["chipmunk"]["attention_forecast"] > 0 and counters["chipmunk"]["mlp_forecast"] > 0
