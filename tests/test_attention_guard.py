"""The attention quality guard (`attn.min_mass`): measured once per layer at its first key
selection, reported by stats(), and acting (dense from then on, counted) only when enabled."""

import importlib

import pytest
import torch

import chipmunk_compile
from helpers import ccount, chip, cfg, fresh_dynamo  # noqa: F401
from test_numerics import Net, latents, ts

attention_op = importlib.import_module("chipmunk_compile.ops.attention")  # the module, not the op


def test_captured_mass_flat_vs_concentrated():
    B, H, G, Nk = 1, 2, 3, 200
    flat = torch.ones(B, H, G, Nk)
    assert abs(float(attention_op.captured_mass(flat, 20)) - 0.1) < 1e-6
    peaked = torch.full((B, H, G, Nk), 1e-3)
    peaked[..., :10] = 1.0
    assert float(attention_op.captured_mass(peaked, 20)) > 0.98
    keep = torch.zeros(Nk, dtype=torch.bool)
    keep[-50:] = True  # always-kept (text) keys count as held, and are not double counted
    assert abs(float(attention_op.captured_mass(flat, 20, keep)) - 70 / 200) < 1e-6
    # more rows than sampled: the mean over an even subset, still a 0-dim tensor
    many = torch.rand(4, 8, 40, Nk)
    m = attention_op.captured_mass(many, 30, rows=16)
    assert m.dim() == 0 and 0.15 < float(m) < 1.0


def _run(model, config, n=6):
    c = chip(model, config)
    with torch.no_grad():
        return [c(latents(i), ts(i)) for i in range(n)], c


def _attn_rows(c):
    return [r for r in chipmunk_compile.stats(c)["sites"] if r["kind"] == "attention"]


def test_guard_off_measures_nothing_tiny_threshold_measures_only(fresh_dynamo):
    model = Net().eval()
    base = {"top_keys": 0.1, "random_keys": 0.0, "full_step_every": 10, "group": 16}
    _, off = _run(model, cfg(base, {"enabled": False}))
    assert all("attn_mass" not in r for r in _attn_rows(off))
    torch._dynamo.reset()
    outs, c = _run(model, cfg({**base, "min_mass": 1e-6}, {"enabled": False}))
    rows = _attn_rows(c)
    assert rows and all(r["attn_mass"] and r["dense_by_guard"] == [] for r in rows)
    assert all(6 / 64 <= m <= 1.0 for r in rows for m in r["attn_mass"].values())  # >= the kept share (6 of 64)
    assert ccount("fallback:attn_diffuse") == 0 and all(r["steps"].get("sparse") for r in rows)


def test_guard_keeps_diffuse_layers_dense(fresh_dynamo):
    model = Net().eval()
    base = {"top_keys": 0.1, "random_keys": 0.0, "full_step_every": 10, "group": 16}
    sparse, _ = _run(model, cfg(base, {"enabled": False}))
    torch._dynamo.reset()
    g_outs, g = _run(model, cfg({**base, "min_mass": 1.0}, {"enabled": False}))
    rows = _attn_rows(g)
    # every layer holds < 100% of its mass in 10% of the keys: all stay dense after their first refresh
    assert rows and all(r["dense_by_guard"] == sorted(r["attn_mass"]) for r in rows)
    assert all("sparse" not in r["steps"] and r["steps"].get("refresh") for r in rows)
    assert ccount("fallback:attn_diffuse") > 0
    torch._dynamo.reset()
    dense, _ = _run(model, cfg({"enabled": False}, {"enabled": False}))
    for step in range(2, 6):  # after the refresh step, the guarded model is the dense model
        torch.testing.assert_close(g_outs[step], dense[step], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sparse[3], dense[3], rtol=1e-5, atol=1e-5)  # unguarded, it was sparse


def test_min_mass_is_validated():
    from chipmunk_compile.config import AttnConfig

    with pytest.raises(ValueError, match="min_mass"):
        AttnConfig(min_mass=1.5)
