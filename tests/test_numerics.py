"""Numerics of compiled models against eager: dense steps, full-key sparse steps, cache reuse,
real sparsity, batches, CFG branches, generations, resolution changes, key-padding masks, GQA,
and one end-to-end run through Inductor."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import chipmunk_compile
from chipmunk_compile.runtime import sessions_of

from helpers import FULL_KEYS, ccount, cfg, chip, fresh_dynamo, max_rel, step_counts  # noqa: F401

C, H = 32, 2


class Block(nn.Module):
    def __init__(self, gqa=False):
        super().__init__()
        self.hkv = 1 if gqa else H
        dk = C // H * self.hkv
        self.q, self.k, self.v = nn.Linear(C, C), nn.Linear(C, dk), nn.Linear(C, dk)
        self.o = nn.Linear(C, C)
        self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.n1, self.n2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.gqa = gqa

    def forward(self, x, mask=None):
        b, n, _ = x.shape
        y = self.n1(x)
        q = self.q(y).view(b, n, H, -1).transpose(1, 2)
        k = self.k(y).view(b, n, self.hkv, -1).transpose(1, 2)
        v = self.v(y).view(b, n, self.hkv, -1).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.gqa)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, C))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x)), approximate="tanh"))


class Net(nn.Module):
    def __init__(self, depth=3, gqa=False):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(gqa) for _ in range(depth)])
        self.t_proj = nn.Linear(1, C)

    def forward(self, x, t, mask=None):
        x = x + self.t_proj(t.view(-1, 1) / 1000.0)[:, None, :]
        for b in self.blocks:
            x = b(x, mask)
        return x


def latents(step, n=64, batch=1, seed=0, drift=0.02):
    g = torch.Generator().manual_seed(seed)
    base, direction = torch.randn(batch, n, C, generator=g), torch.randn(batch, n, C, generator=g)
    return base + drift * step * direction


def ts(step):
    return torch.tensor([1000.0 - 50.0 * step])


def run(model, compiled, steps, *, n=64, batch=1, seed=0, mask=None, drift=0.02, t_of=ts):
    outs, refs = [], []
    with torch.no_grad():
        for i in range(steps):
            x, t = latents(i, n, batch, seed, drift), t_of(i)
            args = (x, t) if mask is None else (x, t, mask)
            outs.append(compiled(*args))
            refs.append(model(*args))
    return outs, refs


# the published hold (no residual forecast, which the default turns on): the forecast's tests set it
SPARSE = dict(attn={"group": 16, "top_keys": 0.25, "random_keys": 0.0, "full_step_every": 4, "extrapolate": 0.0},
              mlp={"block": 16, "top_keys": 0.25, "random_keys": 0.0, "full_step_every": 4})


def sparse_cfg(**over):
    a = {**SPARSE["attn"], **over.get("attn", {})}
    m = {**SPARSE["mlp"], **over.get("mlp", {})}
    return cfg(attn=a, mlp=m)


# ---------------------------------------------------------------------------------------------
def test_dense_steps_match_eager(fresh_dynamo):
    m = Net().eval()
    outs, refs = run(m, chip(m, cfg(attn={"first_n_dense_layers": 99}, mlp={"first_n_dense_layers": 99})), 3)
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    assert step_counts(m) == {"attention_dense": 9, "mlp_dense": 9}
    torch._dynamo.reset()
    m = Net().eval()  # the default schedule: step 0 is dense for both ops
    outs, refs = run(m, chip(m, sparse_cfg()), 1)
    torch.testing.assert_close(outs[0], refs[0], rtol=1e-5, atol=1e-5)


def test_full_keys_sparse_steps_equal_dense(fresh_dynamo):
    m = Net().eval()
    conf = cfg(attn={"group": 16, **FULL_KEYS, "full_step_every": 5}, mlp={"block": 16, **FULL_KEYS, "full_step_every": 5})
    outs, refs = run(m, chip(m, conf), 9, drift=0.1)
    errs = [max_rel(o, r) for o, r in zip(outs, refs)]
    assert max(errs) < 1e-5, errs
    sc = step_counts(m)
    assert sc["attention_sparse"] == 3 * 6 and sc["attention_refresh"] == 3 * 2 and sc["attention_dense"] == 3
    assert sc["mlp_sparse"] == 3 * 7 and sc["mlp_dense"] == 3 * 2
    assert not any(k.startswith("fallback:") for k in fresh_dynamo["chipmunk"])


def test_unchanged_inputs_reproduce_cached_output(fresh_dynamo):
    m = Net().eval()
    m.t_proj.weight.data.zero_()  # the timestep no longer changes the activations
    cm = chip(m, sparse_cfg(attn={"top_keys": 0.1}, mlp={"top_keys": 0.1}))
    outs, refs = run(m, cm, 6, drift=0.0)
    sc = step_counts(m)
    assert sc["attention_sparse"] > 0 and sc["mlp_sparse"] > 0
    for o, r in zip(outs, refs):
        assert max_rel(o, r) < 1e-5


def test_real_sparsity_error_bounded(fresh_dynamo, capsys):
    m = Net().eval()
    cm = chip(m, sparse_cfg())
    outs, refs = run(m, cm, 8, drift=0.02)
    errs = [max_rel(o, r) for o, r in zip(outs, refs)]
    with capsys.disabled():
        print("\nreal-sparsity relative max error per step:", " ".join(f"{e:.2e}" for e in errs))
    assert errs[0] < 1e-5 and errs[4] < 1e-5  # dense MLP + refresh attention steps are exact
    assert max(errs) < 0.05, errs
    assert max(errs) > 1e-6, "sparse steps should not be exact with 25% keys"  # sparsity is real
    sc = step_counts(m)
    assert sc["attention_sparse"] == 3 * 5 and sc["mlp_sparse"] == 3 * 6


def test_output_score_sparse_steps_bounded(fresh_dynamo):
    """mlp.score = "output" ranks neurons by their effect on the output; same schedule, same bound."""
    m = Net().eval()
    cm = chip(m, sparse_cfg(mlp={"score": "output"}))
    outs, refs = run(m, cm, 8, drift=0.02)
    errs = [max_rel(o, r) for o, r in zip(outs, refs)]
    assert errs[0] < 1e-5 and errs[4] < 1e-5
    assert 1e-6 < max(errs) < 0.05, errs
    assert step_counts(m)["mlp_sparse"] == 3 * 6
    assert not any(k.startswith("fallback:") for k in fresh_dynamo["chipmunk"])


def test_batch_matches_per_sample(fresh_dynamo):
    """Selection is per (batch, head, group): a batch of 3 gives each sample's own sparse result."""
    m = Net().eval()
    conf = sparse_cfg()
    batched, _ = run(m, chip(m, conf), 6, batch=3, seed=1)
    singles = []
    for b in range(3):
        torch._dynamo.reset()
        mb = Net().eval()
        cb = chip(mb, conf)
        with torch.no_grad():
            singles.append([cb(latents(i, 64, 3, 1)[b:b + 1], ts(i)) for i in range(6)])
    for i in range(6):
        torch.testing.assert_close(batched[i], torch.cat([s[i] for s in singles]), rtol=1e-4, atol=1e-5)
    assert max_rel(batched[5], m(latents(5, 64, 3, 1), ts(5))) > 1e-6


