"""ChipmunkConfig: presets, YAML, dicts, validation, per-layer overrides, backend options."""

import dataclasses

import pytest

from chipmunk_compile import ChipmunkConfig, list_presets
from chipmunk_compile.backend import split_options


def test_presets_listed_and_load():
    names = list_presets()
    assert {"default", "method", "flux", "flux-fast", "hunyuan-video", "mochi", "wan"} <= set(names)
    for name in names:
        c = ChipmunkConfig.from_any(name)
        assert c.name == name
        assert 0 < c.attn.top_keys <= 1


def test_preset_values():
    flux = ChipmunkConfig.from_any("flux")
    assert flux.attn.top_keys == pytest.approx(0.165)
    assert flux.attn.recompute_mask is False
    assert flux.mlp.enabled and flux.mlp.top_keys == pytest.approx(0.3)
    hv = ChipmunkConfig.from_any("hunyuan-video")
    assert hv.attn.full_step_schedule == [1, 10, 40]
    assert hv.mlp.enabled is False
    assert ChipmunkConfig.from_any("wan").attn.full_step_every == 10


def test_flux_fast_is_default_with_the_end_to_end_runs_keys():
    """`flux-fast` is the setting FLUX.1-dev ran at 1.675x in session 61 (`default` plus six keys given by
    --set; fidelity row cm-default-a.05-m.10-nt-me20-bmc4-mx1), so its fidelity rows and timings stay
    attached to it."""
    fast = ChipmunkConfig.from_any("flux-fast")
    run = ChipmunkConfig.from_any({"preset": "default", "attn": {"top_keys": 0.05, "keep_text_keys": False},
                                   "mlp": {"top_keys": 0.10, "full_step_every": 20, "block_mask_cache": 4,
                                           "extrapolate": 1.0}})
    assert dataclasses.replace(fast, name="x") == dataclasses.replace(run, name="x")
    assert dataclasses.replace(fast, name="x") != dataclasses.replace(ChipmunkConfig.from_any("default"), name="x")


def test_default_preset_is_the_dataclass_defaults():
    """No config, {} and "default" are one config (10% + 1% keys refreshed every 5 steps with the residual
    forecast, the first refresh's indices kept); `method` keeps the method's base values (5% + 1%, every 10,
    no forecast)."""
    dflt = ChipmunkConfig.from_any("default")
    assert dataclasses.replace(dflt, name="x") == dataclasses.replace(ChipmunkConfig.from_any(None), name="x")
    assert dataclasses.replace(dflt, name="x") == dataclasses.replace(ChipmunkConfig.from_any({}), name="x")
    assert (dflt.attn.top_keys, dflt.attn.random_keys, dflt.attn.full_step_every, dflt.attn.extrapolate) == \
        pytest.approx((0.10, 0.01, 5, 1.0))
    assert dflt.attn.recompute_mask is False  # indices of the first refresh kept (session 26)
    method = ChipmunkConfig.from_any("method")
    assert (method.attn.top_keys, method.attn.random_keys, method.attn.full_step_every, method.attn.extrapolate) == \
        pytest.approx((0.05, 0.01, 10, 0.0))
    assert method.mlp == dflt.mlp
    # the video presets keep the forecast off (its buffers: ~59 GB at Wan 720p with CFG); they and `method`
    # pick new indices at every refresh, as published
    for name in ("hunyuan-video", "wan", "mochi"):
        assert ChipmunkConfig.from_any(name).attn.extrapolate == 0.0
    for name in ("method", "hunyuan-video", "wan", "mochi"):
        assert ChipmunkConfig.from_any(name).attn.recompute_mask is True


def test_from_any_returns_a_copy():
    a = ChipmunkConfig.from_any("flux")
    a.attn.top_keys = 0.9
    assert ChipmunkConfig.from_any("flux").attn.top_keys == pytest.approx(0.165)
    c = ChipmunkConfig()
    d = ChipmunkConfig.from_any(c)
    assert d is not c and d.attn is not c.attn and d == c
    assert ChipmunkConfig.from_any(None) == ChipmunkConfig()


def test_dict_with_preset_base_and_nested_keys():
    c = ChipmunkConfig.from_any({"preset": "flux", "attn": {"top_keys": 0.2}, "step_signal": "calls"})
    assert c.attn.top_keys == pytest.approx(0.2)
    assert c.attn.random_keys == 0.0  # from the preset (the defaults add 1%)
    assert c.step_signal == "calls"
    assert c.mlp.top_keys == pytest.approx(0.3)


def test_yaml_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("preset: wan\nattn: {top_keys: 0.25, group: 64}\noverrides:\n  'blocks.0.*': {attn: {enabled: false}}\n")
    c = ChipmunkConfig.from_any(str(p))
    assert c.attn.top_keys == pytest.approx(0.25) and c.attn.group == 64
    assert c.mlp.enabled is False  # from wan
    assert c.for_site("blocks.0.attn1")[0].enabled is False
    assert c.for_site("blocks.1.attn1")[0].enabled is True


