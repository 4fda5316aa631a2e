"""Sites: one matched attention or MLP of a compiled graph, with its per-branch cache state.

Invariants:
- A site is created by the rewrite and registered in `runtime.SITES` under an integer id that the
  graph passes to the op as a constant; the op looks it up on every call.
- Cache tensors live in the session's `ChipmunkState` module (named `<site>__<branch>__<name>`),
  are allocated once per (branch, shape) on the first call that needs them and are then updated in
  place. Each shape (resolution, batch) of a branch has a `BranchState` of its own: a graph that
  serves several token counts (Dynamo's dynamic shapes) keeps up to `state_shapes` of them per
  branch, so alternating resolutions keep their caches' memory and their recorded step graphs
  (their epochs); the least recently used one beyond that is freed, and so is any kept in host
  memory (offloaded branches record no step graphs; `realloc` counts a new shape of a branch that
  had another). A shape not used in the current generation holds nothing a
  later call needs but memory: it is freed first when memory runs short (`Session.drop_idle_states`).
  When a branch changes shape, its other states' caches filled in this generation count as not
  filled (`Site._use`): a shape that returns within a generation refills them first. So do caches
  of one shape met in another token order (a site grouping per call: 8×12 then 12×8 latents,
  `Site._track_order`); a step graph's signature runs such a call eagerly.
- A new state is first sought in the twin sites of other graphs of the same code (a recompile that
  now serves the module): moved within the session, freed in another (twin_states.py). No two
  graphs hold one module's caches for one site, branch and shape.
- A cache is read only if it was filled in the current generation (`filled`); otherwise the op
  runs the exact path and counts the fallback.
- Every host decision of an op is `decide(site, state, position)` (a pure function of host state)
  and every host-state update it makes is `commit(site, state, decision, generation)`; an op ends
  with `Site.finish`, which commits at once or, while a CUDA graph is being recorded, records the
  commit for the graph runner (graphs.py) to apply after each replay.
- `BranchState.epoch` changes whenever its caches are dropped (`BranchState.drop`) or a weight
  copy its site reads is freed (`Site.column_major`), so a recorded graph is never replayed
  against buffers it did not capture. Allocating a cache that did not
  exist yet keeps the epoch: no recorded graph can use it (its recording would have deferred).
- A step graph's signature names each site's state before the call: the graph runner sets the
  call's input layout (`Session.call_layout`), and each site learns which shape a layout gives
  it on its eager calls (`Site.layout_shapes`); a layout seen with two shapes is never recorded.
- With `offload_state`, a cache's home is host memory (ops/offload.py): its device tensor exists
  only inside the op's `Site.staged` call, which every read or write of a cache happens in.
- Random draws are a hash of (a device step tensor, layer, site kind, position): reproducible,
  identical across branches, and valid inside CUDA graphs (no host seed is baked in).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch._dynamo.utils import counters

from .. import runtime
from ..kernels.random_draws_ref import HashDraws
from ..runtime import SITES, Session, new_site_id
from ..schedule import DENSE, never_sparse
from . import twin_states
from ._dispatch import kernel

log = logging.getLogger("chipmunk_compile")


def count(name: str, n: int = 1) -> None:
    counters["chipmunk"][name] += n


_warned: set = set()


def fallback(reason: str, detail: str = "") -> None:
    """Count (and log once per reason) a fallback to the exact path."""
    count(f"fallback:{reason}")
    if reason not in _warned:
        _warned.add(reason)
        log.warning("chipmunk: falling back to the exact path (%s)%s", reason, f": {detail}" if detail else "")


_epochs = itertools.count(1)

# kind -> (decide, commit), registered by the op modules (ops/attention.py, ops/mlp.py)
POLICIES: dict[str, tuple] = {}
ALWAYS_DENSE = "always_dense"  # decision of a site that never runs sparse (no state at all)
AMBIGUOUS = object()  # Site.layout_shapes: an input layout that gave a site two shapes


class BranchState:
    """Caches of one site for one guidance branch."""

    def __init__(self, site: "Site", branch: str, key: tuple, name: str, instance: int = 0):
        self.site, self.branch, self.key = site, branch, key  # key: the shapes, dtype and device it holds
        self.instance = instance  # the ordinal of the module it serves (GraphInstances)
        self.name = name  # its caches' prefix in the session's state module
        self.epoch = next(_epochs)
        self.used_generation = -1  # last generation that called it
        self.filled_generation = -1  # generation whose dense/refresh step filled the caches
        self.filled_step = -1  # the step of that generation it last filled them at (catch_up)
        self.called_step = -1  # the step of its last call (attention's catch_up)
        self.index_generation = -1
        self.slope_generation = -1  # generation whose second refresh measured the residual's slope
        # (perm, always_keep) of the call that last used it: the token order its caches are in,
        # tracked only for a site whose order is per call (`Site._track_order`), else None
        self.order: Optional[tuple] = None
        self.order_of: dict = {}  # (input layout, grid) -> the order its eager call had (step graphs)
        self.cache: dict[str, torch.Tensor] = {}  # name -> tensor, valid for `key`
        self.home: dict[str, tuple] = {}  # offload_state: name -> (slot key, host home), valid for `key`
        self.offloaded: Optional[bool] = None  # caches in host memory (decided before the first one)
        self.nbytes = 0  # bytes of its caches

    def tensor(self, name: str, shape, dtype, device, *, alloc=None) -> torch.Tensor:
        """The cache `name`, allocated on first use for the current key (see `ensure`)."""
        t = self.cache.get(name)
        if t is not None:
            return t
        if runtime.RECORDING is not None:  # persistent memory must not come from a graph's pool
            raise runtime.NeedsEagerCall(f"cache {name!r} of {self.site.path} is not allocated yet")
        full = f"{self.name}{name}".replace(".", "_")
        offload = self.site.session.offload(device)
        if self.offloaded:  # a slot tensor, valid for this call; the host home is the state
            t = offload.allocate(self, name, shape, dtype, alloc)
            owned = self.home[name][1].bytes
        else:
            t = owned = alloc(*shape, dtype=dtype, device=device) if alloc else torch.empty(shape, dtype=dtype, device=device)
        self.site.session.state.put(full, owned)  # owned (and counted) by the session's state module
        self.nbytes += owned.untyped_storage().nbytes()  # a padded layout's pad included
        if offload is not None:
            offload.measured(self)
        self.cache[name] = t
        return t

    def get(self, name: str) -> Optional[torch.Tensor]:
        return self.cache.get(name)

    def drop(self) -> None:
        """Free its caches (and offloaded homes); a recorded graph that used them never replays again."""
        self.site.session.state.clear((self.name.replace(".", "_"),))  # as `tensor` names them
        self.epoch = next(_epochs)
        self.cache.clear()
        self.home.clear()
        self.nbytes = 0
        self.unfill(steps=True)
        self.order, self.order_of = None, {}

    def unfill(self, steps: bool = False) -> None:
        """Count its caches, indices and forecast slope as filled by no generation (the next call
        refills them, or runs the exact path); `steps`: also forget the steps it filled and was called at."""
        self.filled_generation = self.index_generation = self.slope_generation = -1
        if steps:
            self.filled_step = self.called_step = -1


@dataclass(eq=False)
class Site:
    kind: str  # "attention" | "mlp"
    pattern: str
    path: str
    layer: int
    cfg: Any  # AttnConfig or MlpConfig
    session: Session
    shapes: dict = field(default_factory=dict)
    perm: Optional[torch.Tensor] = None  # spatial query/token order (grouping)
    always_keep: Optional[torch.Tensor] = None  # (Nk,) bool: keys every group attends (text)
    grouping: str = ""  # where the grouping came from, for reports
    call_grouping: Any = None  # grouping.CallGrouping when the token count is symbolic (perm per call)
    # (ids_regrouping.IdsRegrouping, group, text first, keep text) when the grid came from the
    # graph's position-id input: another grid of the same count is taken per generation
    regroup: Optional[tuple] = None
    # joint keys (queries over cat(other streams, own tokens)): the concatenation's parts in key
    # order (patterns.attention._joint_key_layout); `key_runs` places them for a call's lengths
    key_layout: Optional[tuple] = None
    id: int = -1
    # (branch key, shape key) -> BranchState (`branch_state`; `used_generation` orders them)
    states: dict = field(default_factory=dict)
    # (branch key, input layout, grid) -> the shape key its calls gave (AMBIGUOUS: more than one)
    layout_shapes: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)  # step kind -> calls, for reports
    # sparse passes beyond each step kind's own (a forecast's: old-index residual at an attention
    # refresh, the sparse path at an MLP dense step), for FLOP accounting
    extra_sparse_passes: int = 0
    graph: Any = None  # GraphInstances of the compiled graph this site belongs to
    # (frame, place in the plan, kind, pattern, path): the same site in another graph of the same
    # code, whose state of a module this one takes over (twin_states.py); None: no frame known
    twin: Optional[tuple] = None
    # attention quality guard, per layer (one site serves many layers under regional compilation):
    attn_mass: dict = field(default_factory=dict)  # layer -> 0-dim device tensor (ops/attention.py)
    attn_diffuse: dict = field(default_factory=dict)  # layer -> bool verdict, once read
    out_of_memory: bool = False  # its caches did not fit (cached_or_dense): dense from then on
    offload_after_oom: bool = False  # its device caches did not fit: its branches start offloaded

    def __post_init__(self):
        self.id = new_site_id()
        SITES[self.id] = self
        self.session.sites.append(self)

    def _state_key(self, pos) -> str:
        return twin_states.state_key(self.graph.current if self.graph is not None else 0, pos.branch)

    def branch_state(self, shape: tuple, pos, tokens: Optional[int] = None) -> BranchState:
        """The state of the branch at `pos` (this call's step position) for `shape` (the shapes,
        dtype and device its caches are made for), created on first use, or taken from a twin site
        of another graph of the same code that ran this module before (twin_states.py; `tokens`:
        the call's token count, whose order both must share); beyond `state_shapes` shapes of the
        branch the least recently used one is freed."""
        key = self._state_key(pos)
        st = self.states.get((key, shape))
        if st is None:
            if runtime.RECORDING is not None:
                raise runtime.NeedsEagerCall(f"{self.path}: first call of branch {key} at these shapes")
            others = sorted((k for k in self.states if k[0] == key), key=lambda k: self.states[k].used_generation)
            if others:
                count("realloc")
                log.info("chipmunk: site %s branch %s: new shapes %s", self.path, key, shape)
            # beyond `state_shapes`, and any in host memory: an offloaded branch records no step
            # graph to keep, and two video sizes' homes would double the host memory it takes
            evict = others[:max(0, len(others) + 1 - self.session.config.state_shapes)]
            for old in evict + [k for k in others if k not in evict and self.states[k].offloaded]:
                self.states.pop(old).drop()
                count("state_shape_evicted")
            st = twin_states.take(self, shape, pos.branch, tokens) if self.twin is not None else None
            if st is None:
                inst = self.graph.current if self.graph is not None else 0
                st = BranchState(self, key, shape, self.state_name(key), inst)
            self.states[(key, shape)] = st
        layout = self.session.call_layout
        grid = self._grid_key()
        if tokens is not None and (self.call_grouping is not None or grid):
            self._track_order(st, pos, tokens, (layout, grid))
        if runtime.RECORDING is None:  # else at the recorded commit, which every replay applies
            self._use(st, pos.generation)
        if layout is not None:
            where = (key, layout, grid)
            known = self.layout_shapes.setdefault(where, shape)
            if known is not AMBIGUOUS and known != shape:
                if runtime.RECORDING is not None:  # the signature named another state: not recorded
                    raise runtime.NeedsEagerCall(f"{self.path}: this input layout gave another shape before")
                self.layout_shapes[where] = AMBIGUOUS
                count("graph_layout_ambiguous")
        return st

    def _track_order(self, st: BranchState, pos, tokens: int, here: tuple) -> None:
        """A site whose token order is per call (a grid per call's sizes or per generation's
        position ids) can meet the same shape in another order: 8×12 then 12×8 latents, one token
        count. Caches filled in this generation in the other order are then counted not filled,
        so the call runs the exact path and refills them (`state_order_changed`); before, it read
        them as if each token were where another had been. `here`: (input layout, grid), under
        which step graphs find the order again (`signature`, `replayed`)."""
        cur = self._for_count(tokens)
        if st.order is not None and st.filled_generation == pos.generation and not twin_states.orders_equal(st.order, cur):
            if runtime.RECORDING is not None:  # (the signature saw the change: not reached in practice)
                raise runtime.NeedsEagerCall(f"{self.path}: token order changed")
            st.unfill()
            count("state_order_changed")
            log.info("chipmunk: %s: the same shape in another token order (another grid of the count): "
                     "its caches refill", self.path)
        st.order = cur
        if here[0] is not None:
            if len(st.order_of) >= 64 and here not in st.order_of:
                del st.order_of[next(iter(st.order_of))]
            st.order_of[here] = cur

    def replayed(self, st: BranchState, layout) -> None:
        """A recorded call of `layout` ran (graphs.py): `st` now holds that layout's token order."""
        if st.order is not None:
            st.order = st.order_of.get((layout, self._grid_key()), st.order)

    def _grid_key(self):
        """The grid this graph's position ids gave the current generation (`regroup`), else 0: with
        the input layout, what names a token order under step graphs."""
        return self.regroup[0].key if self.regroup is not None else 0

    def pop_state(self, key: str, shape: tuple) -> BranchState:
        """Take the state (key, shape) out of this site, with what the site kept about it (a twin
        site of another graph takes it over, or frees it: twin_states.py)."""
        st = self.states.pop((key, shape))
        last = self.__dict__.get("_last_used", {})
        if last.get(key) is st:
            del last[key]
        for where in [w for w, s in self.layout_shapes.items() if w[0] == key and s == shape]:
            del self.layout_shapes[where]
        return st

    def state_name(self, key: str) -> str:
        """A new state's buffer-name prefix in the session's state module, for branch key `key`."""
        serials = self.__dict__.setdefault("_serials", {})  # branch key -> states named for it
        serial = serials[key] = serials.get(key, -1) + 1
        return f"s{self.id}__{key}{f'_v{serial}' if serial else ''}__"  # the first keeps the plain name

    def drop_states(self) -> None:
        """Free every state of this site (`release`, out of memory). Each is emptied, not only
        forgotten: a recording's commits and `_last_used` may still refer to the object."""
        for st in self.states.values():
            st.drop()
        self.states.clear()
        self.layout_shapes.clear()
        self.__dict__.pop("_last_used", None)

    def drop_instances(self, ordinals: set) -> None:
        """Free the states of the module instances `ordinals` (GraphInstances forgot them: freed)."""
        gone = [k for k, st in self.states.items() if st.instance in ordinals]
        for k in gone:
            st = self.states.pop(k)
            st.drop()
            self.__dict__.get("_last_used", {}).pop(st.branch, None)
        keys = {k[0] for k in gone}
        for where in [w for w in self.layout_shapes if w[0] in keys]:
            del self.layout_shapes[where]

    def state_of(self, branch: str) -> Optional[BranchState]:
        """The most recently used state of branch key `branch` (any shape), or None."""
        return max((st for (key, _), st in self.states.items() if key == branch),
                   key=lambda st: st.used_generation, default=None)

    def _use(self, st: BranchState, generation: int) -> None:
        """Mark `st` used by `generation`: by the op's eager call, or by the commit of a recorded
        step (a replay runs no op code). Counts `state_shape_reused` when another shape of the
        branch was used after it (a kept shape back, its caches and step graphs with it)."""
        last = self.__dict__.setdefault("_last_used", {})  # branch key -> its state used last
        if last.get(st.branch) is not st:  # the branch changes shape: the others' caches are another
            last[st.branch] = st  # shape's; one filled in this generation must not serve it again
            for (k, _), o in self.states.items():  # (a batch 2 -> 1 -> 2 in one generation): unfilled
                if k == st.branch and o is not st and o.filled_generation == generation:
                    o.unfill()
        if st.used_generation == generation:
            return
        if st.used_generation >= 0 and any(o.used_generation > st.used_generation for (k, _), o in self.states.items()
                                           if k == st.branch and o is not st):
            count("state_shape_reused")
        st.used_generation = generation

    def always_dense(self) -> bool:
        return self.out_of_memory or not self.cfg.enabled or self.current_layer() < self.cfg.first_n_dense_layers

    def plain_dense(self, pos) -> bool:
        """This call runs the exact op with no state: the site never runs sparse, or the
        generation's step count leaves it no sparse step (`schedule.never_sparse`), so a cache
        built now would never be read."""
        return self.always_dense() or never_sparse(self.kind, self.cfg, pos.scale)

    def cached_or_dense(self, cached, dense, t: torch.Tensor):
        """`cached()` (the call with this site's state); when its caches do not fit the device
        (outside a CUDA-graph recording or capture), free every cache of this site, count and log
        it once, and return `dense()` (the exact call). From then on the site keeps its caches in
        host memory when `offload_state` allows it and they were on the device, else it runs dense.
        The state it makes is plain tensors, also under torch.inference_mode (`runtime.plain_tensors`)."""
        try:
            with runtime.plain_tensors():
                return cached()
        except torch.OutOfMemoryError as e:
            if runtime.RECORDING is not None or capturing(t):
                raise
            if self.session.drop_idle_states():  # other shapes' caches first: then try again
                return self.cached_or_dense(cached, dense, t)
            retry = (self.session.offload(t.device) is not None and not self.offload_after_oom
                     and not any(st.offloaded for st in self.states.values()))
            self.drop_states()
            first = str(e).splitlines()[0][:200]
            if retry:
                self.offload_after_oom = True
                fallback("state_out_of_memory_offloaded", f"{self.path}: {first}; its caches move to host memory")
            else:
                self.out_of_memory = True
                fallback("state_out_of_memory", f"{self.path}: {first}; it runs dense from now on "
                         "(offload_state: true keeps every site's caches in host memory)")
            self.finish(None, DENSE, self.session.position())
            return dense()

    def staged(self, st: BranchState, device, writes: bool):
        """Context of a call that reads or writes `st`'s caches: with `offload_state` their device
        copy is staged from host memory for it (and copied back after it when `writes`)."""
        offload = self.session.offload(device) if st.offloaded is not False else None  # placed on the device
        if offload is None:
            return contextlib.nullcontext()
        if st.offloaded is None:
            st.offloaded = self.offload_after_oom or offload.decide(st)
        return offload.staged(st, writes) if st.offloaded else contextlib.nullcontext()

    def signature(self, pos, layout) -> Optional[tuple]:
        """What this site will do on a call at `pos` with the graph's input `layout` (its state's
        epoch and its decision), or None when it cannot be known without running the op (no state
        yet for the shape this layout gives this branch)."""
        if self.plain_dense(pos):
            return (ALWAYS_DENSE,)
        key = self._state_key(pos)
        grid = self._grid_key()
        shape = self.layout_shapes.get((key, layout, grid))
        st = self.states.get((key, shape)) if shape is not None and shape is not AMBIGUOUS else None
        if st is None or st.offloaded:  # offloaded: host-ordered copies, never recorded
            return None
        if st.order is not None and st.filled_generation == pos.generation:
            order = st.order_of.get((layout, grid))
            if order is None or not twin_states.orders_equal(order, st.order):
                return None  # another token order: its eager call counts the caches not filled
        return (st.epoch, POLICIES[self.kind][0](self, st, pos), grid)

    def finish(self, st: Optional[BranchState], decision, pos) -> None:
        """End of an op call: count it, and commit its host-state update (or hand the commit to
        the graph runner while a CUDA graph is being recorded)."""
        kind = decision if st is None else decision[0]
        count(f"{self.kind}_{kind}")
        if runtime.RECORDING is not None:
            runtime.RECORDING.append((self, st, decision, pos))
        else:
            self.commit(st, decision, pos)

    def commit(self, st: Optional[BranchState], decision, pos) -> None:
        """Count the call and update its branch's host state, at step position `pos`."""
        kind = decision if st is None else decision[0]
        self.steps[kind] = self.steps.get(kind, 0) + 1
        if st is not None:
            self._use(st, pos.generation)
            POLICIES[self.kind][1](self, st, decision, pos.step, pos.generation)

    def current_layer(self) -> int:
        """The layer index, counting earlier block instances when one graph serves many blocks."""
        if self.graph is None or self.graph.position == 0:
            return self.layer
        per = self.graph.attention_sites if self.graph.attention_sites else 1
        return self.graph.position * per + self.layer

    def random_draws(self, device, step: int) -> HashDraws:
        """This call's draws: a hash of (step, layer, site kind, position). The step is read from
        the session's device step tensor, so a recorded CUDA graph draws new numbers on every
        replay; generations repeat exactly and branches agree."""
        salt = 2 * self.current_layer() + (1 if self.kind == "mlp" else 0)
        return HashDraws(self.session.device_step(device, step), salt)

    def column_major(self, w: torch.Tensor, refresh: bool = False) -> torch.Tensor:
        """`w` with stride(0) == 1 (the layout the sparse mm2 gathers rows of `wᵀ` from): `w`
        itself when it already is, else a copy per weight (keyed by address, shape and strides, so
        a regional-compile site keeps one per block) that `refresh` (a branch's first dense MLP
        step of each generation) copies again. Recorded step graphs do that copy too, so a weight
        written in place between generations reaches the sparse steps that follow, however it was
        written (`.data`, inference tensors: no version counter shows either). Written within a
        generation, it reaches them from the next generation on. (Session 40 copied at every dense
        MLP step: +11 ms per such step at FLUX.1's size on the H200, 5 per generation.) A new address (the weights moved) evicts the
        oldest copy beyond one per block, and every step graph of this site with it (new epochs):
        none may read a freed copy."""
        if w.stride(0) == 1:
            return w
        copies = self.__dict__.setdefault("_col_major", {})
        key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()), w.device)
        hit = copies.get(key)
        if hit is None:
            if runtime.RECORDING is not None:
                raise runtime.NeedsEagerCall("column-major weight copy not made yet")
            if len(copies) >= max(1, len(self.graph.keys) if self.graph is not None else 1):
                del copies[next(iter(copies))]
                for st in self.states.values():
                    st.epoch = next(_epochs)
                count("w2_column_major_evicted")
            count("w2_column_major_copy")
            hit = copies[key] = torch.empty_strided(w.shape, (1, w.shape[0]), dtype=w.dtype, device=w.device)
            refresh = True
        if refresh:  # torch's strided copy ran at 0.53 TB/s (282 µs per FLUX w2 on an H100): a tiled kernel
            kernel("transpose_copy", hit, w)(hit, w)
        return hit

    def weight_copy_bytes(self) -> int:
        """Bytes of the column-major weight copies this site keeps (`column_major`)."""
        return sum(t.untyped_storage().nbytes() for t in self.__dict__.get("_col_major", {}).values())

    def drop_weight_copies(self) -> None:
        """Free the column-major weight copies (`release`); the next sparse-MLP call makes them again.
        Step graphs that read them are released with them (`graphs.release_recordings`)."""
        self.__dict__.pop("_col_major", None)

    def _for_count(self, n: Optional[int]) -> tuple:
        """(perm, always_keep) of a call with n tokens: the compile-time ones, or for a symbolic
        count those `call_grouping` builds for n (host tensors, made on the call's first run)."""
        if self.regroup is not None and self.regroup[0].key and n is not None:
            return self.regroup[0].for_site(int(n), *self.regroup[1:])
        if self.call_grouping is None or n is None:
            return self.perm, self.always_keep
        return self.call_grouping.for_count(int(n), self.session)

    def _on(self, t: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
        if t is None or t.device == device:
            return t
        copies = self.__dict__.setdefault("_device_copies", {})
        hit = copies.get((id(t), device))
        if hit is None or hit[0] is not t:
            if runtime.RECORDING is not None:
                raise runtime.NeedsEagerCall("grouping permutation not on the device yet")
            hit = copies[(id(t), device)] = (t, t.to(device))
        return hit[1]

    def perm_on(self, device, n: Optional[int] = None) -> Optional[torch.Tensor]:
        return self._on(self._for_count(n)[0], device)

    def keep_on(self, device, n: Optional[int] = None) -> Optional[torch.Tensor]:
        return self._on(self._for_count(n)[1], device)

    def key_runs(self, n_q: int, n_k: int) -> Optional[tuple]:
        """(query start, key start, length) runs of the queries' own tokens among n_k keys, from
        key_layout; the one other part of symbolic size takes what the others leave. None when the
        lengths do not fit the layout."""
        static = sum(size for kind, size, _ in self.key_layout if kind == "other" and size is not None)
        free = any(kind == "other" and size is None for kind, size, _ in self.key_layout)
        rest = n_k - n_q - static
        if rest < 0 or (rest and not free):
            return None
        runs, pos = [], 0
        for kind, a, b in self.key_layout:
            if kind == "other":
                pos += rest if a is None else a
            else:
                n = (n_q if b is None else b) - a
                runs.append((a, pos, n))
                pos += n
        return tuple(runs) if pos == n_k else None

    def key_keep_on(self, device, n_q: int, n_k: int) -> tuple[Optional[torch.Tensor], int]:
        """(always-kept key mask of n_k keys on `device`, its count). For joint keys the other
        streams' keys are kept like text tokens when they are short (at most n_q // 4: text), and
        ranked like the queries' own keys when longer (a cached prefix of reference-image tokens:
        keeping all of them would leave little to skip); the queries' own mask goes to their runs."""
        if self.key_layout is None or n_k == n_q:
            return self.keep_on(device, n_k), self.keep_count(n_k)
        own = self._for_count(n_q)[1]
        masks = self.__dict__.setdefault("_joint_keep", {})
        hit = masks.get((n_q, n_k))
        if hit is None or hit[0] is not own:
            runs = self.key_runs(n_q, n_k)
            if runs is None:  # cannot happen for a graph the layout was read from; rank every key
                fallback("attn_key_layout", f"{n_k} keys for {n_q} queries do not fit the joint-key layout")
                runs, keep = (), torch.zeros(n_k, dtype=torch.bool)
            else:
                keep = torch.full((n_k,), n_k - n_q <= n_q // 4, dtype=torch.bool)
            for q0, k0, n in runs:
                keep[k0:k0 + n] = False if own is None else own[q0:q0 + n]
            hit = masks[(n_q, n_k)] = (own, keep, int(keep.sum()))
        if hit[2] == 0:
            return None, 0
        return self._on(hit[1], device), hit[2]

    def keep_count(self, n: Optional[int] = None) -> int:
        """Number of always-kept keys, counted once per mask on the host (never a device sync per call)."""
        keep = self._for_count(n)[1]
        counts = self.__dict__.setdefault("_keep_counts", {})
        hit = counts.get(id(keep))
        if hit is None or hit[0] is not keep:
            hit = counts[id(keep)] = (keep, int(keep.sum()) if keep is not None else 0)
        return hit[1]


class GraphInstances:
    """Which module instance a compiled graph is running for.

    Under regional compilation (`compile_repeated_blocks`) one graph serves every block of a class;
    the wrapper identifies the block by the storage of its first parameter argument and sets
    `current`, the block's ordinal: its position in the model (`locate`, read once per block:
    runtime.module_position), else the next free one in the order the blocks were first seen.
    Sites key their caches and layer numbers by it. The block of the lowest ordinal seen begins a
    model call (advances the step): by first sight alone, a block first served by another graph
    (FLUX's first single block: its first call's inputs have other strides, and Dynamo compiles a
    second graph for the rest) came after the one that began calls, and so ran every step at the
    previous step's position (until session 33).

    A key of a module seen before under another key is that module's weights at new addresses (the
    model moved off the device and back, as diffusers' model CPU offload does between generations):
    it takes over the module's ordinal, caches and step tracking. Until session 40 it was a new
    instance, so the step stopped advancing (every call a dense step 0) and each move added caches.

    Blocks are placed per model (`locate`'s root): two models of one class, each compiled, share one
    graph when Dynamo reuses it for both (Wan 2.2's two experts). Each model's blocks count their
    positions, and so their layers, from 0, and each model's first block begins its calls; their
    ordinals (caches) stay apart. Until session 40 the second model was a further block of the
    first: its calls never advanced the step, and its layers counted on from the first model's.

    Models and blocks are known by reusable numbers (`id(model)`, a weight's address), so each is
    kept beside a weak reference to what it was seen for. A key or model id seen again whose module
    or model was freed is another object's now: before placing a new key, every freed module and
    model is forgotten (`_forget_freed`), its ordinals' caches freed (`on_forget`, counted as
    `instances_freed`). Until session 52 a new model given a freed model's id was placed after that
    model's blocks, so its calls never began a model call (no step advanced: a silently wrong
    result), and every freed model's caches stayed allocated."""

    def __init__(self, attention_sites: int):
        self.attention_sites = attention_sites
        self.keys: dict[int, int] = {}  # key -> ordinal (caches are kept per ordinal)
        self.modules: dict[int, Any] = {}  # key -> weak reference to the module it was seen for
        self.places: dict[int, tuple] = {}  # ordinal -> (its model's id or None, position in that model)
        self.first: dict[Any, int] = {}  # model id -> the lowest position seen in it
        self.roots: dict[int, Any] = {}  # model id -> weak reference to the model
        self.models_seen = 0  # located models ever placed (a freed first model's successor is adopted too)
        self.on_new_model: Optional[Callable[[Any], None]] = None  # with the first block seen of each model after the first
        self.on_forget: Optional[Callable[[set], None]] = None  # with the ordinals of freed modules
        self.current_key: Optional[int] = None
        self.current = 0
        self.position = 0  # of `current` in its model: what layer numbers count from

    def enter(self, key: int, locate: Optional[Callable[[], tuple]] = None) -> bool:
        """Set `current` for the block of `key` (`locate()`: (its position or None, the module or
        None, its model or None)); True when this call begins a model call."""
        ordinal = self.keys.get(key)
        if ordinal is not None:
            ref = self.modules[key]
            if ref is not None and ref() is None:  # a freed module's weight address, reused
                ordinal = None
        if ordinal is None:
            self._forget_freed()
            position, module, root = locate() if locate is not None else (None, None, None)
            moved = self._key_of(module)
            if moved is not None:
                ordinal = self.keys.pop(moved)
                del self.modules[moved]
                count("instance_weights_moved")
                log.info("chipmunk: %s's weights moved: its caches and steps carry on", type(module).__name__)
            else:
                new_model = root is not None and id(root) not in self.first
                if new_model:
                    self.models_seen += 1
                    self.roots[id(root)] = _weak(root)
                ordinal = self._place(position, None if root is None else id(root))
                if new_model and self.models_seen > 1 and module is not None \
                        and self.on_new_model is not None:  # a located model after the first
                    self.on_new_model(module)
            self.keys[key] = ordinal
            self.modules[key] = weakref.ref(module) if module is not None else None
        self.current, self.current_key = ordinal, key
        model, self.position = self.places[ordinal]
        return self.position == self.first[model]

    def module(self) -> Any:
        """The current block's module (None when not located, or freed)."""
        ref = self.modules.get(self.current_key)
        return ref() if ref is not None else None

    def _place(self, position: Optional[int], model) -> int:
        """A new block's ordinal; records its model and position (by first sight when not located)."""
        mine = [pos for m, pos in self.places.values() if m == model]
        if position is None or position in mine:
            position = max(mine, default=-1) + 1
        taken = set(self.places)
        ordinal = position if position not in taken else max(taken) + 1
        if len(taken) == 1:
            log.info("chipmunk: one compiled graph serves several module instances (regional compile, "
                     "or models of one class)")
        self.places[ordinal] = (model, position)
        self.first[model] = min(position, self.first.get(model, position))
        return ordinal

    def _forget_freed(self) -> None:
        """Forget every module and model that was freed: their keys, places and caches."""
        dead_models = {m for m, ref in self.roots.items() if ref is not None and ref() is None}
        dead_keys = [k for k, ref in self.modules.items() if ref is not None and ref() is None]
        if not dead_models and not dead_keys:
            return
        ordinals = {self.keys[k] for k in dead_keys}
        ordinals |= {o for o, (m, _) in self.places.items() if m in dead_models}
        for k in [k for k, o in self.keys.items() if o in ordinals]:
            del self.keys[k], self.modules[k]
        touched = {self.places.pop(o)[0] for o in ordinals}  # every dead model (all its places) included
        for m in touched:  # a model that lost blocks only (replaced ones) keeps its lowest left
            left = [pos for mm, pos in self.places.values() if mm == m]
            if left:
                self.first[m] = min(left)
            else:
                self.first.pop(m, None)
                self.roots.pop(m, None)
        count("instances_freed", len(ordinals))
        log.info("chipmunk: %d module instance(s) of a compiled graph were freed: their caches too", len(ordinals))
        if self.on_forget is not None and ordinals:
            self.on_forget(ordinals)

    def identity(self, ordinal: int) -> Optional[Any]:
        """What module instance `ordinal` is: the module itself, else ("key", its first parameter's
        address) (a whole model's graph locates no module); None when no module was seen for it."""
        for key, o in self.keys.items():
            if o == ordinal:
                ref = self.modules.get(key)
                module = ref() if ref is not None else None
                return module if module is not None else ("key", key)
        return None

    def ordinal_of(self, ident: Any) -> Optional[int]:
        """The ordinal this graph gave the module instance `ident` (see `identity`), or None."""
        if isinstance(ident, tuple):
            ref = self.modules.get(ident[1])
            free = ref is None or ref() is None  # the key stands for no live located module
            return self.keys.get(ident[1]) if free else None
        key = self._key_of(ident)
        return self.keys[key] if key is not None else None

    def _key_of(self, module) -> Optional[int]:
        """The key `module` was seen under, if any."""
        if module is None:
            return None
        return next((k for k, ref in self.modules.items() if ref is not None and ref() is module), None)


def _weak(obj) -> Any:
    """A weak reference to `obj`, or None where it takes none (it is then never taken for freed)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream (of `t`'s device)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def lookup(site_id: int) -> Optional[Site]:
    site = SITES.get(site_id)
    if site is None:
        fallback("unknown_site", f"site {site_id} is not registered in this process")
    return site
