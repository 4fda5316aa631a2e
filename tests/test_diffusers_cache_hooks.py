"""diffusers' own cache hooks (`transformer.enable_cache(...)`) on a transformer compiled with
backend="chipmunk". FirstBlockCache decides per step, on the host, whether the blocks after the
first run; TaylorSeer replaces some attention calls by a forecast. Both graph-break inside the
model's loop over blocks, so Dynamo skips the model's forward: its time embedding, its blocks (or
the hooks' resumed frames around their attention) compile as frames of their own. Those frames
follow the time embedding's steps (Session.leader): each generation starts at step 0 and runs on
its own caches. Until session 50 every block counted its own calls as steps, no generation ended
(a seed run twice gave two results), the hooks' attention frames warned of no step signal, and the
rotary table's frame, whose ids never change, reported a fallback that no op took."""

import pytest
import torch

import chipmunk_compile
from chipmunk_compile.runtime import SITES
from helpers import cfg, chip, fresh_dynamo, max_rel  # noqa: F401

STEPS, H, W = 12, 16, 16


def _flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                  attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(8, 12, 12)).eval()


def _hook(kind):
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if kind == "first_block_cache":
        return FirstBlockCacheConfig(threshold=0.3)
    if kind == "magcache":
        return MagCacheConfig(threshold=0.1, num_inference_steps=STEPS, mag_ratios=[1.0] + [0.99] * (STEPS - 1))
    return TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=3, max_order=1)


def _img_ids():
    ids = torch.zeros(H, W, 3)
    ids[..., 1], ids[..., 2] = torch.arange(H)[:, None], torch.arange(W)[None]
    return ids.reshape(-1, 3)


