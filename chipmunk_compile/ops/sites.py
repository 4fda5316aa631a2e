"""Sites: one matched attention or MLP of a compiled graph, with its per-branch cache state.

Invariants:
- A site is created by the rewrite and registered in `runtime.SITES` under an integer id that the
  graph passes to the op as a constant; the op looks it up on every call.
- Cache tensors live in the session's `ChipmunkState` module (named `<site>__<branch>__<name>`),
  are allocated once per (branch, shape) on the first call that needs them and are then updated in
  place. A shape change (new resolution or batch) reallocates and restarts that site dense.
- A cache is read only if it was filled in the current generation (`filled`); otherwise the op
  runs the exact path and counts the fallback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch._dynamo.utils import counters

from ..runtime import SITES, Session, new_site_id

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


class BranchState:
    """Caches of one site for one guidance branch."""

    def __init__(self, site: "Site", branch: str):
        self.site, self.branch = site, branch
        self.key: Optional[tuple] = None
        self.filled_generation = -1  # generation whose dense/refresh step filled the caches
        self.index_generation = -1
        self.lse_generation = -1
        self.index_step = -1
        self.cache: dict[str, torch.Tensor] = {}  # name -> tensor, valid for `key`

    def tensor(self, name: str, shape, dtype, device, *, alloc=None) -> torch.Tensor:
        """The cache `name`, allocated on first use for the current key (see `ensure`)."""
        t = self.cache.get(name)
        if t is not None:
            return t
        full = f"s{self.site.id}__{self.branch}__{name}".replace(".", "_")
        t = alloc(*shape, dtype=dtype, device=device) if alloc else torch.empty(shape, dtype=dtype, device=device)
        self.site.session.state.put(full, t)  # owned (and counted) by the session's state module
        self.cache[name] = t
        return t

    def get(self, name: str) -> Optional[torch.Tensor]:
        return self.cache.get(name)

    def ensure(self, key: tuple) -> bool:
        """True when the caches fit `key` (shapes, dtype, device); else marks them empty."""
        if self.key != key:
            if self.key is not None:
                count("realloc")
                log.info("chipmunk: site %s branch %s: new shapes %s, caches restart", self.site.path, self.branch, key)
            self.key = key
            self.cache.clear()
            self.filled_generation = self.index_generation = self.lse_generation = -1
            return False
        return True


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
    id: int = -1
    states: dict = field(default_factory=dict)
    steps: dict = field(default_factory=dict)  # step kind -> calls, for reports
    graph: Any = None  # GraphInstances of the compiled graph this site belongs to

    def __post_init__(self):
        self.id = new_site_id()
        SITES[self.id] = self
        self.session.sites.append(self)

    def branch_state(self) -> tuple[BranchState, Any]:
        pos = self.session.position()
        inst = self.graph.current if self.graph is not None else 0
        key = pos.branch if inst == 0 else f"i{inst}_{pos.branch}"
        st = self.states.get(key)
        if st is None:
            st = self.states[key] = BranchState(self, key)
        return st, pos

    def current_layer(self) -> int:
        """The layer index, counting earlier block instances when one graph serves many blocks."""
        if self.graph is None or self.graph.current == 0:
            return self.layer
        per = self.graph.attention_sites if self.graph.attention_sites else 1
        return self.graph.current * per + self.layer

    def ran(self, kind: str) -> None:
        self.steps[kind] = self.steps.get(kind, 0) + 1
        count(f"{self.kind}_{kind}")

    def rng(self, device, step: int) -> torch.Generator:
        """Random-key draws seeded by (layer, step): generations repeat exactly, branches agree."""
        gens = self.__dict__.setdefault("_gens", {})
        gen = gens.get(device)
        if gen is None:
            gen = gens[device] = torch.Generator(device=device)
        gen.manual_seed(1_000_003 * step + 7919 * self.current_layer() + (1 if self.kind == "mlp" else 0))
        return gen

    def column_major(self, w: torch.Tensor) -> torch.Tensor:
        """`w` with stride(0) == 1 (the layout the sparse mm2 gathers rows of `wᵀ` from): `w`
        itself when it already is, else a copy made once per weight (keyed by storage, version,
        shape and strides, so a regional-compile site keeps one per block) and reused."""
        if w.stride(0) == 1:
            return w
        copies = self.__dict__.setdefault("_col_major", {})
        key = (w.data_ptr(), w._version, tuple(w.shape), tuple(w.stride()), w.device)
        hit = copies.get(key)
        if hit is None:
            for stale in [k for k in copies if k[0] == key[0]]:  # the weight changed in place
                del copies[stale]
            count("w2_column_major_copy")
            hit = copies[key] = w.t().contiguous().t()
        return hit

    def perm_on(self, device) -> Optional[torch.Tensor]:
        if self.perm is None:
            return None
        if self.perm.device != device:
            self.perm = self.perm.to(device)
        return self.perm

    def keep_on(self, device) -> Optional[torch.Tensor]:
        if self.always_keep is None:
            return None
        if self.always_keep.device != device:
            self.always_keep = self.always_keep.to(device)
        return self.always_keep


class GraphInstances:
    """Which module instance a compiled graph is running for.

    Under regional compilation (`compile_repeated_blocks`) one graph serves every block of a class;
    the wrapper identifies the block by the storage of its first parameter argument and sets
    `current` (0 for the first block seen, 1 for the next, ...). Sites key their caches by it."""

    def __init__(self, attention_sites: int):
        self.attention_sites = attention_sites
        self.keys: dict[int, int] = {}
        self.current = 0

    def enter(self, key: int) -> int:
        ordinal = self.keys.get(key)
        if ordinal is None:
            ordinal = self.keys[key] = len(self.keys)
            if ordinal == 1:
                log.info("chipmunk: one compiled graph serves several module instances (regional compile)")
        self.current = ordinal
        return ordinal


def lookup(site_id: int) -> Optional[Site]:
    site = SITES.get(site_id)
    if site is None:
        fallback("unknown_site", f"site {site_id} is not registered in this process")
    return site
