"""`offload_state`: every site cache lives in host memory and is staged into one of two device
slots per call, the next call's prefetched (ops/offload.py). The outputs must be bit-identical to
keeping the caches on the device, whatever order the calls come in, and a slot must never be read
for a branch it does not hold (slots are poisoned after each call to prove the data comes home)."""

import importlib

import pytest
import torch

import chipmunk_compile
from torch._dynamo.utils import counters
from chipmunk_compile.ops import offload as offload_mod
from chipmunk_compile.runtime import sessions_of
from helpers import ccount, cfg, chip, flux, flux_inputs, fresh_dynamo  # noqa: F401

SPARSE = {"top_keys": 0.25, "random_keys": 0.0, "full_step_every": 3}
CONFIG = cfg(attn={**SPARSE, "group": 16}, mlp={**SPARSE, "block": 16})
STEPS = 7


def generate(model, config, order=("cond", "uncond")):
    """Two guidance branches per step, named through diffusers' cache context (their call order
    per step from `order(step)`, or fixed); returns every output, keyed (step, branch), the model
    and the offload misses counted so far after each step."""
    compiled = chip(model, config)
    outs, misses = {}, []
    with torch.no_grad():
        for step in range(STEPS):
            for branch in order(step) if callable(order) else order:
                x = flux_inputs(1.0 - step / STEPS)
                x["hidden_states"] = x["hidden_states"] + 0.03 * step + (0.1 if branch == "uncond" else 0.0)
                with compiled.cache_context(branch, step_index=step):
                    outs[(step, branch)] = compiled(**x)[0].clone()
            misses.append(ccount("offload_miss"))
    return outs, compiled, misses


def poison_after_each_call(monkeypatch):
    """After every staged call (and its write-back), fill the slot it used with NaN."""
    real = offload_mod.StateOffload._unstage

    def unstage(self, st, slot, writes):
        real(self, st, slot, writes)
        for t in slot.tensors.values():
            t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))

    monkeypatch.setattr(offload_mod.StateOffload, "_unstage", unstage)


def test_offloaded_state_gives_identical_outputs(fresh_dynamo, monkeypatch):
    model = flux()
    kept, _, _ = generate(model, CONFIG)
    torch._dynamo.reset()
    fresh_dynamo.clear()
    poison_after_each_call(monkeypatch)
    off, compiled, misses = generate(model, {**CONFIG, "offload_state": True})
    for key in kept:
        assert torch.equal(off[key], kept[key]), key
    steps = chipmunk_compile.stats(compiled)["sites"]
    assert all(s["steps"].get("sparse", 0) > 0 for s in steps), steps  # the caches were used
    assert ccount("attention_forecast") > 0  # the default's residual forecast read its slope from home too
    # the attention joins the call order at step 1 (step 0 is dense): from step 2 on every staged
    # call finds its branch prefetched
    assert ccount("offload_hit") > 0 and misses[-1] == misses[1], misses
    session = sessions_of(compiled)[0]
    offload = session.offload(torch.device("cpu"))
    branches = [st for s in session.sites for st in s.states.values()]
    assert len(branches) == 2 * len(session.sites) and all(st.home for st in branches)
    # the homes are the state; each of the two device slots holds one tensor per (cache, shape)
    assert all(b.dtype == torch.uint8 for b in session.state.buffers())
    union = {key: home.bytes.numel() for st in branches for key, home in st.home.values()}
    assert offload.device_bytes() <= 2 * sum(union.values()) < session.state.nbytes() / 2
    assert chipmunk_compile.stats(compiled)["offload_slot_bytes"] == offload.device_bytes()
    # release frees the homes and the device slots; the next generation stages them anew, alike
    chipmunk_compile.release(compiled)
    freed = chipmunk_compile.stats(compiled)
    assert freed["state_bytes"] == freed["offload_slot_bytes"] == 0
    again, _, _ = generate(model, {**CONFIG, "offload_state": True})
    for key in kept:
        assert torch.equal(again[key], kept[key]), key


def test_changed_call_order_is_a_counted_miss_with_identical_outputs(fresh_dynamo, monkeypatch):
    """The guidance branches swap their order every other step: the learned prediction is wrong
    there, the staged call copies synchronously (counted) and the outputs do not change."""
    model = flux()
    order = lambda step: ("cond", "uncond") if step % 4 < 2 else ("uncond", "cond")  # noqa: E731
    kept, _, _ = generate(model, CONFIG, order)
    torch._dynamo.reset()
    fresh_dynamo.clear()
    poison_after_each_call(monkeypatch)
    off, _, misses = generate(model, {**CONFIG, "offload_state": True}, order)
    for key in kept:
        assert torch.equal(off[key], kept[key]), key
    # a swap (steps 2, 4, 6) costs misses at its boundaries; a repeated order (step 3, 5) none
    assert misses[2] > misses[1] and misses[3] == misses[2] and misses[5] == misses[4] > misses[3], misses


