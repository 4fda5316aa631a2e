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

    def tensor(self, name: str, shape, dtype, device, *, alloc=None) -> torch.Tensor:
        full = f"s{self.site.id}__{self.branch}__{name}".replace(".", "_")
        t = getattr(self.site.session.state, full, None)
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
            t = alloc(*shape, dtype=dtype, device=device) if alloc else torch.empty(shape, dtype=dtype, device=device)
            self.site.session.state.put(full, t)
        return t

    def ensure(self, key: tuple) -> bool:
        """True when the caches fit `key` (shapes, dtype, device); else marks them empty."""
        if self.key != key:
            if self.key is not None:
                count("realloc")
                log.info("chipmunk: site %s branch %s: new shapes %s, caches restart", self.site.path, self.branch, key)
            self.key = key
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

    def __post_init__(self):
        self.id = new_site_id()
        SITES[self.id] = self
        self.session.sites.append(self)

    def branch_state(self) -> tuple[BranchState, Any]:
        pos = self.session.position()
        st = self.states.get(pos.branch)
        if st is None:
            st = self.states[pos.branch] = BranchState(self, pos.branch)
        return st, pos

    def ran(self, kind: str) -> None:
        self.steps[kind] = self.steps.get(kind, 0) + 1
        count(f"{self.kind}_{kind}")

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


def lookup(site_id: int) -> Optional[Site]:
    site = SITES.get(site_id)
    if site is None:
        fallback("unknown_site", f"site {site_id} is not registered in this process")
    return site
