"""The CUDA-graph step runner (graphs.py), emulated on CPU: per-signature recording and replay,
deferred commits, counters, the decision check that catches a wrong signature, deferral when a
recording would allocate, and the device-step random draws."""

import gc
import weakref

import pytest
import torch
from torch._dynamo.utils import counters

import chipmunk_compile
from chipmunk_compile import graphs
from chipmunk_compile.kernels.random_draws_ref import hash_ints
from chipmunk_compile.ops.sites import Site
from chipmunk_compile.runtime import sessions_of

from helpers import ccount, chip, fresh_dynamo, step_counts  # noqa: F401
from test_numerics import Net, latents, sparse_cfg, ts

RANDOM = sparse_cfg(attn={"random_keys": 0.1}, mlp={"random_keys": 0.1, "block_mask_cache": 2, "full_step_every": 6})


def _generation(cm, steps=10, branches=2, n=64):
    outs = []
    with torch.no_grad():
        for i in range(steps):
            for b in range(branches):
                outs.append(cm(latents(i, n, seed=1 + b), ts(i)))
    return outs


def _run(emulate: bool, monkeypatch, generations=2, config=RANDOM):
    monkeypatch.setattr(graphs, "EMULATE", emulate)
    torch._dynamo.reset()
    counters.clear()
    m = Net().eval()
    cm = chip(m, config)
    outs = [_generation(cm) for _ in range(generations)]
    return step_counts(m), outs, dict(counters["chipmunk"])  # counted now: a reset frees the sites