def _generate(model, seed):
    """A FLUX-pipeline-like Euler loop: calls under cache_context("cond"), the hooks' state reset
    after each generation (as the pipelines' maybe_free_model_hooks does)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, H * W, 16, generator=g)
    txt, pooled = torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
    ts = torch.linspace(1, 0, STEPS + 1)
    for i in range(STEPS):
        with model.cache_context("cond"):
            v = model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled,
                      timestep=ts[i].expand(1), img_ids=_img_ids(), txt_ids=torch.zeros(8, 3),
                      guidance=torch.full((1,), 3.5), return_dict=False)[0]
        x = x + (ts[i + 1] - ts[i]) * v
    model._reset_stateful_cache()
    return x


@pytest.mark.parametrize("kind", ["first_block_cache", "taylorseer"])
def test_diffusers_cache_hooks_under_chipmunk_keep_generations_apart(fresh_dynamo, kind):
    hooked = _flux()
    hooked.enable_cache(_hook(kind))
    both = _flux()
    both.enable_cache(_hook(kind))
    sparse = {"top_keys": 0.3, "random_keys": 0.0}
    compiled = chip(both, cfg(attn={**sparse, "group": 64}, mlp={**sparse, "block": 64}, steps=STEPS),
                    fullgraph=False)
    with torch.no_grad():
        ref = [_generate(hooked, s) for s in (1, 2)]
        outs = [_generate(compiled, s) for s in (1, 2, 1, 2)]
        plain = _generate(_flux(), 2)
    assert max_rel(ref[1], plain) > 1e-4  # the hook skipped work
    assert fresh_dynamo["chipmunk"]["attention_sparse"] > 0 and fresh_dynamo["chipmunk"]["mlp_sparse"] > 0
    mine = {id(m) for m in compiled.modules()}  # (the wrapper holds the model)
    sessions = [s for s in {id(x.session): x.session for x in list(SITES.values())}.values()
                if id(s.owner() if s.owner is not None else s._root()) in mine]
    assert sessions and all((s.position().generation, s.position().step) == (3, STEPS - 1) for s in sessions)
    # nor warnings from frames whose steps nothing reads (the rotary table's, whose ids never change)
    assert fresh_dynamo["chipmunk"]["step_signal_none"] == 0
    assert fresh_dynamo["chipmunk"]["fallback:step_signal_constant"] == 0
    assert torch.equal(outs[3], outs[1])  # the same seed after the warm-up generation: the same result
    # every site is the model's, module-less hook frames' too: stats shows them, release frees them
    stats = chipmunk_compile.stats(both)
    ran = {site["kind"] for site in stats["sites"] if site["steps"].get("sparse")}
    assert ran == {"attention", "mlp"} and stats["state_bytes"] > 0, stats["sites"]
    chipmunk_compile.release(both)
    assert chipmunk_compile.stats(both)["state_bytes"] == 0
    assert max_rel(outs[3], ref[1]) < 0.05


def test_hooks_that_disable_compilation_leave_no_site_and_say_so(fresh_dynamo, caplog):
    """MagCache wraps its block hooks in torch.compiler.disable: the blocks run eagerly and no
    attention or MLP reaches chipmunk. The outputs are the hook's alone; that no site exists is
    counted and logged once (until session 50 nothing said so)."""
    import logging

    hooked, both = _flux(), _flux()
    for m in (hooked, both):
        m.enable_cache(_hook("magcache"))
    compiled = chip(both, cfg(), fullgraph=False)
    with caplog.at_level(logging.WARNING, logger="chipmunk_compile"), torch.no_grad():
        ref = _generate(hooked, 1)
        outs = [_generate(compiled, 1) for _ in range(3)]
    assert max_rel(ref, _generate(_flux(), 1)) > 1e-4  # the hook skipped work
    assert all(max_rel(o, ref) < 1e-6 for o in outs)
    assert not chipmunk_compile.stats(both)["sites"] and fresh_dynamo["chipmunk"]["generation_no_site"] == 1
    assert len([r for r in caplog.records if "no attention or MLP rewritten" in r.getMessage()]) == 1


@pytest.mark.parametrize("text_kv", [False, True])
def test_nucleus_moe_guidance_loop_tracks_steps_and_generations(fresh_dynamo, text_kv):
    """NucleusMoE-Image's own forward yields no graph either (its expert routing breaks inside the
    loop over blocks), with or without diffusers' TextKVCache, which is its own. Under a CFG loop
    that reads the timestep, the blocks follow the time embedding's session: two branches per step
    and a generation per loop. Until session 50 every call was a step of its own (counted as
    `step_signal_none`) and no generation ended."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from arch_zoo_newer import nucleus_moe_image

    case = nucleus_moe_image()
    model, kw = case.model.eval(), case.kwargs
    if text_kv:
        from diffusers.hooks import TextKVCacheConfig

        model.enable_cache(TextKVCacheConfig())
    sparse = {"top_keys": 0.3, "random_keys": 0.0}
    compiled = chip(model, cfg(attn=sparse, mlp=sparse, steps=6), fullgraph=False)
    ts = torch.linspace(1, 0, 7)

    def generate(seed):
        x = torch.randn(kw["hidden_states"].shape, generator=torch.Generator().manual_seed(seed))
        for i in range(6):
            vs = []
            for name, text in (("cond", kw["encoder_hidden_states"]), ("uncond", 0.5 * kw["encoder_hidden_states"])):
                with model.cache_context(name):
                    vs.append(compiled(**dict(kw, hidden_states=x, encoder_hidden_states=text,
                                              timestep=ts[i].expand(1)))[0][..., :x.shape[-1]])
            x = x + (ts[i + 1] - ts[i]) * (vs[1] + 2.0 * (vs[0] - vs[1]))
        model._reset_stateful_cache()
        return x

    with torch.no_grad():
        outs = [generate(s) for s in (1, 2, 1, 2)]
    assert fresh_dynamo["chipmunk"]["step_signal_none"] == 0 and fresh_dynamo["chipmunk"]["mlp_sparse"] > 0
    sessions = [s for s in chipmunk_compile.runtime.sessions_of(model) if s.sites]
    assert sessions and all((s.position().generation, s.position().step) == (3, 5) for s in sessions)
    assert {s.position().branch for s in sessions} == {"uncond"}
    assert torch.equal(outs[3], outs[1])


