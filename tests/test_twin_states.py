"""ops/twin_states.py on real sites without a compile: which twin's state a new state takes, with
which fill marks, and which it frees."""

import torch
import torch.nn as nn

from chipmunk_compile.config import ChipmunkConfig
from chipmunk_compile.grouping import CallGrouping
from chipmunk_compile.ops import twin_states
from chipmunk_compile.ops.sites import GraphInstances, Site
from chipmunk_compile.runtime import Session

FRAME = ("model.py", 10, "forward")
SHAPE = ((1, 8, 4), (4, 16), torch.float32, torch.device("cpu"))
CONFIG = ChipmunkConfig.from_any("default")


def _site(session, instances, module, *, perm=None, index=0):
    """An MLP site of a graph of FRAME, entered for `module` (its block numbering: `instances`)."""
    site = Site("mlp", "mlp", "ff", 0, CONFIG.mlp, session, perm=perm)
    site.graph = instances
    twin_states.register(site, FRAME, index)
    instances.enter(id(module), lambda: (0, module, None))
    return site


def _filled_state(site, session):
    pos = session.position()
    st = site.branch_state(SHAPE, pos, 8)
    st.tensor("h", (8, 16), torch.float32, "cpu").fill_(3.0)
    st.filled_generation, st.filled_step = pos.generation, pos.step
    return st


def test_a_new_graph_of_the_code_takes_the_module_state_with_its_fill_marks():
    session, block = Session(CONFIG, None), nn.Linear(2, 2)
    old = _site(session, GraphInstances(0), block, perm=torch.arange(8))
    st = _filled_state(old, session)
    new = _site(session, GraphInstances(0), block, perm=torch.arange(8))
    assert new.branch_state(SHAPE, session.position(), 8) is st
    assert not old.states and st.site is new and st.filled_generation == 0
    assert torch.equal(st.get("h"), torch.full((8, 16), 3.0))  # the same tensor, not a copy


def test_another_token_order_moves_the_caches_but_not_their_fill_marks():
    session, block = Session(CONFIG, None), nn.Linear(2, 2)
    old = _site(session, GraphInstances(0), block, perm=torch.arange(8))
    st = _filled_state(old, session)
    new = _site(session, GraphInstances(0), block, perm=torch.arange(8).flip(0))
    assert new.branch_state(SHAPE, session.position(), 8) is st
    assert st.filled_generation == -1 and st.filled_step == -1  # refilled at the next dense step


def test_another_module_another_place_or_another_shape_takes_nothing():
    session, block, other = Session(CONFIG, None), nn.Linear(2, 2), nn.Linear(2, 2)
    old = _site(session, GraphInstances(0), block)
    st = _filled_state(old, session)
    for new in (_site(session, GraphInstances(0), other),  # another module
                _site(session, GraphInstances(0), block, index=1)):  # another site of the plan
        assert new.branch_state(SHAPE, session.position(), 8) is not st
    new = _site(session, GraphInstances(0), block)
    assert new.branch_state(((1, 6, 4), *SHAPE[1:]), session.position(), 6) is not st
    assert list(old.states.values()) == [st]


def test_a_twin_in_another_session_is_freed_not_taken():
    block = nn.Linear(2, 2)
    first, second = Session(CONFIG, None), Session(CONFIG, None)
    old = _site(first, GraphInstances(0), block)
    st = _filled_state(old, first)
    new = _site(second, GraphInstances(0), block)
    got = new.branch_state(SHAPE, second.position(), 8)
    assert got is not st and not old.states and not st.cache and got.filled_generation == -1


def test_a_moved_state_outlives_the_graph_it_came_from():
    """Its buffers go by the new site's name: freeing the old graph's sites (pruned by name) keeps
    them, and a site of a freed graph, still alive until collected, is never taken from."""
    session, block = Session(CONFIG, None), nn.Linear(2, 2)
    old = _site(session, GraphInstances(0), block)
    st = _filled_state(old, session)
    held = session.state.nbytes()
    new = _site(session, GraphInstances(0), block)
    assert new.branch_state(SHAPE, session.position(), 8) is st
    session._dead_sites.append(old.id)  # what the old graph's finalizer records
    session.prune()
    assert session.state.nbytes() == held > 0 and st.name.startswith(f"s{new.id}__")
    _filled_state(new, session)
    session._dead_sites.append(new.id)
    session.prune()
    late = _site(session, GraphInstances(0), block)  # `new` is pruned, not collected: nothing to take
    assert late.branch_state(SHAPE, session.position(), 8) is not st


class _PerCall:
    """A stand-in for grouping.CallGrouping: the orders a symbolic site cached per count."""

    def __init__(self, *orders):
        self.cache = {(8, i): (order, None) for i, order in enumerate(orders)}

    def for_count(self, n, session):
        return next(iter(self.cache.values()))

    orders_cached = CallGrouping.orders_cached  # the real reading of `cache`


def test_a_twin_grouping_each_call_proves_its_order_by_the_one_it_cached():
    """A symbolic twin is not asked to group another graph's call: the order it cached for the
    count stands for its caches' order, if it cached one; two orders prove nothing."""
    ident, flipped = torch.arange(8), torch.arange(8).flip(0)
    for cached, kept in (((ident,), True), ((ident, ident.clone()), True), ((ident, flipped), False)):
        session, block = Session(CONFIG, None), nn.Linear(2, 2)
        old = _site(session, GraphInstances(0), block)
        old.call_grouping = _PerCall(*cached)
        st = _filled_state(old, session)
        new = _site(session, GraphInstances(0), block)
        new.call_grouping = _PerCall(ident)
        assert new.branch_state(SHAPE, session.position(), 8) is st
        assert (st.filled_generation == 0) == kept, cached


def test_a_branch_named_with_a_dot_moves_and_frees_its_buffers():
    """Buffer names replace dots (`BranchState.tensor`): the rename of a moved state and the
    freeing of a state go by the same names, so nothing is left behind in the state module."""
    import dataclasses

    session, block = Session(CONFIG, None), nn.Linear(2, 2)
    pos = dataclasses.replace(session.position(), branch="cfg.cond")
    old = _site(session, GraphInstances(0), block)
    st = old.branch_state(SHAPE, pos, 8)
    st.tensor("h", (8, 16), torch.float32, "cpu")
    new = _site(session, GraphInstances(0), block)
    assert new.branch_state(SHAPE, pos, 8) is st
    session._dead_sites.append(old.id)
    session.prune()
    assert session.state.nbytes() > 0
    st.drop()
    assert session.state.nbytes() == 0
