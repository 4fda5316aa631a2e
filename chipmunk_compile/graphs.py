"""Whole-call CUDA graphs, one per step signature: once recorded, a step runs no Python op code.

A chipmunk step launches several kernels per site from Python; on FLUX that is ~600 launches and
more host time than GPU time. Every host decision of a compiled graph is a pure function of host
state, so the runner can name, before the call, everything the call will do — its *signature*:
(branch, block instance, non-static input shapes/strides/dtypes and scalars, and per site the
epoch of the state that this input layout gives it (ops/sites.py) and the decision of `decide`).
Per signature:
- 1st call: eager (allocates caches, compiles and tunes kernels);
- 2nd call: recorded into a CUDA graph, then replayed. During the recording the ops defer their
  host-state commits (runtime.RECORDING); an op that would allocate persistent memory raises
  NeedsEagerCall, the recording is dropped and the call runs eagerly (counted);
- later calls: copy non-static inputs into the recorded input buffers, write the device step,
  replay, apply the recorded commits and counter increments, return clones of the outputs.

Invariants:
- Parameters/buffers (static inputs) are checked by address on every replay; a moved one drops
  the graph. Graphs that mutate an input, have data-dependent shapes (host syncs) or run
  collectives (context parallelism) are never recorded (counted as graph_disabled:<reason>).
- Nothing persistent lives in the graph pool: caches, the device step and the recorded input
  buffers are allocated outside any recording; outputs are cloned right after each replay, so
  graphs of one session can share one memory pool (they never run concurrently), taken anew
  once no graph recorded into it is alive (`shared_pool`).
- A recording does not hold its outputs' memory (since session 43): right after the capture its
  output tensors are swapped for aliases that do not own their blocks (`_unowned`), so the blocks
  go back to the pool and later captures reuse them. A replay writes there, and the clone right
  after it reads there, before any other recording of the pool runs. The pool keeps the memory
  while any of its graphs lives. Before, each recording kept its outputs: regional FLUX.1 (57
  blocks, 26.7 MB each) fit 157 of its ~390 block signatures in the 4 GiB budget, and the
  refreshes, seen last, ran eagerly at 142 ms against 113 recorded (H200, session 42).
- A signature's graph is dropped when any site's state epoch changes (its caches freed: `release`,
  a shape beyond `state_shapes`, memory running short): the epoch is part of the signature, and
  stale graphs are evicted: the least recently used one once
  a compiled graph holds MAX_GRAPHS recordings per module instance it serves (one graph serves
  every block under regional compilation: 57 blocks x a few step kinds must not cycle through a
  fixed number of slots, which re-recorded on every call), and any not used for that many calls
  when the memory budget below is short.
- A recording holds its static inputs, the module's weights: when the module is freed
  (ops/sites.py `GraphInstances` forgets it), its recordings are dropped (`drop_instances`), or a
  model built again in the same process would keep the freed one's weights allocated.
- Input buffers are shared by every recording of one input layout (shapes, strides, dtypes and
  scalars of the non-static inputs), allocated outside the pool at the layout's first recording:
  a replay copies the call's inputs into them, and recordings never run concurrently. Outputs
  that are graph inputs (an input returned as is) stay owned by the inputs.
- Memory budget: the shared input buffers (once per layout) and the outputs that recordings hold
  (only under emulation now), measured on a layout's first (eager) call, are summed over the
  device; a recording that would take the sum past `cuda_graphs_max_gib` is not made and its
  signature runs eagerly (`graph_disabled:memory_budget`, counted once per signature; tried
  again on a later call once some recording on any device was dropped since its refusal, so that
  memory freed by evictions goes to it, without a budget scan on every call of it).
`EMULATE = True` (tests) runs the same bookkeeping on CPU with an emulated graph whose replay
re-runs the call and checks that every op makes the recorded decision.
"""

from __future__ import annotations

import logging
import traceback
import weakref
from collections import Counter
from typing import Any, Callable, Optional

import torch
from torch._dynamo.utils import counters

