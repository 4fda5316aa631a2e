"""Regional compilation (diffusers' `compile_repeated_blocks`: one compiled graph serves every
block of a class): each block instance gets its own caches and layer number, so the results equal
whole-model compilation step for step, with real sparsity."""

import copy

import pytest
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


def _stack_of_compiled_blocks(layers: int, options=OPTIONS):
    torch.manual_seed(0)
    model = Stack(layers=layers).eval()
    for block in model.blocks:
        block.compile(backend="chipmunk", options=options)
    return model


def test_recordings_share_their_input_buffers(fresh_dynamo, monkeypatch):
    """Every recording of one compiled graph at one input layout reads the same input buffers (a
    replay copies the call's inputs into them): the device holds one block call's inputs plus each
    recording's outputs, and a returned output is a copy that later replays leave untouched."""
    from chipmunk_compile import graphs
    from torch._dynamo.utils import counters

    monkeypatch.setattr(graphs, "EMULATE", True)
    model = _stack_of_compiled_blocks(6)
    x, drift = torch.randn(2, 200, 64), torch.randn(2, 200, 64)
    one = x.numel() * x.element_size()  # a block's input, or its output
    with torch.no_grad():
        for s in range(8):
            outs = []
            xs = x + 0.05 * s * drift
            for block in model.blocks:
                xs = block(xs)
                outs.append((xs, xs.clone()))
            assert all(torch.equal(a, b) for a, b in outs), s  # no output was overwritten by a later replay
    c = counters["chipmunk"]
    assert c["graph_recorded"] >= 6 and c["graph_replays"] > c["graph_recorded"], dict(c)
    runners = [r for r in list(graphs._RUNNERS) if r.graphs]
    assert len(runners) == 1 and len(runners[0].inputs) == 1
    assert graphs.held_bytes(x.device) == one * (1 + len(runners[0].graphs))


def test_budget_counts_shared_inputs_once(fresh_dynamo, monkeypatch):
    """A budget of one block input and three outputs makes exactly three recordings (counting each
    recording's own inputs, it made two); a budget below one call's buffers records nothing and
    runs every call eagerly, with the same outputs."""
    from chipmunk_compile import graphs
    from torch._dynamo.utils import counters

    x, drift = torch.randn(2, 200, 64), torch.randn(2, 200, 64)
    one = x.numel() * x.element_size()
    monkeypatch.setattr(graphs, "EMULATE", False)
    eager = _stack_of_compiled_blocks(6)
    with torch.no_grad():
        want = [eager(x + 0.05 * s * drift) for s in range(6)]
    results = {}
    for units in (4, 1.5):
        torch._dynamo.reset()
        counters.clear()
        monkeypatch.setattr(graphs, "EMULATE", True)
        options = dict(OPTIONS, config=dict(OPTIONS["config"], cuda_graphs_max_gib=units * one / 2**30))
        model = _stack_of_compiled_blocks(6, options)
        with torch.no_grad():
            for s in range(6):
                assert torch.equal(model(x + 0.05 * s * drift), want[s]), (units, s)
        results[units] = dict(counters["chipmunk"])
    fits, short = results.values()
    assert fits["graph_recorded"] == 3 and fits["graph_disabled:memory_budget"] >= 1, fits
    assert "graph_recorded" not in short and short["graph_disabled:memory_budget"] >= 1, short


def _tiny_flux(h=16, w=16):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                   attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64,
                                   pooled_projection_dim=32, axes_dims_rope=(16, 24, 24)).eval()
    ids = torch.zeros(h * w, 3)
    ids[:, 1], ids[:, 2] = torch.arange(h).repeat_interleave(w).float(), torch.arange(w).repeat(h).float()
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, h * w, 16, generator=g), encoder_hidden_states=torch.randn(1, 16, 64, generator=g),
              pooled_projections=torch.randn(1, 32, generator=g), img_ids=ids, txt_ids=torch.zeros(16, 3), return_dict=False)
    return model, kw