def test_cfg_branches_have_separate_caches(fresh_dynamo):
    conf = sparse_cfg()
    m = Net().eval()
    cm = chip(m, conf)
    cond, uncond = [], []
    with torch.no_grad():
        for i in range(6):
            cond.append(cm(latents(i, seed=1), ts(i)))
            uncond.append(cm(latents(i, seed=2), ts(i)))  # equal timestep: the other branch
    st = chipmunk_compile.stats(m)
    assert st["step"] == 5 and st["branch"] == "1" and st["calls"] == 12
    for s in st["sites"]:
        assert sum(s["steps"].values()) == 12
    site = sessions_of(m)[0].sites[0]
    assert {key for key, _ in site.states} == {"0", "1"}
    # each branch equals a model that only ever saw that branch
    for seed, got in ((1, cond), (2, uncond)):
        torch._dynamo.reset()
        ms = Net().eval()
        cs = chip(ms, conf)
        with torch.no_grad():
            alone = [cs(latents(i, seed=seed), ts(i)) for i in range(6)]
        for a, b in zip(got, alone):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert max_rel(cond[5], uncond[5]) > 1e-3


@pytest.mark.parametrize("how", ["reset", "automatic"])
def test_second_generation_repeats_first(fresh_dynamo, how):
    m = Net().eval()
    cm = chip(m, sparse_cfg())
    first, _ = run(m, cm, 6)
    if how == "reset":
        chipmunk_compile.reset(m)
    second, _ = run(m, cm, 6)  # automatic: the timestep is back at its first value
    assert chipmunk_compile.stats(m)["generation"] == 1
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not any(k.startswith("fallback:") for k in fresh_dynamo["chipmunk"])