@pytest.mark.parametrize("forecast,new_indices", [(False, False), (True, False), (True, True)])
def test_emulated_graphs_match_eager(fresh_dynamo, monkeypatch, forecast, new_indices):
    """Step graphs (emulated on the CPU) give the eager outputs bit for bit; with the forecast both with
    the first key indices kept (the default: the cache build measures the slope) and with new indices
    at every refresh (a second column-sparse pass measures it under the old ones)."""
    config = sparse_cfg(attn={"random_keys": 0.1, "extrapolate": 1.0, "recompute_mask": new_indices},
                        mlp={**RANDOM["mlp"], "extrapolate": 1.0}) if forecast else RANDOM
    gens = 3 if forecast else 2  # the forecast splits the sparse steps over two signatures
    sc0, eager, c0 = _run(False, monkeypatch, gens, config=config)
    sc1, graphed, c1 = _run(True, monkeypatch, gens, config=config)
    for gen_e, gen_g in zip(eager, graphed):
        for a, b in zip(gen_e, gen_g):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert c0.get("graph_replays", 0) == 0  # CPU without emulation: the runner stays out of the way
    assert c1["graph_recorded"] > 0 and c1["graph_replays"] > c1["graph_recorded"]
    assert sc0 == sc1 and sc0
    for k in ("attention_sparse", "attention_refresh", "mlp_sparse", "mlp_dense"):
        assert c0[k] == c1[k], k  # replays re-apply the counters their recording produced
    assert not any(k.startswith("fallback:") for k in c1)
    # the second generation repeats the first exactly (random draws hashed from the device step)
    for a, b in zip(graphed[0], graphed[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _generations(cm, n: int, between=None) -> tuple[list, list]:
    """n generations of `cm`: their outputs and the runner's counters per generation; `between(cm)`
    after each (else the tracker sees each new generation from the timestep going back up)."""
    outs, counts = [], []
    keys = ("graph_recorded", "graph_eager_calls", "graph_replays")
    for _ in range(n):
        before = dict(counters["chipmunk"])
        outs.append(_generation(cm))
        counts.append({k: counters["chipmunk"][k] - before.get(k, 0) for k in keys})
        if between is not None:
            between(cm)
    return outs, counts


def test_reset_between_generations_keeps_caches_and_step_graphs(fresh_dynamo, monkeypatch):
    """`reset(model)` between generations (the README's "next generation") runs each generation as
    when the tracker sees it begin: same outputs bit for bit, same recordings and replays, caches
    kept. Until session 44 it dropped the caches and every step graph, so each generation ran its
    calls eagerly and recorded them again (10 eager calls and 4 replays of 20 in every generation)."""
    monkeypatch.setattr(graphs, "EMULATE", True)
    auto_outs, auto_counts = _generations(chip(Net().eval(), RANDOM), 4)
    torch._dynamo.reset()
    counters.clear()
    m = Net().eval()
    cm = chip(m, RANDOM)
    state = []
    reset_outs, reset_counts = _generations(
        cm, 4, lambda c: (chipmunk_compile.reset(c), state.append(chipmunk_compile.stats(c)["state_bytes"])))
    assert reset_counts == auto_counts and reset_counts[-1]["graph_eager_calls"] == 0
    assert state[0] > 0 and len(set(state)) == 1
    for gen_a, gen_r in zip(auto_outs, reset_outs):
        for a, b in zip(gen_a, gen_r):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_release_frees_caches_and_step_graphs(fresh_dynamo, monkeypatch):
    """`release(model)` frees every cache and recording (and the layouts' input buffers); the next
    generation runs as the first one did: eagerly first, then recorded, with the same outputs."""
    monkeypatch.setattr(graphs, "EMULATE", True)
    m = Net().eval()
    cm = chip(m, RANDOM)
    outs, counts = _generations(cm, 2)
    runners = [r for r in list(graphs._RUNNERS) if r.session in sessions_of(cm)]
    assert runners and any(r.graphs for r in runners) and chipmunk_compile.stats(cm)["state_bytes"] > 0
    caches = [weakref.ref(t) for ses in sessions_of(cm) for s in ses.sites for st in s.states.values()
              for t in st.cache.values()]
    assert caches
    chipmunk_compile.release(cm)
    assert chipmunk_compile.stats(cm)["state_bytes"] == 0
    gc.collect()
    assert not [r for r in caches if r() is not None]  # nothing holds them: the memory is free
    assert not any(r.graphs or r.inputs for r in runners) and graphs.held_bytes(runners[0].device) == 0
    after, after_counts = _generations(cm, 1)
    assert after_counts[0] == counts[0] and chipmunk_compile.stats(cm)["state_bytes"] > 0
    for a, b in zip(outs[0], after[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_wrong_signature_is_caught(fresh_dynamo, monkeypatch):
    """If the signature missed a decision, a replay would run the wrong step: emulation checks
    every replay against the decisions the ops make."""
    monkeypatch.setattr(graphs, "EMULATE", True)
    monkeypatch.setattr(Site, "signature", lambda self, pos, layout: ("constant",))
    m = Net().eval()
    cm = chip(m, RANDOM)
    with pytest.raises(AssertionError, match="recording decided"):
        _generation(cm)


def test_recording_that_would_allocate_runs_eagerly(fresh_dynamo, monkeypatch):
    """Steps 2 and 3 share a signature (sparse attention, MLP with new indices): step 3 is
    recorded. With the MLP's index buffer gone, the recording would allocate it: it is dropped,
    the call runs eagerly (and allocates outside any graph pool), and the result is unchanged."""
    ref_m = Net().eval()
    ref = chip(ref_m, RANDOM)
    with torch.no_grad():
        want = [ref(latents(i), ts(i)) for i in range(5)]
    torch._dynamo.reset()
    monkeypatch.setattr(graphs, "EMULATE", True)
    m = Net().eval()
    cm = chip(m, RANDOM)
    with torch.no_grad():
        for i in range(5):
            if i == 3:
                site = next(s for s in sessions_of(m)[0].sites if s.kind == "mlp")
                site.state_of("0").cache.pop("indices")  # rewritten in full by this step's selection
            torch.testing.assert_close(cm(latents(i), ts(i)), want[i], rtol=0, atol=0)
    assert ccount("graph_record_deferred") == 1


def test_hash_draws_reproducible_and_spread():
    step = torch.tensor([7], dtype=torch.int64)
    a = hash_ints(step, 3, (4, 1000), 97)
    assert a.shape == (4, 1000) and a.dtype == torch.int64
    assert int(a.min()) >= 0 and int(a.max()) < 97
    torch.testing.assert_close(a, hash_ints(step.clone(), 3, (4, 1000), 97))
    assert not torch.equal(a, hash_ints(step + 1, 3, (4, 1000), 97))
    assert not torch.equal(a, hash_ints(step, 4, (4, 1000), 97))

    def by_hand(i, salt, step, high):  # the formula in Python ints (the select kernel computes it too)
        m = 0xFFFFFFFF
        x = (i * 0x9E3779B1 + salt * 0x85EBCA6B + step * 0xC2B2AE35) & m
        for _ in range(2):
            x = (((x >> 16) ^ x) * 0x45D9F3B) & m
        return ((x >> 16) ^ x) % high

    assert [int(v) for v in a.view(-1)[[0, 1, 999, 3999]]] == [by_hand(i, 3, 7, 97) for i in (0, 1, 999, 3999)]
    counts = torch.bincount(a.flatten(), minlength=97).float()
    chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum().item()
    assert chi2 < 150, chi2  # 96 degrees of freedom: uniform draws give ~96 ± 14


def test_static_inputs_and_mutation_detection():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, buf):
            buf.add_(1)
            return self.lin(x)

    seen = {}

    def backend(gm, example_inputs, **_):
        seen["static"] = graphs.static_input_indices(gm)
        seen["mutates"] = graphs.mutates_inputs(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(M(), backend=backend)(torch.randn(2, 4), torch.zeros(3))
    assert len(seen["static"]) == 2 and seen["mutates"]


def test_data_dependent_shapes_keep_every_call_eager(fresh_dynamo, monkeypatch):
    """A graph whose shapes depend on data (Mochi keeps its valid text tokens with nonzero()) syncs
    with the host: the runner never tries to record it (a failed capture can leave the CUDA RNG in
    capture mode), counts why once, and the results equal the plain compiled ones."""
    from helpers import TinyBlock

    class Gathered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = TinyBlock()

        def forward(self, x, keep):
            return self.block(x) * x[:, keep.nonzero().squeeze(-1)].mean()

    monkeypatch.setattr(torch._dynamo.config, "capture_dynamic_output_shape_ops", True)
    seen = {}

    def probe(gm, example_inputs, **_):
        seen["dd"] = graphs.data_dependent_shapes(gm)
        return gm.forward

    x, keep = torch.randn(1, 40, 64), torch.ones(40, dtype=torch.bool)
    torch.compile(Gathered(), backend=probe, fullgraph=True)(x, keep)
    assert seen["dd"] and not graphs.data_dependent_shapes(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)))
    outs = {}
    for emulate in (False, True):
        monkeypatch.setattr(graphs, "EMULATE", emulate)
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        cm = chip(Gathered().eval(), sparse_cfg())
        with torch.no_grad():
            outs[emulate] = [cm(x + 0.01 * i, keep) for i in range(4)]
        assert ccount("graph_recorded") == 0 and ccount("graph_replays") == 0
    assert ccount("graph_disabled:data_dependent_shapes") >= 1
    for a, b in zip(outs[False], outs[True]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_step_cache_over_recorded_graphs(fresh_dynamo, monkeypatch):
    """Step caching skips calls before the runner: skipped steps return the last computed output
    (a clone of the graph's output, never graph-pool memory) and computed steps replay."""
    conf = {**RANDOM, "step_cache": {"enabled": True, "skip_steps": [3, 5, 6, 9]}}
    outs = {}
    for emulate in (False, True):
        monkeypatch.setattr(graphs, "EMULATE", emulate)
        torch._dynamo.reset()
        counters.clear()
        m = Net().eval()
        outs[emulate] = _generation(chip(m, conf), steps=12, branches=1) + _generation(chip(m, conf), steps=12,
                                                                                        branches=1)
        assert ccount("step_cache_skipped") == 6 and ccount("step_cache_kept_refresh") == 2  # step 6: MLP dense
    for a, b in zip(outs[False], outs[True]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ccount("graph_replays") > 0


def test_pool_renewed_once_its_graphs_are_gone(monkeypatch):
    """PyTorch releases a private pool with its last graph; recording into the stale id failed on
    the H200 after a re-compile (every step graph then ran eagerly). The session keeps its pool
    while a graph recorded into it lives, and takes a new one after."""
    handles = iter(range(100))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", next(handles)))

    class Graph:  # stands in for a recorded _CudaGraph
        pass

    session = chipmunk_compile.runtime.Session(chipmunk_compile.ChipmunkConfig(), None)
    first = graphs.shared_pool(session)
    g1, g2 = Graph(), Graph()
    session.graph_pool_users.add(g1)
    assert graphs.shared_pool(session) == first  # shared while a recording lives
    session.graph_pool_users.add(g2)
    del g1
    assert graphs.shared_pool(session) == first
    del g2  # e.g. torch._dynamo.reset() freed the compiled graph and its recordings
    second = graphs.shared_pool(session)
    assert second != first


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records ops that read tensor data on the host (a sync a CUDA graph capture cannot do),
    issued while a step is being recorded or replayed."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default,
             torch.ops.aten.lift_fresh.default)  # torch.tensor(host data): a host-to-device copy on GPU

    def __init__(self):
        super().__init__()
        self.seen, self.active = [], False

    def note(self, what: str) -> None:
        import traceback

        here = [f for f in traceback.extract_stack() if "chipmunk_compile" in f.filename]
        self.seen.append((what, f"{here[-1].filename.split('/')[-1]}:{here[-1].lineno}" if here else "?"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if chipmunk_compile.runtime.RECORDING is not None:
            bool_index = func is torch.ops.aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
            if func in self.READS or bool_index:
                self.note(str(func))
        return func(*args, **(kwargs or {}))


def test_recorded_steps_never_read_device_data(fresh_dynamo, monkeypatch):
    """The reference kernels are also the GPU path for what the Triton kernels do not cover (head
    dims other than 64/128, ...): a step that runs them must record into a CUDA graph, so no kernel
    on the dense, refresh or sparse path may read tensor data on the host (found on the H200: the
    column-sparse reference's boolean row mask, the MLP references' int(counts), the sampled
    column sums' offsets built on the host and the permutation moved there). Every kernel
    the ops call runs under a dispatch mode that records such reads (Dynamo itself refuses to trace
    under a mode, so it is entered per kernel call)."""
    import sys

    from chipmunk_compile.ops import _dispatch

    mode = _HostReads()

    def watched(name, *tensors, **kw):
        impl = _dispatch.kernel(name, *tensors, **kw)

        def run(*args, **kwargs):
            mode.active = True
            try:
                with mode:
                    return impl(*args, **kwargs)
            finally:
                mode.active = False
        return run

    # int()/bool()/.item() of a tensor inside a custom op's kernel do not reach the mode: watch them
    for method in ("__int__", "__bool__", "__float__", "__index__", "item", "tolist"):
        def reading(self, *a, _orig=getattr(torch.Tensor, method), _name=method, **k):
            if chipmunk_compile.runtime.RECORDING is not None and mode.active:
                mode.note(f"Tensor.{_name}")
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, method, reading)
    for name in ("attention", "exact_attention", "mlp"):  # the op modules (their package exports the ops)
        monkeypatch.setattr(sys.modules[f"chipmunk_compile.ops.{name}"], "kernel", watched)
    monkeypatch.setattr(graphs, "EMULATE", True)
    counters.clear()
    m = Net().eval()
    cm = chip(m, RANDOM)
    outs = [_generation(cm) for _ in range(2)]
    assert counters["chipmunk"]["graph_replays"] > 0 and outs
    kinds = step_counts(m)
    assert kinds.get("attention_sparse") and kinds.get("attention_refresh") and kinds.get("mlp_sparse"), kinds
    assert not mode.seen, sorted(set(mode.seen))


def test_recording_outputs_are_aliases_that_do_not_hold_memory():
    """After a capture, a recording swaps its outputs for aliases that read the same memory but
    do not keep it allocated (later captures of the pool reuse it); an output that is a graph
    input stays as it is."""
    from torch.multiprocessing.reductions import StorageWeakRef

    inp = torch.randn(3, 4)
    made = torch.randn(5, 6)[1:4, ::2]  # a strided view into storage allocated by the "capture"
    outs, owned = graphs._unowned((made, inp, None), [inp, torch.ones(2)])
    alias, same, none = outs
    assert same is inp and none is None and owned == [inp]
    assert torch.equal(alias, made) and alias.data_ptr() == made.data_ptr() and alias.stride() == made.stride()
    ref = StorageWeakRef(made.untyped_storage())
    del made
    assert ref.expired()  # the alias kept nothing alive
    single, owned = graphs._unowned(inp * 2, [inp])
    assert isinstance(single, torch.Tensor) and owned == []


def _alternating(emulate: bool, monkeypatch, shapes: int, counts=(64, 96, 64, 96, 64, 96)):
    """Generations at token counts `counts` through one symbolic graph (a server alternating two
    resolutions); (outputs, eager calls per generation, counters)."""
    monkeypatch.setattr(graphs, "EMULATE", emulate)
    torch._dynamo.reset()
    counters.clear()
    cm = chip(Net().eval(), {**RANDOM, "state_shapes": shapes}, dynamic=True)
    outs, eager = [], []
    for n in counts:
        before = counters["chipmunk"]["graph_eager_calls"]
        outs.append(_generation(cm, n=n))
        eager.append(counters["chipmunk"]["graph_eager_calls"] - before)
    return outs, eager, dict(counters["chipmunk"])


def test_alternating_resolutions_keep_their_caches_and_step_graphs(fresh_dynamo, monkeypatch):
    """With `state_shapes` 2 (the default) each token count keeps its caches and its recorded step
    graphs: once both counts have run a generation (and recorded), every later call replays, with
    the eager outputs bit for bit. With 1, every switch frees the caches, allocates them again and
    runs each step signature eagerly again before recording it."""
    _, _, c_eager = _alternating(False, monkeypatch, 2)
    ref, _, _ = _alternating(False, monkeypatch, 1)
    got, eager, c = _alternating(True, monkeypatch, 2)
    for gen_r, gen_g in zip(ref, got):
        for a, b in zip(gen_r, gen_g):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    sites_branches = 6 * 2  # 3 attention + 3 MLP sites, 2 guidance branches
    assert c["graphs"] == 1 and c["realloc"] == sites_branches and c_eager["realloc"] == sites_branches
    # as at one resolution: a shape's second generation meets 2 signatures its first had not
    # (tests/test_graphs.py: 10, 2, 0, ...), and from its third on every call replays
    assert eager[0] == eager[1] > eager[2] == eager[3] > 0 and eager[4:] == [0, 0], eager
    assert c["state_shape_reused"] == 4 * sites_branches and not c.get("state_shape_evicted")
    assert not any(k.startswith("fallback:") for k in c)
    _, eager1, c1 = _alternating(True, monkeypatch, 1)
    assert c1["realloc"] == 5 * sites_branches and c1["state_shape_evicted"] == 5 * sites_branches
    assert eager1 == [eager[0]] * 6, eager1  # every generation runs eagerly and records again


def test_idle_shapes_are_freed_when_memory_runs_short(fresh_dynamo, monkeypatch):
    """`Session.drop_idle_states` frees the caches of the shape the current generation has not used
    (and only those: a generation that only replays step graphs, which run no op code, marks its
    states used through the recorded commits); the next generation at the freed shape allocates
    and records again and gives the same outputs."""
    monkeypatch.setattr(graphs, "EMULATE", True)
    m = Net().eval()
    cm = chip(m, RANDOM, dynamic=True)
    first = {n: _generation(cm, n=n) for n in (96, 64, 96, 64)}
    before = ccount("graph_eager_calls")
    _generation(cm, n=96)
    assert ccount("graph_eager_calls") == before  # replays only
    (session,) = sessions_of(m)
    held, idle = chipmunk_compile.stats(m)["state_bytes"], chipmunk_compile.stats(m)["idle_state_bytes"]
    freed = session.drop_idle_states()
    assert freed == idle and chipmunk_compile.stats(m)["idle_state_bytes"] == 0
    after = chipmunk_compile.stats(m)["state_bytes"]
    assert 0 < freed < held and after == held - freed
    assert {shape[0][-2] for s in session.sites for _, shape in s.states} == {96}  # q (.., N, D) / x (B, N, C)
    live = tuple(st.name for s in session.sites for st in s.states.values())
    assert session.state._buffers and all(n.startswith(live) for n in session.state._buffers)
    before = ccount("graph_eager_calls")
    again = _generation(cm, n=64)
    assert ccount("graph_eager_calls") > before and ccount("state_idle_dropped") == 1
    for a, b in zip(first[64], again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_idle_shapes_are_freed_least_recently_used_first(fresh_dynamo):
    """Asked for some bytes (what `offload_state: "auto"` is short of), `drop_idle_states` frees
    the idle states of the size used longest ago first, and stops once it has freed enough."""
    m = Net().eval()
    cm = chip(m, {**RANDOM, "state_shapes": 3}, dynamic=True)
    for n in (64, 96, 128):
        _generation(cm, n=n)
    (session,) = sessions_of(m)

    def sizes():
        return {shape[0][-2] for s in session.sites for _, shape in s.states}

    oldest = sum(st.nbytes for s in session.sites for (_, shape), st in s.states.items() if shape[0][-2] == 64)
    assert sizes() == {64, 96, 128} and oldest > 0
    assert session.drop_idle_states(oldest) == oldest and sizes() == {96, 128}
    assert session.drop_idle_states() > 0 and sizes() == {128}


def test_a_layout_that_gives_another_shape_is_never_recorded(fresh_dynamo, monkeypatch):
    """Each site learns which shape an input layout gives it; should a layout ever give it another
    (here: the 64-token layout's entries pointed at the 96-token shape by hand), the call runs
    eagerly, the layout is marked ambiguous (counted), and its calls are never recorded or replayed
    from then on, with the outputs of a run without step graphs."""
    monkeypatch.setattr(graphs, "EMULATE", False)
    ref = chip(Net().eval(), RANDOM, dynamic=True)
    want = [_generation(ref, n=n) for n in (64, 96, 64, 96, 64)]
    torch._dynamo.reset()
    monkeypatch.setattr(graphs, "EMULATE", True)
    m = Net().eval()
    cm = chip(m, RANDOM, dynamic=True)
    got = [_generation(cm, n=n) for n in (64, 96, 64)]
    (session,) = sessions_of(m)
    for s in session.sites:
        other = {key: shape for (key, shape) in s.states if shape[0][-2] == 96}
        for where in [w for w, shape in s.layout_shapes.items() if shape[0][-2] == 64]:
            s.layout_shapes[where] = other[where[0]]
    assert ccount("graph_layout_ambiguous") == 0
    got += [_generation(cm, n=n) for n in (96, 64)]
    assert ccount("graph_layout_ambiguous") > 0
    for gen_w, gen_g in zip(want, got):
        for a, b in zip(gen_w, gen_g):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    replays, recorded = ccount("graph_replays"), ccount("graph_recorded")
    _generation(cm, n=64)
    assert (ccount("graph_replays"), ccount("graph_recorded")) == (replays, recorded)