def test_regional_flux_blocks_run_the_pinned_step(fresh_dynamo):
    """FLUX under regional compilation: its first single block's first call has other input strides
    than the later blocks', so Dynamo compiles a second graph that first sees single block 1. That
    block used to begin each model call, and single block 0, called before it, ran every step at the
    previous step's position: sparse at step 0 of the next generation, on the last generation's
    caches. Now blocks are numbered in model order: step 0 is dense everywhere, and a generation
    pinned by set_step repeats the previous one exactly. The second graph joins the first one's
    session, and single block 0's caches follow it there at step 1 (until session 67 they stayed
    allocated in the first graph, and it refilled them a refresh late in the first generation,
    counted as fallbacks): no two graphs hold a block's caches at one site."""
    from torch._dynamo.utils import counters

    model, kw = _tiny_flux()
    cfg = {"attn": {"min_tokens": 0, "first_n_dense_layers": 1, "top_keys": 0.2},
           "mlp": {"min_tokens": 0, "first_n_dense_layers": 1, "top_keys": 0.3}, "step_signal": "calls"}
    model.compile_repeated_blocks(backend="chipmunk", options={"config": cfg, "compiler": "eager"})
    gens = []
    with torch.no_grad():
        for _ in range(3):
            outs = []
            for i in range(6):
                chipmunk_compile.set_step(model, i)  # also before the very first call: its blocks' sessions take it
                before = dict(counters["chipmunk"])
                outs.append(model(**dict(kw, hidden_states=kw["hidden_states"] + 0.05 * i, timestep=torch.full((1,), 1 - i / 6)))[0])
                ran = {k for k, v in counters["chipmunk"].items() if v != before.get(k, 0)}
                if i == 0:
                    assert not ran & {"attention_sparse", "attention_refresh", "mlp_sparse"}, ran
            gens.append(outs)
    assert counters["chipmunk"]["graphs"] >= 3  # the second single-block graph this is about
    assert counters["chipmunk"]["attention_sparse"] > 0
    assert counters["chipmunk"]["state_followed_module"] > 0
    assert not any(k.startswith("fallback:") for k in counters["chipmunk"]), dict(counters["chipmunk"])
    holders = {}  # (site of the code, block) -> the sites (graphs) holding its caches
    for session in chipmunk_compile.runtime.sessions_of(model):
        for site in session.sites:
            for st in site.states.values():
                holders.setdefault((site.twin, site.graph.identity(st.instance)), set()).add(site.id)
    assert holders and all(len(ids) == 1 for ids in holders.values()), holders
    for i, (a, b, c) in enumerate(zip(*gens)):
        assert torch.equal(a, b) and torch.equal(b, c), i


@pytest.mark.parametrize("grouping", [False, True])
def test_regional_flux_numbers_blocks_as_the_whole_model(fresh_dynamo, grouping):
    """Blocks compiled on their own count in model order across classes (FLUX: 2 double blocks,
    then 3 single blocks as layers 2-4), so `first_n_dense_layers` keeps the same blocks dense as
    whole-model compilation: the generations after the first equal the whole model's bit for bit.
    (The first differs: the first single block's first call goes to a graph of its own, so its
    caches in the later graph fill one refresh later.) Per class, single block 0 was a layer 0 as
    well and stayed dense. With grouping on, a block sees no img_ids but the rotary tables the
    model passes it, decoded into the same 16×8 grid and text side (rotary_grid.py; until session
    41 the blocks ran ungrouped). Generations alternate 16×8 and 8×16 tokens (one graph: the
    grid of each generation from its own ids / tables, ids_regrouping.py)."""
    import copy

    base, kw = _tiny_flux(16, 8)
    _, kw_t = _tiny_flux(8, 16)
    cfg = {"attn": {"min_tokens": 0, "first_n_dense_layers": 1, "top_keys": 0.2, "group": 16},
           "mlp": {"min_tokens": 0, "first_n_dense_layers": 1, "top_keys": 0.3, "block": 16},
           "step_signal": "calls", "grouping": {"enabled": grouping}}
    options = {"config": cfg, "compiler": "eager"}
    whole = torch.compile(copy.deepcopy(base), backend="chipmunk", options=options)
    regional = copy.deepcopy(base)
    regional.compile_repeated_blocks(backend="chipmunk", options=options)

    def generation(model, kw):
        outs = []
        with torch.no_grad():
            for i in range(6):
                chipmunk_compile.set_step(model, i)
                x = dict(kw, hidden_states=kw["hidden_states"] + 0.05 * i, timestep=torch.full((1,), 1 - i / 6))
                outs.append(model(**x)[0])
        return outs

    generation(whole, kw), generation(regional, kw)
    for g, inputs in enumerate([kw, kw_t, kw, kw_t]):
        for i, (a, b) in enumerate(zip(generation(whole, inputs), generation(regional, inputs))):
            assert torch.equal(a, b), (g, i)
    sites = chipmunk_compile.stats(regional)["sites"]
    if grouping:
        assert all(s["grouping"].startswith("rotary table input image_rotary_emb (cos, sin) after 16 other rows h×w 16×8")
                   for s in sites if s["kind"] == "attention"), sites
        # (the graph of single block 0's first call, with other strides, serves no later call)
        assert sum("8×16" in s.get("grouping_now", "") for s in sites if s["kind"] == "attention") >= 2, sites
    else:
        assert all(s["grouping"] == "none: grouping disabled" for s in sites), sites