def test_offloading_session_records_no_cuda_graphs(fresh_dynamo):
    chip(flux(), {**CONFIG, "offload_state": True})(**flux_inputs(1.0))
    assert ccount("graph_disabled:offload_state") >= 1


def test_a_failed_call_leaves_no_slot_owned(fresh_dynamo, monkeypatch):
    """A call that raises inside its staged context (here: the column-sparse kernel) may have
    half-written its slot: no later call may take that slot for the branch, its home is the truth."""
    attention_mod = importlib.import_module("chipmunk_compile.ops.attention")  # the package exports the op
    model = flux()
    compiled = chip(model, {**CONFIG, "offload_state": True})
    with torch.no_grad():
        for step in range(2):
            compiled(**flux_inputs(1.0 - step / STEPS))
    session = sessions_of(compiled)[0]
    offload = session.offload(torch.device("cpu"))

    def broken(*a, **k):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(attention_mod, "kernel", lambda *a, **k: broken)
    with torch.no_grad(), pytest.raises(RuntimeError, match="kernel failed"):
        compiled(**flux_inputs(0.5))
    assert offload.slots[offload.current].owner is None



def test_auto_offloads_the_branches_that_would_crowd_the_device(fresh_dynamo, monkeypatch):
    """`offload_state: auto` on a simulated device whose capacity is the whole state and whose
    reserve is half of it: the first branches stay on the device, the later ones (that would leave
    less than the reserve free) go to host memory, each counted; the outputs do not change."""
    model = flux()
    kept, compiled, _ = generate(model, CONFIG)
    total = chipmunk_compile.stats(compiled)["state_bytes"]
    torch._dynamo.reset()
    fresh_dynamo.clear()
    on_device = []  # branch states that allocated device caches

    def measured(self, st):
        real_measured(self, st)
        if not st.offloaded and st not in on_device:
            on_device.append(st)

    real_measured = offload_mod.StateOffload.measured
    monkeypatch.setattr(offload_mod.StateOffload, "measured", measured)
    monkeypatch.setattr(offload_mod.StateOffload, "capacity", lambda self: total)
    monkeypatch.setattr(offload_mod.StateOffload, "free_bytes", lambda self: total - sum(st.nbytes for st in on_device))
    poison_after_each_call(monkeypatch)
    off, compiled, _ = generate(model, {**CONFIG, "offload_reserve": 0.5})
    for key in kept:
        assert torch.equal(off[key], kept[key]), key
    branches = [st for sess in sessions_of(compiled) for s in sess.sites for st in s.states.values()]
    offloaded = [st for st in branches if st.offloaded]
    assert 0 < len(offloaded) < len(branches) and ccount("offload_auto_branch") == len(offloaded)
    rows = chipmunk_compile.stats(compiled)
    assert sum(r["state_bytes"] for r in rows["sites"]) == rows["state_bytes"]
    assert sum(r.get("offloaded_branches", 0) for r in rows["sites"]) == len(offloaded)
    assert all(st.home for st in offloaded) and not any(st.home for st in branches if not st.offloaded)
    # what stayed on the device left at least the reserve free, give or take the last branch placed
    assert sum(st.nbytes for st in on_device) <= 0.5 * total + max(st.nbytes for st in branches)
    assert ccount("offload_hit") > 0



def test_auto_keeps_a_branch_on_the_device_when_free_memory_cannot_be_read(fresh_dynamo, monkeypatch):
    off = offload_mod.StateOffload(torch.device("cpu"), "auto", 0.15)

    def unreadable(self):
        raise RuntimeError("no memory info on this driver")

    monkeypatch.setattr(offload_mod.StateOffload, "capacity", unreadable)
    assert off.decide(object()) is False and ccount("offload_auto_unavailable") == 1
    assert offload_mod.StateOffload(torch.device("cpu"), True).decide(object()) is True


