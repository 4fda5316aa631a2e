"""`runtime.sessions_of` (what set_step, stats and reset look up on every call) keeps its result per
model and finds sessions made or attached later: a session created or replaced, or any submodule
registered anywhere, makes it walk the module tree again. Its cache holds no session alive."""

import gc
import weakref

import torch

import chipmunk_compile
from chipmunk_compile import runtime

from helpers import chip, fresh_dynamo  # noqa: F401
from test_numerics import Net, run, sparse_cfg

CFG = sparse_cfg()


def _walks(monkeypatch) -> list:
    calls = []
    original = runtime._find_sessions

    def counted(model):
        calls.append(model)
        return original(model)

    monkeypatch.setattr(runtime, "_find_sessions", counted)
    return calls


def test_the_lookup_is_kept_and_set_step_does_not_walk_the_model(fresh_dynamo, monkeypatch):
    m = Net().eval()
    cm = chip(m, CFG)
    run(m, cm, 2)
    walks = _walks(monkeypatch)
    first = runtime.sessions_of(cm)
    assert len(first) == 1 and len(walks) == 1
    for step in range(3):
        chipmunk_compile.set_step(cm, step, branch="0")
    assert runtime.sessions_of(cm) == first
    assert len(walks) == 1
    assert first[0].tracker.explicit == (2, "0")


def test_a_submodule_compiled_later_is_found(fresh_dynamo, monkeypatch):
    outer = torch.nn.ModuleDict({"a": Net().eval(), "b": Net(depth=1).eval()})
    a = chip(outer["a"], CFG)
    run(outer["a"], a, 2)
    assert len(runtime.sessions_of(outer)) == 1
    b = chip(outer["b"], CFG)
    run(outer["b"], b, 1)  # a new session: the kept lookup is stale
    walks = _walks(monkeypatch)
    assert len(runtime.sessions_of(outer)) == 2 and len(walks) == 1


def test_a_compiled_module_attached_later_is_found(fresh_dynamo):
    m, other = Net().eval(), Net(depth=1).eval()
    cm, co = chip(m, CFG), chip(other, CFG)
    run(m, cm, 2)
    run(other, co, 2)  # its session exists before it joins m
    assert len(runtime.sessions_of(cm)) == 1
    m.extra = other  # setattr registers a submodule: the kept lookup is stale
    found = runtime.sessions_of(cm)
    assert len(found) == 2 and runtime.sessions_of(other)[0] in found


def test_the_kept_lookup_holds_no_session_alive(fresh_dynamo):
    m = Net().eval()
    cm = chip(m, CFG)
    run(m, cm, 2)
    ref = weakref.ref(runtime.sessions_of(cm)[0])
    del m, cm
    torch._dynamo.reset()
    gc.collect()
    assert ref() is None


def test_the_model_containing_a_module_is_kept_weakly_and_looked_up_once():
    """runtime._set_on (the diffusers context and the followed scheduler of a block): the containing
    model is found once per module tree and registry, a model under none is not walked again, a
    module attached later is found, and the kept lookup does not keep the model alive."""
    registry, roots = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()
    model, other = Net().eval(), Net(depth=1).eval()
    registry[model] = "ctx"
    walks = []
    real = model.modules
    model.modules = lambda: (walks.append(1), real())[1]
    assert runtime._set_on(registry, roots, model.blocks[1]) == "ctx"
    assert runtime._set_on(registry, roots, model.blocks[1]) == "ctx" and len(walks) == 1
    assert runtime._set_on(registry, roots, other.blocks[0]) is None
    assert runtime._set_on(registry, roots, other.blocks[0]) is None and len(walks) == 2  # not walked again
    model.extra = other  # the tree changed: other's block is now under model
    assert runtime._set_on(registry, roots, other.blocks[0]) == "ctx"
    block, ref = model.blocks[0], weakref.ref(model)
    assert runtime._set_on(registry, roots, block) == "ctx"
    del model, real
    gc.collect()
    assert ref() is None  # the kept lookup of `block` holds no strong reference to its model


class SlicesBlocks(Net):
    """A forward that builds a module while it runs: slicing a ModuleList makes a new one
    (add_module), as MotifVideo's forward does."""

    def forward(self, x, t, mask=None):
        x = x + self.t_proj(t.view(-1, 1) / 1000.0)[:, None, :]
        for b in self.blocks[: len(self.blocks)]:
            x = b(x, mask)
        return x


def test_modules_built_inside_a_compiled_forward_do_not_recompile_it(fresh_dynamo):
    """The tree hook (installed by the first lookup: stats, set_step, follow_scheduler) ran inside
    the traced forward: Dynamo guarded on its counter and replayed the bump after every call, so the
    model recompiled on every call with new, empty caches, and never ran a sparse step."""
    runtime.sessions_of(torch.nn.Linear(1, 1))  # what any earlier stats()/set_step does: the hook is in
    assert runtime._tree_hook is not None
    m = SlicesBlocks().eval()
    cm = chip(m, CFG)
    outs, refs = run(m, cm, 6)
    assert fresh_dynamo["chipmunk"]["graphs"] == 1, dict(fresh_dynamo["chipmunk"])
    steps = {k for s in chipmunk_compile.stats(cm)["sites"] for k in s["steps"]}
    assert "sparse" in steps and not any(k.startswith("fallback") for k in fresh_dynamo["chipmunk"])