from . import runtime
from .ops.sites import count, fallback
from .patterns.fx_utils import is_param_or_buffer
from .sequence_parallel import collective_groups

log = logging.getLogger("chipmunk_compile")
EMULATE = False  # tests: emulate CUDA graphs on CPU (see module docstring)
MAX_GRAPHS = 32  # per compiled graph and module instance it serves; the least recently used is evicted beyond
_RUNNERS: "weakref.WeakSet" = weakref.WeakSet()  # every live GraphRunner (the memory budget is per device)
_DROPS = 0  # recordings dropped so far, by every runner: a refused signature retries after one


def _nbytes(values) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(values))


def release_recordings(session) -> None:
    """Drop every recording (and shared input buffer) of the runners that serve `session`
    (`chipmunk_compile.release`): their graphs go, and with the last one the session's pool."""
    for runner in [r for r in list(_RUNNERS) if r.session is session]:
        runner.release()


def held_bytes(device) -> int:
    """Bytes that the recordings on `device` hold: the shared input buffers and their outputs."""
    return sum(r.held_bytes() for r in list(_RUNNERS) if r.device == device)


def static_input_indices(gm: torch.fx.GraphModule) -> list[int]:
    """Placeholders that are module parameters or buffers (stable addresses across calls)."""
    return [i for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder") if is_param_or_buffer(node)]


def data_dependent_shapes(gm: torch.fx.GraphModule) -> bool:
    """True when a value's shape or a scalar depends on tensor data (nonzero, masked_select,
    .item(), ... traced with unbacked symbols): running it syncs with the host, which a CUDA graph
    capture cannot do (a failed capture can also leave the CUDA RNG in capture mode)."""
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    for n in gm.graph.nodes:
        v = n.meta.get("example_value", n.meta.get("val"))
        try:
            if v is not None and free_unbacked_symbols(v):
                return True
        except Exception:  # noqa: BLE001 — exotic meta values: not a data-dependent shape
            continue
    return False


def graph_blockers(gm: torch.fx.GraphModule) -> list[str]:
    """Why this graph must not be recorded (empty: it may be). Collectives (context parallelism):
    capturing them needs every rank to record and replay the same calls, and each rank decides
    alone when to record (its memory budget, evictions, recordings dropped for an eager call)."""
    tests = (("mutates_inputs", mutates_inputs), ("data_dependent_shapes", data_dependent_shapes),
             ("collectives", lambda g: bool(collective_groups(g))))
    return [name for name, test in tests if test(gm)]


def mutates_inputs(gm: torch.fx.GraphModule) -> bool:
    """True when some node writes into a placeholder (in-place op or copy_ on it)."""
    placeholders = {n for n in gm.graph.nodes if n.op == "placeholder"}
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or not n.args:
            continue
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        if name.endswith("_") and not name.endswith("__") and n.args[0] in placeholders:
            return True
        schema = getattr(n.target, "_schema", None)
        if schema is not None and schema.is_mutable and any(a in placeholders for a in n.args):
            return True
    return False


def shared_pool(session) -> Any:
    """The session's CUDA-graph memory pool, or a new one when no live graph uses the old one.

    PyTorch releases a private pool when the last graph recorded into it is destroyed (here: after
    torch._dynamo.reset() freed a compiled model's graphs and the model was compiled again).
    Capturing into the released id then fails inside the caching allocator ("INTERNAL ASSERT
    use_count > 0" or "already recording to mempool_id" on the H200), so the step graphs of the
    new compile would all run eagerly."""
    if session.graph_pool is None or not len(session.graph_pool_users):
        session.graph_pool = torch.cuda.graph_pool_handle()
    return session.graph_pool


class _Recorded:
    """One signature's graph: its arguments (the layout's shared input buffers + its own static
    inputs), its outputs, deferred commits, counter increments."""

    def __init__(self, graph, args: list, outputs, owned: list, commits: list, counted: Counter, static_idx: list,
                 static_ptrs: list, layout):
        self.graph, self.args, self.outputs, self.layout = graph, args, outputs, layout
        self.nbytes = _nbytes(owned)
        self.commits, self.counted = commits, counted
        self.static_idx, self.static_ptrs = static_idx, static_ptrs  # parameters' addresses at the recording
        self.last_used = 0  # the runner's call count at its last recording or replay

    def static_inputs_in_place(self, args) -> bool:
        """Whether the call's static inputs (the parameters) are at the addresses the graph recorded."""
        return [args[i].data_ptr() for i in self.static_idx] == self.static_ptrs


class _CudaGraph:
    def __init__(self, pool):
        self.graph, self.pool = torch.cuda.CUDAGraph(), pool

    def record(self, fn: Callable, args: list):
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph, pool=self.pool):
            out = fn(*args)
        return out, False  # recorded, not executed

    def replay(self) -> None:
        self.graph.replay()