@pytest.mark.parametrize("kind", ["first_block_cache", "taylorseer"])
def test_blocks_under_cache_hooks_keep_the_layer_numbers_of_the_whole_model(fresh_dynamo, kind, monkeypatch):
    """Under these hooks each block class compiles a graph of its own that serves all of its blocks,
    and TaylorSeer's frames around the attentions belong to no module. Layers are still numbered in
    model order across classes, as whole-model compilation numbers them (FLUX: the double blocks,
    then the single ones), so `first_n_dense_layers` means the model's first blocks. Until session
    51 each class (and each hook graph) counted from 0, so that `first_n_dense_layers: 2` kept two
    blocks of each class dense, and the two feed-forwards of one double block counted as two layers."""
    from chipmunk_compile.ops.sites import Site
    from chipmunk_compile.runtime import stack_modules

    model = _flux()
    model.enable_cache(_hook(kind))
    names = {id(m): n for n, m in model.named_modules()}
    seen: dict = {}
    current_layer = Site.current_layer

    def recording(site):
        layer = current_layer(site)
        block = next(names[id(m)] for m in reversed(stack_modules()) if names.get(id(m), "").count(".") == 1)
        seen.setdefault((site.kind, block), set()).add(layer)
        return layer

    monkeypatch.setattr(Site, "current_layer", recording)
    sparse = {"top_keys": 0.3, "random_keys": 0.0}
    compiled = chip(model, cfg(attn={**sparse, "group": 64}, mlp={**sparse, "block": 64}, steps=STEPS),
                    fullgraph=False)
    with torch.no_grad():
        _generate(compiled, 1)
    whole = {f"transformer_blocks.{i}": i for i in range(2)} | {f"single_transformer_blocks.{i}": 2 + i for i in range(3)}
    assert {block for kind_, block in seen if kind_ == "attention"} == set(whole)
    # (TaylorSeer's break around a single block's attention splits its MLP: no site there)
    assert {block for kind_, block in seen if kind_ == "mlp"} >= {"transformer_blocks.0", "transformer_blocks.1"}
    assert all(layers == {whole[block]} for (_, block), layers in seen.items()), seen
    # every site is named: a frame of no module by its code (until session 52 its path was '')
    paths = [row["path"] for row in chipmunk_compile.stats(compiled)["sites"]]
    assert paths and all(paths), paths
    assert (kind == "taylorseer") == any(p.startswith("<") and ".py" in p for p in paths), paths


def test_inspect_names_the_rows_of_frames_of_no_module_by_their_code(fresh_dynamo):
    """inspect() names the sites and the rejected candidates of TaylorSeer's module-less attention
    frames by the frame's code, as the backend names its sites. Until session 53 inspect() named
    neither (its table showed '<top>') and the backend named only sites, not rejections."""
    model = _flux()
    model.enable_cache(_hook("taylorseer"))
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, H * W, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
              pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.ones(1),
              img_ids=_img_ids(), txt_ids=torch.zeros(8, 3), guidance=torch.full((1,), 3.5), return_dict=False)
    hook_frame = "<new_forward in taylorseer_cache.py, resumed at line"
    with model.cache_context("cond"):
        rejected = chipmunk_compile.inspect(model, **kw).rejected  # 264 tokens: below min_tokens
        sites = chipmunk_compile.inspect(model, config=cfg(attn={"top_keys": 0.3}), **kw).sites
    too_short = [r for r in rejected if r.kind == "attention"]
    assert too_short and all(r.path.startswith(hook_frame) for r in too_short), rejected
    attention = [s for s in sites if s.kind == "attention"]
    assert attention and all(s.path.startswith(hook_frame) for s in attention), sites
    assert all(r.path for r in rejected) and all(s.path for s in sites)