def test_yaml_must_be_mapping(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        ChipmunkConfig.from_any(str(p))


@pytest.mark.parametrize("bad", [
    {"attn": {"top_keys": 1.5}},
    {"attn": {"random_keys": -0.1}},
    {"attn": {"group": 0}},
    {"attn": {"full_step_every": 0}},
    {"attn": {"delta": "nope"}},
    {"attn": {"extrapolate": -0.5}},
    {"attn": {"extrapolate": 3.0}},
    {"mlp": {"block": 0}},
    {"mlp": {"top_keys": 2.0}},
    {"mlp": {"extrapolate": -1.0}},
    {"step_cache": {"threshold": -1.0}},
    {"step_cache": {"extrapolate": 5.0}},
    {"grouping": {"grid": [1, 2, 3, 4]}},
    {"step_signal": "sometimes"},
    {"attn": {"no_such_key": 1}},
    {"no_such_section": {}},
    {"overrides": {"blocks.*": {"step_cache": {"enabled": True}}}},
    {"overrides": {"blocks.*": {"attn": {"top_keys": 3.0}}}},
])
def test_validation(bad):
    with pytest.raises((ValueError, TypeError)):
        ChipmunkConfig.from_any(bad)


def test_unknown_preset_and_type():
    with pytest.raises(ValueError, match="unknown chipmunk preset"):
        ChipmunkConfig.from_any("no-such-preset")
    with pytest.raises(TypeError):
        ChipmunkConfig.from_any(3)


def test_full_step_schedule_sorted():
    c = ChipmunkConfig.from_any({"attn": {"full_step_schedule": [10, 1, 5]}})
    assert c.attn.full_step_schedule == [1, 5, 10]


def test_overrides_apply_in_order_later_wins():
    c = ChipmunkConfig.from_any({"overrides": {
        "blocks.*": {"attn": {"top_keys": 0.2}, "mlp": {"enabled": False}},
        "blocks.1.*": {"attn": {"top_keys": 0.4}},
    }})
    a0, m0 = c.for_site("blocks.0.attn")
    a1, m1 = c.for_site("blocks.1.attn")
    a2, _ = c.for_site("other.attn")
    assert a0.top_keys == pytest.approx(0.2) and m0.enabled is False
    assert a1.top_keys == pytest.approx(0.4) and m1.enabled is False
    assert a2.top_keys == c.attn.top_keys
    assert c.attn.top_keys == pytest.approx(ChipmunkConfig().attn.top_keys)  # the base is untouched


def test_round_trip_dict():
    c = ChipmunkConfig.from_any("hunyuan-video")
    d = c.to_dict()
    assert ChipmunkConfig.from_any(d) == c
    assert dataclasses.asdict(c.attn) == d["attn"]


def test_split_options():
    config, compiler, patches = split_options({"config": "flux", "compiler": "eager", "chipmunk.attn.top_keys": 0.3,
                                               "chipmunk.mlp.enabled": False, "max_autotune": True})
    assert compiler == "eager"
    assert config.attn.top_keys == pytest.approx(0.3) and config.mlp.enabled is False
    assert config.attn.random_keys == 0.0  # the flux preset below the dotted keys
    assert patches == {"max_autotune": True}
    config, compiler, patches = split_options(None)
    assert compiler == "inductor" and patches == {} and config == ChipmunkConfig()
    with pytest.raises(ValueError, match="compiler"):
        split_options({"compiler": "tvm"})


def test_cuda_graphs_budget_is_validated():
    from chipmunk_compile.config import ChipmunkConfig

    assert ChipmunkConfig.from_any({"cuda_graphs_max_gib": 0.5}).cuda_graphs_max_gib == 0.5
    assert ChipmunkConfig().cuda_graphs_max_gib == 4.0
    with pytest.raises(ValueError, match="cuda_graphs_max_gib"):
        ChipmunkConfig.from_any({"cuda_graphs_max_gib": -1})


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_state_shapes_is_validated(bad):
    assert ChipmunkConfig().state_shapes == 2 and ChipmunkConfig.from_any({"state_shapes": 1}).state_shapes == 1
    with pytest.raises(ValueError, match="state_shapes"):
        ChipmunkConfig.from_any({"state_shapes": bad})


@pytest.mark.parametrize("key", ["schedule_steps", "steps"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "28"])
def test_step_counts_are_validated(key, bad):
    assert ChipmunkConfig().schedule_steps == 50 and ChipmunkConfig().steps is None
    assert getattr(ChipmunkConfig.from_any({key: None}), key) is None
    assert getattr(ChipmunkConfig.from_any({key: 28}), key) == 28
    with pytest.raises(ValueError, match=key):
        ChipmunkConfig.from_any({key: bad})