class _EmulatedGraph:
    """CPU stand-in: recording executes the call; a replay re-executes it with commits deferred
    and asserts that every op decided exactly what the recording decided."""

    def __init__(self, pool):
        self.fn = self.args = self.outputs = self.commits = None

    def record(self, fn: Callable, args: list):
        self.fn, self.args = fn, args
        return fn(*args), True

    def replay(self) -> None:
        saved, runtime.RECORDING = runtime.RECORDING, []
        before = Counter(counters["chipmunk"])
        try:
            new = self.fn(*self.args)
            got = [(id(s), id(st), d) for s, st, d, _ in runtime.RECORDING]
        finally:
            runtime.RECORDING = saved
            _restore(before)
        want = [(id(s), id(st), d) for s, st, d in self.commits]
        if got != want:
            raise AssertionError(f"chipmunk graph replay: ops decided {got}, the recording decided {want}")
        for dst, src in zip(_tensors(self.outputs), _tensors(new)):
            dst.copy_(src)


def _tensors(out) -> list:
    seq = out if isinstance(out, (list, tuple)) else [out]
    return [t for t in seq if isinstance(t, torch.Tensor)]


def _unowned(out, args: list):
    """`out` with each tensor that no graph input shares storage with swapped for an alias that
    does not keep its memory allocated, and the list of the tensors it keeps owned."""
    inputs = {a.untyped_storage().data_ptr() for a in _tensors(args)}
    owned = []

    def alias(t):
        if not isinstance(t, torch.Tensor):
            return t
        storage = t.untyped_storage()
        if storage.data_ptr() in inputs:
            owned.append(t)
            return t
        view = torch._C._construct_storage_from_data_pointer(storage.data_ptr(), t.device, storage.nbytes())
        return torch.empty((), dtype=t.dtype, device=t.device).set_(view, t.storage_offset(), t.shape, t.stride())

    if isinstance(out, (list, tuple)):
        return type(out)(alias(o) for o in out), owned
    return alias(out), owned


def _clone(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (list, tuple)):
        return type(out)(o.clone() if isinstance(o, torch.Tensor) else o for o in out)
    return out


def _restore(before: Counter) -> None:
    c = counters["chipmunk"]
    c.clear()
    c.update(before)


