"""A site whose caches do not fit the device gives up its state: the call that failed is computed
exactly, the fallback is counted and logged, the other sites keep running sparse. With
`offload_state` allowed (the default "auto") the site then keeps its caches in host memory; if
those do not fit either (or offloading is off) it runs dense from then on."""

import pytest
import torch

import chipmunk_compile
from chipmunk_compile.ops import sites as sites_mod
from chipmunk_compile.runtime import sessions_of
from helpers import ccount, fresh_dynamo, max_rel  # noqa: F401
from test_graph_break_frames import MoeNet, run_steps


def run_with_failing_cache(monkeypatch, cache: str, device_only: bool):
    """run_steps on a 2-block MoeNet whose cache `cache` cannot be allocated (on the device only,
    or anywhere): the one site that failed, and the relative errors per step."""
    model = MoeNet(depth=2).eval()
    real = sites_mod.BranchState.tensor
    failed = []

    def tensor(self, name, *a, **k):  # this cache does not fit
        if name == cache and not (device_only and self.offloaded):
            failed.append(self.site)
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {name}")
        return real(self, name, *a, **k)

    monkeypatch.setattr(sites_mod.BranchState, "tensor", tensor)
    errs = run_steps(model)
    assert len(set(map(id, failed))) == 1
    return model, failed[0], errs


@pytest.mark.parametrize("cache", ["o_cache", "h_cache"])
def test_a_site_out_of_memory_runs_dense_and_frees_its_caches(fresh_dynamo, monkeypatch, cache):
    model, site, errs = run_with_failing_cache(monkeypatch, cache, device_only=False)
    assert site.out_of_memory and site.offload_after_oom
    # first on the device, then in host memory: both failed
    assert ccount("fallback:state_out_of_memory_offloaded") == 1 and ccount("fallback:state_out_of_memory") == 1
    assert errs[0] < 1e-5 and max(errs) < 0.05, errs
    # one graph serves both blocks: the site runs dense for both (the failing call included), the
    # site of the other kind stays sparse
    stats = {s["kind"]: s["steps"] for s in chipmunk_compile.stats(model)["sites"]}
    other = "mlp" if site.kind == "attention" else "attention"
    assert stats[site.kind] == {"dense": 12} and stats[other].get("sparse", 0) > 0, stats
    prefix = f"s{site.id}__"
    assert not site.states and not [n for s in sessions_of(model) for n in s.state._buffers if n.startswith(prefix)]


@pytest.mark.parametrize("cache", ["o_cache", "h_cache"])
def test_a_site_out_of_device_memory_moves_its_caches_to_host_memory(fresh_dynamo, monkeypatch, cache):
    """Only device-resident caches fail to allocate: the site's branches restart offloaded and run
    sparse again (a refresh first), no site runs dense for good."""
    model, site, errs = run_with_failing_cache(monkeypatch, cache, device_only=True)
    assert site.offload_after_oom and not site.out_of_memory
    assert ccount("fallback:state_out_of_memory_offloaded") == 1 and ccount("fallback:state_out_of_memory") == 0
    assert site.states and all(st.offloaded and st.home for st in site.states.values())
    stats = {s["kind"]: s["steps"] for s in chipmunk_compile.stats(model)["sites"]}
    assert stats[site.kind].get("sparse", 0) > 0, stats
    assert errs[0] < 1e-5 and max(errs) < 0.05, errs


def test_out_of_memory_frees_other_shapes_first(fresh_dynamo, monkeypatch):
    """A cache that does not fit while another resolution's caches are kept (`state_shapes`): those
    are freed and the call tries again, so no site gives up its state or runs dense."""
    from helpers import chip
    from test_numerics import Net, run, sparse_cfg

    m = Net().eval()
    cm = chip(m, sparse_cfg(), dynamic=True)
    run(m, cm, 5, n=64)
    real, failed = sites_mod.BranchState.tensor, []

    def tensor(self, name, *a, **k):  # the first cache of the 96-token shape does not fit
        if not failed and self.key[0][-2] == 96:
            failed.append(self.site)
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {name}")
        return real(self, name, *a, **k)

    monkeypatch.setattr(sites_mod.BranchState, "tensor", tensor)
    outs, refs = run(m, cm, 5, n=96)
    errs = [max_rel(o, r) for o, r in zip(outs, refs)]
    assert failed and ccount("state_idle_dropped") == 1 and errs[0] < 1e-5 and max(errs) < 0.05, errs
    assert not any(k.startswith("fallback:") for k in fresh_dynamo["chipmunk"])
    sites = [s for ses in sessions_of(m) for s in ses.sites]
    assert not any(s.out_of_memory or s.offload_after_oom for s in sites)
    assert {shape[0][-2] for s in sites for _, shape in s.states} == {96}
    assert {k for s in sites for k in s.steps} >= {"sparse"}