@pytest.mark.parametrize("dynamic", [False, None], ids=["static", "automatic-dynamic"])
def test_resolution_change(fresh_dynamo, dynamic):
    """New token counts recompile (static: one graph per resolution; automatic dynamic: a second,
    symbolic graph serves every later resolution, keeping `state_shapes` (2) sizes of caches per
    site: the third frees the least recently used), numerics stay right, and the timestep
    returning to its first value starts each new generation. The first size, back in the symbolic
    graph, takes the static graph's caches instead of holding a second copy (twin_states.py)."""
    m = Net().eval()
    cm = chip(m, sparse_cfg(), dynamic=dynamic)
    for n in (64, 96, 128, 64):
        outs, refs = run(m, cm, 5, n=n)
        assert [o.shape[1] for o in outs] == [n] * 5
        errs = [max_rel(o, r) for o, r in zip(outs, refs)]
        assert errs[0] < 1e-5 and max(errs) < 0.05, (n, errs)
    c = fresh_dynamo["chipmunk"]
    n_sites = 6  # 3 attention + 3 MLP per graph
    if dynamic is False:
        assert c["graphs"] == 3 and c["realloc"] == 0
    else:
        # the symbolic graph (checked first by Dynamo) serves 96, 128 and 64 again: 2 new sizes
        # after its first, the last one freeing 96's caches and taking 64's from the static graph
        assert c["graphs"] == 2 and c["realloc"] == 2 * n_sites and c["state_shape_evicted"] == n_sites
        assert c["state_followed_module"] == n_sites and c["state_shape_reused"] == n_sites
        sites = sessions_of(m)[0].sites
        assert [len(site.states) for site in sites] == [0] * n_sites + [2] * n_sites  # no copy left behind
    assert chipmunk_compile.stats(m)["generation"] == 3
    assert not any(k.startswith("fallback:") for k in c)


def _mask(batch, n):
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[0, n - 20:] = False
    if batch > 1:
        mask[1, :7] = False
    return mask