def test_auto_under_regional_compile_with_step_graphs(fresh_dynamo, monkeypatch):
    """One graph serving 4 blocks (regional compile), step graphs recorded (emulated on CPU), and
    a simulated device that fits about half the state: the outputs equal whole-model compilation
    with caches on the device; steps of offloaded branches are never recorded, the others replay."""
    import copy

    from chipmunk_compile import graphs
    from test_regional_compile import OPTIONS, Stack

    torch.manual_seed(0)
    model = Stack().eval()
    x, drift = torch.randn(2, 200, 64), torch.randn(2, 200, 64)
    whole = torch.compile(copy.deepcopy(model), backend="chipmunk",
                          options={**OPTIONS, "config": {**OPTIONS["config"], "offload_state": False}})
    with torch.no_grad():
        want = [whole(x + 0.05 * s * drift) for s in range(10)]
    total = chipmunk_compile.stats(whole)["state_bytes"]
    torch._dynamo.reset()
    fresh_dynamo.clear()
    on_device = []
    real_measured = offload_mod.StateOffload.measured

    def measured(self, st):
        real_measured(self, st)
        if not st.offloaded and st not in on_device:
            on_device.append(st)

    monkeypatch.setattr(offload_mod.StateOffload, "measured", measured)
    monkeypatch.setattr(offload_mod.StateOffload, "capacity", lambda self: total)
    monkeypatch.setattr(offload_mod.StateOffload, "free_bytes", lambda self: total - sum(st.nbytes for st in on_device))
    monkeypatch.setattr(graphs, "EMULATE", True)
    poison_after_each_call(monkeypatch)
    regional = copy.deepcopy(model)
    options = {**OPTIONS, "config": {**OPTIONS["config"], "offload_reserve": 0.5}}
    for block in regional.blocks:
        block.compile(backend="chipmunk", options=options)
    with torch.no_grad():
        for s in range(10):
            assert torch.equal(regional(x + 0.05 * s * drift), want[s]), s
    branches = [st for sess in sessions_of(regional) for site in sess.sites for st in site.states.values()]
    offloaded = [st for st in branches if st.offloaded]
    assert 0 < len(offloaded) < len(branches), (len(offloaded), len(branches))
    c = fresh_dynamo["chipmunk"]
    assert c["graph_replays"] > 0 and c["offload_hit"] > 0, dict(c)


def test_offloaded_state_follows_a_resolution_change(fresh_dynamo):
    """One graph with a symbolic token count: a new count gives the branch a state of its own.
    On the device the first count's state is kept, and coming back to it in the same generation
    finds its caches to be filled again; in host memory the other count's homes are freed at the
    switch. Bit-identical to device caches throughout."""
    model = flux()
    sizes = [(8, 8)] * 4 + [(8, 12)] * 4 + [(8, 8)] * 3

    def run(config):
        torch._dynamo.reset()
        compiled = chip(model, config, dynamic=True)
        outs = []
        with torch.no_grad():
            for step, (h, w) in enumerate(sizes):
                outs.append(compiled(**flux_inputs(1.0 - step / len(sizes), h=h, w=w))[0].clone())
        return outs

    kept = run({**CONFIG, "offload_state": False})
    evicted = ccount("state_shape_evicted")
    assert evicted == 0  # on the device both counts are kept (`state_shapes` 2)
    off = run({**CONFIG, "offload_state": True})
    assert all(torch.equal(a, b) for a, b in zip(off, kept))
    assert ccount("realloc") > 0 and ccount("offload_hit") > 0
    assert ccount("fallback:attn_cache_not_filled") > 0  # the first count's caches, back, are refilled
    # in host memory another count's homes are freed at once: one state per site and branch
    assert ccount("state_shape_evicted") > 0
    states = [key for ses in sessions_of(model) for s in ses.sites for key in s.states]
    assert states and len(states) == len({(id(s), key[0]) for ses in sessions_of(model) for s in ses.sites
                                          for key in s.states})


def test_a_home_dropped_during_a_capture_is_released_after_it(monkeypatch):
    """A registered home whose branch goes away while a CUDA graph is captured must not synchronize
    (that would break the capture): it stays registered and alive until the next chance."""
    from types import SimpleNamespace

    capturing, synced, unregistered = [True], [], []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: synced.append(1))
    monkeypatch.setattr(torch.cuda, "cudart", lambda: SimpleNamespace(cudaHostUnregister=unregistered.append))
    home = offload_mod._Home(64, cuda=False)
    home.registered, ptr = True, home.bytes.data_ptr()  # as if cudaHostRegister had succeeded
    del home
    assert not synced and not unregistered and len(offload_mod._RETIRED) == 1
    capturing[0] = False
    offload_mod.release_retired()
    assert synced == [1] and unregistered == [ptr] and not offload_mod._RETIRED

def test_offload_config_is_checked():
    from chipmunk_compile.config import ChipmunkConfig

    assert ChipmunkConfig().offload_state == "auto"
    assert ChipmunkConfig.from_any({"offload_state": True}).offload_state is True
    with pytest.raises(ValueError, match="offload_state"):
        ChipmunkConfig.from_any({"offload_state": "always"})
    with pytest.raises(ValueError, match="offload_reserve"):
        ChipmunkConfig.from_any({"offload_reserve": 1.5})


