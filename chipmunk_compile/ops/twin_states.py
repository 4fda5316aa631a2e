"""Caches that follow a module from one compiled graph of its code to another.

Dynamo compiles a frame again when a guard fails (a second resolution under automatic dynamic
shapes; under regional compilation, FLUX's second single block, whose input has other strides), and
from then on tries the newest graph first. A module that the earlier graph served then runs in the
later one, whose sites hold no state for it. Until session 67 the earlier graph's states stayed
allocated for the life of the session: a resolution generated again after another one held its
caches twice (FLUX.1 at 1024² at full depth: GBs of device memory). Within a generation the
module's next sparse step also ran the exact path, counted as `*_cache_not_filled`.

Invariants:
- Sites are twins when they come from the same frame's code at the same place of its plan (same
  kind, pattern and path): `Site.twin`, set by the backend (`register`). Their configs must be equal.
- A site's new state (a branch and shape it holds none for) takes its twin's state of the same
  module, branch and shape. The module is the same object (or, for a graph of a whole model, the
  same first-parameter key), never merely the same ordinal.
- Within one session the state moves: its caches, and its fill marks where one step tracker gives
  them the same meaning in both graphs and both sites order that token count alike (the twin's
  permutation and always-kept keys for that count equal to this call's, compared on the host; a
  twin that groups each call by its symbolic sizes gives the one order it cached for the count;
  the joint key layouts equal). Otherwise its marks are cleared: refilled at its branch's next
  dense step like any unfilled cache (counted). Its epoch is kept: the step graphs each graph recorded
  against it capture its own tensors, and a graph finds them again only once the state is back in
  its site.
- A twin's state in another session (one the module did not join: runtime.session_for) is
  freed, its caches owned by that session's state module; the new one starts empty.
- A moved state's buffers are renamed to the new site's prefix, so that freeing the old graph's
  sites (`Session.prune`, by name) keeps them. A twin whose graph was freed is never asked.
- A state kept in host memory (`offload_state`) stays where it is: its slots name its site.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Optional

import torch

from ..runtime import SITES

log = logging.getLogger("chipmunk_compile")

# twin key -> the live sites compiled with it
_TWINS: dict[tuple, "weakref.WeakSet[Any]"] = {}


def register(site: Any, frame: tuple, index: int) -> None:
    """Give `site` its twin key: the frame its graph was compiled from and its place in the plan."""
    if not frame:
        return
    site.twin = (frame, index, site.kind, site.pattern, site.path)
    _TWINS.setdefault(site.twin, weakref.WeakSet()).add(site)


def state_key(ordinal: int, branch: str) -> str:
    """The key of a site's state for module `ordinal` of its graph and guidance branch `branch`."""
    return branch if ordinal == 0 else f"i{ordinal}_{branch}"


def take(site: Any, shape: tuple, branch: str, tokens: Optional[int]) -> Optional[Any]:
    """The state of the module `site` runs for now, branch `branch`, shape `shape`, moved from a
    twin site of another graph of the session; None when no twin holds one that can move (a twin
    in another session that holds one has it freed)."""
    from .sites import count

    twins = _TWINS.get(getattr(site, "twin", None) or ())
    me = site.graph.identity(site.graph.current) if site.graph is not None else None
    if not twins or me is None:
        return None
    for other in list(twins):
        if other is site or other.graph is None or other.cfg != site.cfg or SITES.get(other.id) is not other:
            continue  # (a site of a freed graph, not collected yet, holds nothing: Session.prune)
        ordinal = other.graph.ordinal_of(me)
        if ordinal is None:
            continue
        key = state_key(ordinal, branch)
        st = other.states.get((key, shape))
        if st is None or st.offloaded:
            continue
        if other.session is site.session:
            other.pop_state(key, shape)
            st.site, st.instance, st.branch = site, site.graph.current, state_key(site.graph.current, branch)
            name = site.state_name(st.branch)  # its buffers go by this site's name: pruning the other keeps them
            site.session.state.rename(st.name.replace(".", "_"), name.replace(".", "_"))  # as BranchState.tensor names them
            st.name = name
            st.order_of = {}  # input layouts of the other graph
            if not _same_order(site, other, tokens):  # its caches, in another token order, refill
                st.unfill(steps=True)
            for layer, verdict in other.attn_diffuse.items():
                site.attn_diffuse.setdefault(layer, verdict)
            for layer, mass in other.attn_mass.items():
                site.attn_mass.setdefault(layer, mass)
            count("state_followed_module")
            log.info("chipmunk: %s: a module's caches moved to a newer graph of the same code", site.path)
            return st
        other.pop_state(key, shape).drop()
        count("state_twin_freed")
        log.info("chipmunk: %s: a module's caches in an older graph of the same code were freed: it runs in a "
                 "newer one", site.path)
    return None


def _same_order(site: Any, other: Any, tokens: Optional[int]) -> bool:
    """Whether both sites order a call of `tokens` tokens alike (their caches are in that order)."""
    if site.key_layout != other.key_layout:
        return False
    theirs = _order_of(other, tokens)
    return theirs is not None and orders_equal(site._for_count(tokens), theirs)


def _order_of(other: Any, tokens: Optional[int]) -> Optional[tuple]:
    """(perm, always_keep) the twin gave calls of `tokens` tokens, None when not one order.
    A grid from position ids read per generation gives the order of the twin's last generation:
    the one its fill marks name, when they name the current one. A twin that groups each call
    (symbolic counts) is not asked to group this call, which is another graph's (it would read
    this call's sizes with its own symbols, and count a count it cannot group): the orders it
    cached for that count are read instead, and must be one."""
    if other.call_grouping is None or tokens is None or (other.regroup is not None and other.regroup[0].key):
        return other._for_count(tokens)
    cached = other.call_grouping.orders_cached(tokens)
    if not cached or not all(orders_equal(hit, cached[0]) for hit in cached[1:]):
        return None
    return cached[0]


def orders_equal(a: tuple, b: tuple) -> bool:
    """Whether two (perm, always_keep) pairs order tokens alike (the same objects, or equal values)."""
    return a is b or all(_equal(x, y) for x, y in zip(a, b))


def _equal(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.cpu(), b.cpu())))
