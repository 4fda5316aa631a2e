"""A guard that fails mid-generation (a float argument that changes: a ControlNet's conditioning
scale at `control_guidance_end`) makes Dynamo compile the frame again and run the new graph from
then on. The module's caches follow it there (ops/twin_states.py): no refill, and the generation
gives what a generation that runs the new graph throughout gives."""

import copy

import torch
from torch._dynamo.utils import counters

from helpers import _build, _rand, cfg, chip, flux_inputs, fresh_dynamo, max_rel  # noqa: F401


def _controlnet():
    from diffusers import FluxControlNetModel

    m = _build(FluxControlNetModel, patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
               pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
    with torch.no_grad():  # its output projections start at zero: give them weights
        for p in m.parameters():
            if not p.any():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    return m


def test_a_recompile_on_a_changed_float_keeps_the_caches(fresh_dynamo):
    model = _controlnet()
    config = cfg({"group": 64, "full_step_every": 4}, {"block": 64, "full_step_every": 4})
    compiled = chip(copy.deepcopy(model), config)
    cond = _rand(1, 256, 4, seed=5)
    gens = []
    with torch.no_grad():
        for _ in range(2):
            outs = []
            for i in range(10):
                x = flux_inputs(1.0 - i / 10, h=16, w=16)
                x["hidden_states"] = x["hidden_states"] + 0.02 * i
                scale = 1.0 if i < 5 else 0.5  # the recompile: at step 5 of the first generation
                out = torch.cat([t.flatten() for t in compiled(controlnet_cond=cond, conditioning_scale=scale, **x)[0]])
                ref = torch.cat([t.flatten() for t in model(controlnet_cond=cond, conditioning_scale=scale, **x)[0]])
                assert max_rel(out, ref) < 2e-2, i
                outs.append(out)
            gens.append(outs)
    c = counters["chipmunk"]
    assert c["graphs"] == 2 and c["state_followed_module"] > 0, dict(c)
    assert not [k for k in c if k.startswith("fallback:")], dict(c)  # no cache refilled mid-way
    # the first generation ran the first graph to step 4, then the new one; the second ran only the new one
    assert all(torch.equal(a, b) for a, b in zip(*gens))
    assert c["attention_sparse"] > 0 and c["mlp_sparse"] > 0  # real sparse steps after the recompile too