@pytest.mark.gpu
def test_gpu_offload_matches_device_state_with_triton_kernels(monkeypatch):
    """On the GPU (Triton kernels, bf16, copies on the side stream, pinned homes): the same outputs
    as device-resident caches, with each slot poisoned on the copy stream after its write-back."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                   attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64,
                                   pooled_projection_dim=32, axes_dims_rope=(16, 24, 24)).eval().cuda().to(torch.bfloat16)
    g = torch.Generator("cuda").manual_seed(1)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    h = w = 32
    ids = torch.zeros(h * w, 3, device="cuda")
    ids[:, 1] = torch.arange(h, device="cuda").repeat_interleave(w).float()
    ids[:, 2] = torch.arange(w, device="cuda").repeat(h).float()
    base = dict(hidden_states=torch.randn(1, h * w, 16, generator=g, **bf),
                encoder_hidden_states=torch.randn(1, 16, 64, generator=g, **bf),
                pooled_projections=torch.randn(1, 32, generator=g, **bf), img_ids=ids,
                txt_ids=torch.zeros(16, 3, device="cuda"), return_dict=False)
    config = {"attn": {"min_tokens": 0, "first_n_dense_layers": 1, "top_keys": 0.2, "full_step_every": 4},
              "mlp": {"min_tokens": 0, "first_n_dense_layers": 1, "top_keys": 0.3, "full_step_every": 4}}

    def run(cfg):
        torch._dynamo.reset()
        counters.clear()
        c = torch.compile(model, backend="chipmunk", options={"config": cfg})
        outs = []
        with torch.no_grad():
            for step in range(10):
                for branch in ("cond", "uncond"):
                    x = dict(base, timestep=torch.full((1,), 1.0 - step / 10, device="cuda"))
                    x["hidden_states"] = x["hidden_states"] + 0.02 * step + (0.1 if branch == "uncond" else 0.0)
                    with c.cache_context(branch, step_index=step):
                        outs.append(c(**x)[0].float())
        torch.cuda.synchronize()
        return outs, c

    kept, _ = run(config)
    real = offload_mod.StateOffload._unstage

    def unstage(self, st, slot, writes):
        real(self, st, slot, writes)
        with torch.cuda.stream(self.stream):  # after the write-back, before any refill of the slot
            for t in slot.tensors.values():
                t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))

    monkeypatch.setattr(offload_mod.StateOffload, "_unstage", unstage)
    off, c = run({**config, "offload_state": True})
    kinds = {k for s in chipmunk_compile.stats(c)["sites"] for k in s["steps"]}
    assert kinds == {"dense", "refresh", "sparse"}, kinds
    assert counters["chipmunk"]["offload_hit"] > counters["chipmunk"]["offload_miss"], dict(counters["chipmunk"])
    assert counters["chipmunk"]["offload_prefetch"] > 0
    homes = [h for sess in sessions_of(c) for s in sess.sites for st in s.states.values() for _, h in st.home.values()]
    assert homes and all(h.registered and h.bytes.is_pinned() for h in homes)
    for i, (a, b) in enumerate(zip(off, kept)):
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-3, (i, err)


def test_auto_frees_another_sizes_idle_caches_before_offloading(fresh_dynamo, monkeypatch):
    """`offload_state: auto` on a simulated device that holds one size's caches with the reserve
    free, not two: at a new size the earlier size's idle caches are freed first (as many as it is
    short of), and the new size's branches stay on the device (none offloaded); the outputs equal
    those of unlimited memory."""
    from test_numerics import Net, latents, sparse_cfg, ts

    def run(config):
        torch._dynamo.reset()
        torch.manual_seed(0)
        cm = chip(Net().eval(), config, dynamic=True)
        outs = []
        with torch.no_grad():
            for n in (64, 96, 64):
                outs += [cm(latents(i, n), ts(i)) for i in range(5)]
        return outs, cm

    free_run, cm = run(sparse_cfg())
    one_size = chipmunk_compile.stats(cm)["state_bytes"] - chipmunk_compile.stats(cm)["idle_state_bytes"]
    live = []

    def measured(self, st):
        if st not in live:
            live.append(st)
        real_measured(self, st)

    real_measured = offload_mod.StateOffload.measured
    capacity = 6 * one_size  # reserve 0.5: one size's caches (96 tokens: 1.8 x) leave it free, two do not
    monkeypatch.setattr(offload_mod.StateOffload, "measured", measured)
    monkeypatch.setattr(offload_mod.StateOffload, "capacity", lambda self: capacity)
    monkeypatch.setattr(offload_mod.StateOffload, "free_bytes", lambda self: capacity - sum(st.nbytes for st in live))
    fresh_dynamo.clear()
    tight_run, cm = run({**sparse_cfg(), "offload_reserve": 0.5})
    for a, b in zip(free_run, tight_run):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ccount("state_idle_dropped") > 0 and ccount("offload_auto_branch") == 0
    # what stays allocated leaves the reserve free, give or take the last branch placed
    assert chipmunk_compile.stats(cm)["state_bytes"] <= 0.5 * capacity + max(st.nbytes for st in live)
