"""Models built and freed in one process (a notebook, a server that reloads weights) while Dynamo
keeps serving them with one graph. `GraphInstances` knows models by `id(model)` and blocks by a
weight's address, both of which CPython and the allocator give out again once freed. Until session
52 a new model given a freed model's id was placed after that model's blocks: its calls never began
a model call, so its steps never advanced and it ran a wrong schedule with nothing counted; and every
freed model's caches stayed allocated."""

import gc
import weakref

import torch
from torch._dynamo.utils import counters

import chipmunk_compile
from chipmunk_compile.ops.sites import GraphInstances
from helpers import fresh_dynamo  # noqa: F401
from test_two_models_one_graph import CFG, TimedBlocks


class Model:
    """Stands for a model (weak-referenceable, same size every time: CPython reuses a freed one's id)."""


def _freed_id_reused():
    """(a model, the id a freed model had): the new model has it."""
    for _ in range(100):
        old = Model()
        stale = id(old)
        del old
        new = Model()
        if id(new) == stale:
            return new, stale
    raise AssertionError("CPython never gave a freed object's id to the next one of its size")


def test_a_new_model_with_a_freed_models_id_begins_its_own_calls():
    inst = GraphInstances(attention_sites=1)
    forgotten = []
    inst.on_forget = forgotten.append
    for _ in range(100):  # the first model, two blocks at positions 0 and 1, then freed
        old = Model()
        stale = id(old)
        assert inst.enter(10, lambda: (0, old, old)) is True
        assert inst.enter(11, lambda: (1, None, old)) is False
        del old
        new = Model()
        if id(new) == stale:
            break
        inst = GraphInstances(attention_sites=1)
        inst.on_forget = forgotten.append
    else:
        raise AssertionError("CPython never gave a freed object's id to the next one of its size")
    # the new model's weights elsewhere: its first block begins a call at position 0, as the old one did
    assert inst.enter(20, lambda: (0, new, new)) is True
    assert inst.position == 0 and inst.current == 0
    assert forgotten == [{0, 1}]  # both of the freed model's ordinals, caches with them
    assert set(inst.keys) == {20}
    assert inst.enter(21, lambda: (1, None, new)) is False and inst.position == 1


def test_a_freed_blocks_weight_address_is_placed_anew():
    """The same key (a new model's weights where the freed one's were) is another module now."""
    inst = GraphInstances(attention_sites=1)
    forgotten = []
    inst.on_forget = forgotten.append
    a = Model()
    assert inst.enter(10, lambda: (0, a, a)) is True
    inst.enter(10, lambda: (0, a, a))
    assert forgotten == []  # alive: no lookup, nothing forgotten
    del a
    b, _ = _freed_id_reused()
    assert inst.enter(10, lambda: (0, b, b)) is True
    assert forgotten == [{0}] and inst.module() is b and inst.models_seen == 2


def test_a_live_model_keeps_its_place_when_another_is_freed():
    inst = GraphInstances(attention_sites=1)
    forgotten = []
    inst.on_forget = forgotten.append
    adopted = []
    inst.on_new_model = lambda module: adopted.append(id(module))  # no reference kept
    keep, gone = Model(), Model()
    inst.enter(1, lambda: (0, keep, keep))
    inst.enter(2, lambda: (0, gone, gone))
    assert adopted == [id(gone)]
    del gone
    fresh = Model()
    assert inst.enter(3, lambda: (0, fresh, fresh)) is True
    assert forgotten == [{1}] and adopted[-1] == id(fresh)  # the new model shares the session too
    assert inst.enter(1, lambda: (0, keep, keep)) is True and inst.current == 0


def test_models_built_and_freed_in_a_loop_track_their_steps_and_free_their_caches(fresh_dynamo):
    """Each generation on a new model (same weights), compiled anew and freed after: every
    generation runs the schedule of the first, and only the live model's caches stay allocated."""
    x, drift = torch.randn(1, 150, 64), torch.randn(1, 150, 64)
    steps, outs, sites = 6, [], None
    config = {**CFG, "schedule_steps": None}  # the periods as written (3): sparse steps at 6 steps
    state = TimedBlocks().eval().state_dict()
    for gen in range(4):
        model = TimedBlocks().eval()
        model.load_state_dict(state)
        compiled = torch.compile(model, backend="chipmunk", options={"config": config, "compiler": "eager"})
        with torch.no_grad():
            outs.append([compiled(x + 0.05 * i * drift, torch.full((1,), 1.0 - i / steps)) for i in range(steps)])
        (session,) = chipmunk_compile.sessions_of(compiled)
        sites = session.sites
        assert session.position().step == steps - 1, gen  # this model's calls advanced the steps
        live = [s for s in sites if s.states]
        assert live and all(len(s.states) == 1 for s in live), [list(s.states) for s in sites]
        if gen == 0:
            first = [dict(s.steps) for s in live]
            assert all(steps.get("sparse", 0) > 0 for steps in first), first
        # each model ran the first one's schedule (steps of every kind counted across models)
        assert [s.steps for s in live] == [{k: v * (gen + 1) for k, v in steps.items()} for steps in first]
        del model, compiled, session
        gc.collect()
    assert counters["stats"]["unique_graphs"] == 1  # one graph served every model
    assert counters["chipmunk"]["instances_freed"] == 3
    for gen in range(1, 4):  # the same weights and inputs: the same result, sparse steps included
        for a, b in zip(outs[gen], outs[0]):
            assert torch.equal(a, b), gen


def test_a_freed_models_step_graphs_go_with_it(fresh_dynamo, monkeypatch):
    """Step graphs (emulated on the CPU) hold their static inputs, the model's weights: a freed
    model's recordings are dropped when the next model is placed, so its weights are freed too,
    and the next model (same weights) records its own and gives the same outputs."""
    from chipmunk_compile import graphs
    from test_graphs import RANDOM, _generations
    from test_numerics import Net

    monkeypatch.setattr(graphs, "EMULATE", True)
    torch.manual_seed(0)
    state = Net().eval().state_dict()
    results, weights = [], None
    for gen in range(2):
        model = Net().eval()
        model.load_state_dict(state)
        compiled = torch.compile(model, backend="chipmunk", options={"config": RANDOM, "compiler": "eager"})
        outs, counts = _generations(compiled, 2)
        results.append(outs)
        assert counts[-1]["graph_replays"] > 0, counts
        (runner,) = [r for r in list(graphs._RUNNERS) if r.session in chipmunk_compile.sessions_of(compiled)]
        assert {k[1] for k in runner.graphs} == {0}  # one model's recordings, at its ordinal
        if weights is not None:
            gc.collect()
            assert not [w for w in weights if w() is not None]  # the first model's weights are free
        weights = [weakref.ref(p) for p in model.parameters()]
        del model, compiled, runner
        gc.collect()
    for a, b in zip(results[1][0] + results[1][1], results[0][0] + results[0][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