class GraphRunner:
    """Calls a compiled graph, through recorded CUDA graphs where possible (module docstring)."""

    def __init__(self, compiled: Callable, static: list[int], blockers: list[str], sites: list, session, instances,
                 max_bytes: float = float("inf")):
        """`static`/`blockers`: `static_input_indices(gm)` and `graph_blockers(gm)`, read before
        the inner compiler takes ownership of the graph; any blocker keeps every call eager.
        `max_bytes`: the device's budget for the input buffers and outputs of live recordings."""
        self.compiled, self.sites, self.session, self.instances = compiled, sites, session, instances
        self.max_bytes = max_bytes
        self.inputs: dict = {}  # input layout -> {input index: the buffer its recordings share}
        self.layouts: dict = {}  # input layout -> (bytes of its inputs, of its outputs), from its first call
        self.calls = 0
        _RUNNERS.add(self)
        self.static = static
        self.static_set = set(static)
        self.dynamic: Optional[list[int]] = None  # the other inputs' indices, known at the first call
        self.enabled = bool(sites) and not blockers
        for reason in blockers if sites else ():
            count(f"graph_disabled:{reason}")
            log.info("chipmunk: no CUDA graphs for this compiled graph (%s)", reason)
        self.device: Any = None
        self.graphs: dict = {}
        self.seen: set = set()
        self.failed: set = set()
        self.refused: dict = {}  # signature the budget kept eager -> _DROPS at its refusal

    def __call__(self, *args):
        self.session.call_layout = None
        key = self._signature(args) if self.enabled else None
        if key is None:
            return self.compiled(*args)
        self.calls += 1
        rec = self.graphs.get(key)
        if rec is not None:
            if rec.static_inputs_in_place(args):
                rec.last_used = self.calls
                return self._replay(rec, args)
            self._drop(key)
            count("graph_static_input_moved")
        if key in self.seen and key not in self.failed:
            if not self._within_budget(key):
                return self.compiled(*args)
            return self._record(key, args)
        self.seen.add(key)
        count("graph_eager_calls")
        out = self.compiled(*args)
        if key[2] not in self.layouts:
            self.layouts[key[2]] = (self._input_bytes(args), _nbytes(out))
        return out

    def _capacity(self) -> int:
        return MAX_GRAPHS * max(1, len(self.instances.keys))

    def _input_bytes(self, args) -> int:
        return _nbytes([a for i, a in enumerate(args) if i not in self.static_set])

    def _within_budget(self, key) -> bool:
        """False (and the signature stays eager, counted once) when recording it (its outputs, and
        its layout's input buffers if that layout has none yet) would take the device past the
        budget."""
        if self.refused.get(key, -1) == _DROPS:  # nothing freed since its refusal
            return False
        inputs, outputs = self.layouts[key[2]]
        need = outputs + (0 if key[2] in self.inputs else inputs)
        held = held_bytes(self.device)
        if held + need > self.max_bytes:  # make room from this runner's unused recordings first
            for k in [k for k, r in self.graphs.items() if self.calls - r.last_used > self._capacity()]:
                self._drop(k)
                count("graph_evicted")
            held = held_bytes(self.device)
        if held + need <= self.max_bytes:
            return True
        first = key not in self.refused
        self.refused[key] = _DROPS
        if not first:
            return False
        count("graph_disabled:memory_budget")
        log.info("chipmunk: step not recorded: its buffers (%.2f GiB) would take the recordings past "
                 "cuda_graphs_max_gib (%.2f GiB held)", need / 2**30, held / 2**30)
        return False

    def _drop(self, key) -> None:
        """Forget a recording, and its layout's shared buffers once no recording uses them."""
        global _DROPS
        _DROPS += 1
        self._release(self.graphs.pop(key).layout)

    def release(self) -> None:
        """Forget every recording, shared input buffer and signature seen, as before the first call
        (the graphs that failed to record stay eager)."""
        for key in list(self.graphs):
            self._drop(key)
        self.inputs.clear()
        self.refused.clear()
        self.seen.clear()

    def drop_instances(self, ordinals: set) -> None:
        """Forget the recordings and signatures of the module instances `ordinals` (freed: their
        recordings hold those modules' weights, which would otherwise stay allocated)."""
        for key in [k for k in self.graphs if k[1] in ordinals]:
            self._drop(key)
        self.seen.difference_update([k for k in self.seen if k[1] in ordinals])  # (failed ones stay eager)
        for key in [k for k in self.refused if k[1] in ordinals]:
            del self.refused[key]

    def _release(self, layout) -> None:
        if all(r.layout != layout for r in self.graphs.values()):
            self.inputs.pop(layout, None)

    def held_bytes(self) -> int:
        return sum(_nbytes(list(b.values())) for b in list(self.inputs.values())) + sum(
            r.nbytes for r in list(self.graphs.values()))

    def _signature(self, args) -> Optional[tuple]:
        if self.device is None:
            self.device = _device_of(args)
            if self.device is None:
                self.enabled = False
                return None
        if self.dynamic is None:  # FLUX: 7 inputs of 1,167 (the rest are parameters): not scanned per call
            self.dynamic = [i for i in range(len(args)) if i not in self.static_set]
        meta = []
        for i in self.dynamic:
            a = args[i]
            meta.append((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a)
        layout = self.session.call_layout = tuple(meta)  # sites learn which shapes a layout gives them
        pos = self.session.position()
        sites = []
        for s in self.sites:
            sig = s.signature(pos, layout)
            if sig is None:
                return None
            sites.append(sig)
        return pos.branch, self.instances.current, layout, tuple(sites)

    def _record(self, key, args):
        pos = self.session.position()
        layout = key[2]
        shared = self.inputs.get(layout)
        if shared is None:
            with runtime.plain_tensors():  # replays copy each call's inputs into them, in any inference mode
                shared = self.inputs[layout] = {i: args[i].clone() for i in self.dynamic
                                                if isinstance(args[i], torch.Tensor)}
        else:
            _fill(shared, args)
        static_args = [shared.get(i, a) for i, a in enumerate(args)]
        self.session.device_step(self.device, pos.step)
        graph = _EmulatedGraph(None) if EMULATE else _CudaGraph(shared_pool(self.session))
        self.session.graph_pool_users.add(graph)
        before = Counter(counters["chipmunk"])
        runtime.RECORDING = commits = []
        try:
            outputs, executed = graph.record(self.compiled, static_args)
        except runtime.NeedsEagerCall as e:
            runtime.RECORDING = None
            _restore(before)
            self._release(layout)
            log.info("chipmunk: step recording deferred (%s)", e)
            count("graph_record_deferred")
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 — any capture failure: this signature stays eager
            runtime.RECORDING = None
            _restore(before)
            self._release(layout)
            self.failed.add(key)
            where = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-4:])
            count(f"graph_record_failed:{type(e).__name__}")
            fallback("cuda_graph_record_failed", f"{type(e).__name__}: {e}\n{where}")
            return self.compiled(*args)
        finally:
            runtime.RECORDING = None
        counted = Counter(counters["chipmunk"])
        counted.subtract(before)
        static_idx = [i for i in self.static if isinstance(args[i], torch.Tensor)]
        outputs, owned = (outputs, _tensors(outputs)) if executed else _unowned(outputs, static_args)
        rec = _Recorded(graph, static_args, outputs, owned, [(s, st, d) for s, st, d, _ in commits], +counted,
                        static_idx, [args[i].data_ptr() for i in static_idx], layout)
        if EMULATE:
            graph.outputs, graph.commits = rec.outputs, rec.commits
        if not executed:
            graph.replay()
        self._commit(rec, pos, count_calls=False)
        rec.last_used = self.calls
        self.graphs[key] = rec
        if len(self.graphs) > self._capacity():
            self._drop(min((k for k in self.graphs if k != key), key=lambda k: self.graphs[k].last_used))
            count("graph_evicted")
        count("graph_recorded")
        return _clone(rec.outputs)

    def _replay(self, rec: _Recorded, args):
        pos = self.session.position()
        _fill(self.inputs[rec.layout], args)
        self.session.device_step(self.device, pos.step)
        rec.graph.replay()
        self._commit(rec, pos, count_calls=True)
        count("graph_replays")
        return _clone(rec.outputs)

    @staticmethod
    def _commit(rec: _Recorded, pos, count_calls: bool) -> None:
        for site, st, decision in rec.commits:
            site.commit(st, decision, pos)
            if st is not None:
                site.replayed(st, rec.layout)
        if count_calls:
            counters["chipmunk"].update(rec.counted)


def _fill(buffers: dict, args) -> None:
    """Copy the call's inputs into a layout's shared input buffers ({input index: buffer})."""
    for i, buf in buffers.items():
        if buf is not args[i]:
            buf.copy_(args[i])


def _device_of(args) -> Optional[torch.device]:
    for a in args:
        if isinstance(a, torch.Tensor) and (a.is_cuda or EMULATE):
            return a.device
    return None