def test_budget_freed_later_goes_to_a_signature_refused_before(fresh_dynamo, monkeypatch):
    """A budget of one block input and one output holds one recording; the signatures refused
    meanwhile are counted once each and stay eager, without a budget check per call until some
    recording is dropped. Once drops free budget (here: the recording dropped by hand, as an
    eviction or a moved weight drops it, and the budget raised), they are recorded on their next
    calls; the outputs stay those of eager calls throughout."""
    from chipmunk_compile import graphs
    from torch._dynamo.utils import counters

    x, drift = torch.randn(2, 200, 64), torch.randn(2, 200, 64)
    one = x.numel() * x.element_size()
    eager = _stack_of_compiled_blocks(6)
    with torch.no_grad():
        want = [eager(x + 0.05 * s * drift) for s in range(12)]
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(graphs, "EMULATE", True)
    options = dict(OPTIONS, config=dict(OPTIONS["config"], cuda_graphs_max_gib=2 * one / 2**30))
    model = _stack_of_compiled_blocks(6, options)
    with torch.no_grad():
        for s in range(12):
            if s == 6:
                (runner,) = [r for r in list(graphs._RUNNERS) if r.refused]
                c = dict(counters["chipmunk"])
                assert c["graph_recorded"] == 1 and c["graph_disabled:memory_budget"] == len(runner.refused), c
                refused = set(runner.refused)
                for key in list(runner.graphs):
                    runner._drop(key)
                runner.max_bytes = float("inf")
            assert torch.equal(model(x + 0.05 * s * drift), want[s]), s
    c = counters["chipmunk"]
    assert c["graph_disabled:memory_budget"] == len(refused), dict(c)  # not counted again
    assert refused & set(runner.graphs), "no refused signature was recorded later"
    assert c["graph_recorded"] > 1 and c["graph_replays"] > 10, dict(c)


@pytest.mark.parametrize("shapes", [2, 1])
def test_regional_blocks_keep_their_step_graphs_across_alternating_sizes(fresh_dynamo, monkeypatch, shapes):
    """Blocks compiled one by one with symbolic shapes, generations alternating 200 and 264 tokens
    (emulated step graphs): with `state_shapes` 2 every block instance keeps both sizes' caches and
    recordings, so from each size's third generation on every block call replays; with 1 every
    switch records again. The outputs are the same either way, and equal whole-model compilation's."""
    from chipmunk_compile import graphs
    from torch._dynamo.utils import counters

    options = {**OPTIONS, "config": {**OPTIONS["config"], "state_shapes": shapes}}
    torch.manual_seed(0)
    model = Stack().eval()
    inputs = {n: (torch.randn(2, n, 64), torch.randn(2, n, 64)) for n in (200, 264)}
    whole = torch.compile(copy.deepcopy(model), backend="chipmunk", options=options, dynamic=True)
    monkeypatch.setattr(graphs, "EMULATE", True)
    regional = copy.deepcopy(model)
    for block in regional.blocks:
        block.compile(backend="chipmunk", options=options, dynamic=True)
    eager = []
    with torch.no_grad():
        for n in (200, 264) * 4:
            x, drift = inputs[n]
            before = counters["chipmunk"]["graph_eager_calls"]
            for s in range(8):
                monkeypatch.setattr(graphs, "EMULATE", False)
                want = whole(x + 0.05 * s * drift)
                monkeypatch.setattr(graphs, "EMULATE", True)
                assert torch.equal(regional(x + 0.05 * s * drift), want), (n, s)
            eager.append(counters["chipmunk"]["graph_eager_calls"] - before)
            chipmunk_compile.reset(whole)
            chipmunk_compile.reset(regional)
    if shapes == 2:
        assert eager[0] > 0 and eager[-4:] == [0, 0, 0, 0], eager
    else:
        assert min(eager) > 0, eager