def test_key_padding_mask_exact(fresh_dynamo):
    m = Net().eval()
    cm = chip(m, sparse_cfg(attn={"random_keys": 0.1}))
    mask = _mask(2, 64)
    m4 = mask.view(2, 1, 1, 64)
    outs, refs = run(m, cm, 6, batch=2, mask=m4)
    assert max(max_rel(o, r) for o, r in zip(outs, refs)) < 0.05
    # the selected key columns of every attention site never contain a masked key
    sess = sessions_of(m)[0]
    n_checked = 0
    for site in sess.sites:
        if site.kind != "attention":
            continue
        pre = f"s{site.id}__0__"
        idx, cnt = getattr(sess.state, pre + "indices"), getattr(sess.state, pre + "counts")
        for b in range(2):
            valid = torch.arange(idx.shape[-1])[None, None, :] < cnt[b][..., None]
            chosen = idx[b].long()[valid]
            assert mask[b][chosen].all()
            n_checked += chosen.numel()
    assert n_checked > 0
    # masked keys are never attended: garbage k/v at masked positions changes no output, any step
    from test_patterns import SdpaKeyPadding

    outs = {}
    for garbage in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)  # the same random key picks in both runs
        mod = SdpaKeyPadding().eval()
        c = chip(mod, sparse_cfg(attn={"random_keys": 0.1}))
        outs[garbage] = []
        with torch.no_grad():
            for i in range(6):
                g = torch.Generator().manual_seed(i)
                q, k, v = (torch.randn(2, H, 64, 16, generator=g) for _ in range(3))
                if garbage:
                    k[~mask[:, None, :, None].expand_as(k)] = 1e3
                    v[~mask[:, None, :, None].expand_as(v)] = -1e3
                outs[garbage].append(c(q, k, v, m4, ts(i)))
        assert step_counts(mod)["attention_sparse"] > 0
    for a, b in zip(outs[False], outs[True]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gqa_sparse_equals_repeated_heads(fresh_dynamo):
    """GQA (enable_gqa, Hkv=1) gives exactly what the same model with k/v repeated per head gives."""
    m = Net(gqa=True).eval()
    outs, refs = run(m, chip(m, sparse_cfg()), 6)
    rep = chipmunk_compile.inspect(m, latents(0), ts(0), config=sparse_cfg())
    assert rep.count("attention") == 3 and rep.sites[0].shapes["k"] == (1, 1, 64, 16)

    class Repeated(Net):
        def forward(self, x, t, mask=None):
            x = x + self.t_proj(t.view(-1, 1) / 1000.0)[:, None, :]
            for blk in self.blocks:
                b, n, _ = x.shape
                y = blk.n1(x)
                q = blk.q(y).view(b, n, H, -1).transpose(1, 2)
                k = blk.k(y).view(b, n, 1, -1).transpose(1, 2).repeat_interleave(H, 1)
                v = blk.v(y).view(b, n, 1, -1).transpose(1, 2).repeat_interleave(H, 1)
                a = F.scaled_dot_product_attention(q, k, v)
                x = x + blk.o(a.transpose(1, 2).reshape(b, n, C))
                x = x + blk.fc2(F.gelu(blk.fc1(blk.n2(x)), approximate="tanh"))
            return x

    torch._dynamo.reset()
    r = Repeated(gqa=True).eval()
    r.load_state_dict(m.state_dict())
    outs_r, _ = run(r, chip(r, sparse_cfg()), 6)
    for a, b in zip(outs, outs_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert max_rel(outs[5], refs[5]) > 1e-6


@pytest.mark.slow
def test_inductor_end_to_end(fresh_dynamo):
    """The default inner compiler: dense step exact, full-key sparse steps equal dense."""
    m = Net(depth=2).eval()
    conf = cfg(attn={"group": 16, **FULL_KEYS, "full_step_every": 4}, mlp={"block": 16, **FULL_KEYS, "full_step_every": 4})
    cm = chip(m, conf, compiler="inductor")
    outs, refs = run(m, cm, 5, drift=0.1)
    errs = [max_rel(o, r) for o, r in zip(outs, refs)]
    assert max(errs) < 1e-4, errs
    sc = step_counts(m)
    assert sc["attention_sparse"] == 2 * 2 and sc["mlp_sparse"] == 2 * 3
    assert fresh_dynamo["chipmunk"]["graphs"] == 1


def test_kept_indices_refresh_rebuilds_cache(fresh_dynamo):
    """recompute_mask: false (the FLUX preset): later refreshes keep the first refresh's indices,
    return the exact output (through SDPA) and rebuild the cache against it."""
    m = Net().eval()
    cm = chip(m, sparse_cfg(attn={"recompute_mask": False}))
    site = None
    kept = []
    outs, refs = [], []
    with torch.no_grad():
        for i in range(10):
            x, t = latents(i), ts(i)
            outs.append(cm(x, t))
            refs.append(m(x, t))
            site = site or next(s for s in sessions_of(m)[0].sites if s.kind == "attention")
            if i in (1, 4, 8):
                kept.append(site.state_of("0").cache["indices"].clone())
    errs = [max_rel(o, r) for o, r in zip(outs, refs)]
    assert errs[4] < 1e-5 and errs[8] < 1e-5, errs  # refresh attention + dense MLP: exact
    assert 1e-6 < max(errs) < 0.05, errs
    assert torch.equal(kept[0], kept[1]) and torch.equal(kept[0], kept[2])
    assert step_counts(m)["attention_refresh"] == 3 * 3


def _forecast_run(kind, config, steps=12, drift=0.05, snap_at=()):
    """Per-step max relative error against eager, the first `kind` site's branch state after the
    steps in `snap_at` (copies of its caches) and at the end, and the eager model."""
    torch._dynamo.reset()
    m = Net().eval()
    cm = chip(m, config)
    errs, snaps, st = [], {}, None
    with torch.no_grad():
        for i in range(steps):
            x, t = latents(i, drift=drift), ts(i)
            errs.append(max_rel(cm(x, t), m(x, t)))
            st = next(s for s in sessions_of(m)[0].sites if s.kind == kind and s.states).state_of("0")
            if i in snap_at:
                snaps[i] = {k: v.clone() for k, v in st.cache.items()}
    return errs, snaps, st, m


def _attention_errors(extrapolate, recompute, delta="self_normalized"):
    """_forecast_run of sparse attention alone, snapshots after steps 1 and 4 (the first two refreshes)."""
    config = sparse_cfg(attn={"top_keys": 0.25, "recompute_mask": recompute, "extrapolate": extrapolate,
                              "delta": delta}, mlp={"enabled": False})
    return _forecast_run("attention", config, snap_at=(1, 4))[:3]


@pytest.mark.parametrize("recompute,delta", [(False, "self_normalized"), (True, "self_normalized"),
                                             (True, "exact_normalizer")])
def test_residual_forecast(fresh_dynamo, recompute, delta):
    """attn.extrapolate: the second refresh measures the cached residual's slope per step (with kept
    indices exactly (cache_4 - cache_1) / 3), sparse steps forecast the residual with it, and on
    smoothly drifting inputs that cuts the sparse-step error against holding the cache."""
    hold, _, _ = _attention_errors(0.0, recompute, delta=delta)
    fore, snaps, st = _attention_errors(1.0, recompute, delta=delta)
    assert "r_slope" not in snaps[1] or st.slope_generation == 0
    slope, cache1, cache4 = st.cache["r_slope"], snaps[1]["o_cache"], snaps[4]["o_cache"]
    if not recompute:
        torch.testing.assert_close(snaps[4]["r_slope"], (cache4 - cache1) / 3, rtol=1e-5, atol=1e-6)
    else:  # the slope comes from the previous indices' residual, not from the new cache
        assert not torch.allclose(snaps[4]["r_slope"], (cache4 - cache1) / 3, rtol=1e-3, atol=1e-5)
        assert st.site.extra_sparse_passes == 2  # that residual, at refreshes 4 and 8 (FLOP accounting)
    assert st.cache["t_ref_span"].tolist() == [8.0, 4.0] and slope.abs().max() > 0
    for i in (0, 1, 4, 8):  # dense and refresh steps are exact either way
        assert fore[i] < 1e-5 and hold[i] < 1e-5
    assert all(abs(a - b) < 1e-7 for a, b in zip(fore[:4], hold[:4]))  # no slope before the 2nd refresh
    sparse = [i for i in range(5, 12) if i != 8]
    gain = sum(hold[i] for i in sparse) / sum(fore[i] for i in sparse)
    print(f"\nforecast gain {gain:.2f}")
    assert gain > 1.5, (gain, hold, fore)


def test_residual_forecast_horizon(fresh_dynamo, monkeypatch):
    """The forecast coefficient is e·min(t − t_ref, span), read on the device: with refreshes at 1, 3
    and 9 it runs 1, 2 and is then held at the measured 2-step span up to step 8; after the refresh at
    9 (span 6) it runs 1, 2 again. Each forecast call is counted."""
    import sys

    attention_op = sys.modules["chipmunk_compile.ops.attention"]  # the package exports the op itself
    coefs = []
    real = attention_op.kernel

    def spy(name, *tensors, **kw):
        impl = real(name, *tensors, **kw)

        def run(*args, **kwargs):
            if kwargs.get("slope_coef") is not None:
                coefs.append((float(kwargs["slope_coef"]), kwargs["o_slope"].shape))
            return impl(*args, **kwargs)
        return run

    monkeypatch.setattr(attention_op, "kernel", spy)
    m = Net(depth=1).eval()
    cm = chip(m, sparse_cfg(attn={"full_step_schedule": [1, 3, 9], "extrapolate": 0.5}, mlp={"enabled": False}))
    with torch.no_grad():
        for i in range(12):
            cm(latents(i), ts(i))
    assert [c for c, _ in coefs] == [0.5, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0]  # steps 4-8, 10-11
    assert ccount("attention_forecast") == 7


def _mlp_errors(extrapolate):
    errs, _, st, m = _forecast_run("mlp", sparse_cfg(attn={"enabled": False},
                                                     mlp={"top_keys": 0.25, "extrapolate": extrapolate}))
    return errs, st, m


def test_mlp_error_forecast(fresh_dynamo):
    """mlp.extrapolate: a dense step after the first (4, 8) also runs the sparse path and stores the
    per-step rate of the error it would have made; later sparse steps add rate·min(t − t_dense, span).
    Dense outputs stay exact, nothing is forecast before the rate exists (steps 1-4), and on smoothly
    drifting inputs the sparse steps after it err less than holding the stale neurons."""
    hold, _, _ = _mlp_errors(0.0)
    fore, st, m = _mlp_errors(1.0)
    assert st.cache["t_dense_span"].tolist() == [8.0, 4.0] and st.cache["y_rate"].abs().max() > 0
    for i in (0, 4, 8):
        assert fore[i] < 1e-5 and hold[i] < 1e-5
    assert all(abs(a - b) < 1e-7 for a, b in zip(fore[:5], hold[:5]))
    assert ccount("mlp_forecast") == 3 * 6  # 3 blocks x steps 5-7, 9-11
    # FLOP accounting: each MLP site ran the sparse path at dense steps 4 and 8 on top of its steps
    mlp_sites = [s for s in sessions_of(m)[0].sites if s.kind == "mlp"]
    assert len(mlp_sites) == 3 and all(s.extra_sparse_passes == 2 for s in mlp_sites)
    sparse = [5, 6, 7, 9, 10, 11]
    gain = sum(hold[i] for i in sparse) / sum(fore[i] for i in sparse)
    print(f"\nmlp forecast gain {gain:.2f}")
    assert gain > 1.5, (gain, hold, fore)


@pytest.mark.parametrize("emulate", [False, True], ids=["eager", "step-graphs"])
def test_a_size_that_returns_within_a_generation_starts_over(fresh_dynamo, monkeypatch, emulate):
    """Batch 2 -> 3 -> 2 inside one generation (one graph with a symbolic batch): the size that
    comes back keeps its caches' memory (`state_shapes`), but what they hold is from before the
    switch, so its first sparse step refills them (a refresh; a dense MLP step), as when its caches
    were freed and made again (`state_shapes: 1`): the outputs of the two are identical, over two
    generations (also through emulated step graphs, whose replays run no op code)."""
    from chipmunk_compile import graphs

    monkeypatch.setattr(graphs, "EMULATE", emulate)
    batches = [2] * 4 + [3] * 3 + [2] * 5

    def outputs(shapes):
        torch._dynamo.reset()
        m = Net().eval()
        cm = chip(m, {**sparse_cfg(), "state_shapes": shapes})
        outs = []
        with torch.no_grad():
            for _ in range(2):
                for i, b in enumerate(batches):
                    outs.append(cm(latents(i, 64, b, seed=3), ts(i)))
        return outs, dict(fresh_dynamo["chipmunk"])

    kept, c2 = outputs(2)
    fresh_dynamo.clear()
    freed, c1 = outputs(1)
    for a, b in zip(kept, freed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert c2["fallback:attn_cache_not_filled"] == c1["fallback:attn_cache_not_filled"] > 0
    assert c2["realloc"] < c1["realloc"] and c2["state_shape_reused"] > 0
