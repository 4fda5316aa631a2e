"""benchmarks/bench_resolutions.py: the sizes it alternates, each variant's config, and a whole run
on the CPU with a tiny model."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_resolutions as br  # noqa: E402
from chipmunk_compile.config import ChipmunkConfig  # noqa: E402
from helpers import fresh_dynamo  # noqa: E402,F401


def test_sizes_parse_as_height_by_width_in_pixels():
    assert br.parse_sizes("768x1280, 1024X1024") == [(768, 1280), (1024, 1024)]


@pytest.mark.parametrize("text", ["768x1280", "768x1280,1000x1024", "768*1280,1024x1024", "x1024,1024x1024"])
def test_bad_sizes_are_refused_with_the_reason(text):
    with pytest.raises(SystemExit, match="--sizes"):
        br.parse_sizes(text)


def test_variant_configs():
    assert br.config_of(br.BASELINE, "default") is None
    assert ChipmunkConfig.from_any(br.config_of(br.CHIPMUNK, "default")).state_shapes == 2
    one = ChipmunkConfig.from_any(br.config_of(br.SHAPES1, "default"))
    assert one.state_shapes == 1 and one.attn == ChipmunkConfig.from_any("default").attn


def test_alternating_run_on_a_tiny_flux(fresh_dynamo, monkeypatch, tmp_path):
    """The whole script on the CPU: a tiny FluxTransformer2DModel, Dynamo's eager backend for the
    baseline and chipmunk's eager inner compiler, emulated step graphs and wall-clock timers. With
    two sizes kept nothing is recorded or run eagerly while timed; with one, every switch does."""
    import contextlib
    import json
    import time

    import torch
    from chipmunk_compile import graphs

    from diffusers import FluxTransformer2DModel

    def build(name, blocks):
        torch.manual_seed(0)
        return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                      pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()

    def inputs(name, model, size):
        h, w = size[0] // 16, size[1] // 16
        g = torch.Generator().manual_seed(0)
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(),
                                         indexing="ij"), -1).reshape(-1, 3)
        return dict(hidden_states=torch.randn(1, h * w, 16, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                    pooled_projections=torch.randn(1, 32, generator=g), img_ids=ids, txt_ids=torch.zeros(8, 3),
                    guidance=torch.full((1,), 3.5))

    real_compile = torch.compile

    def compile_on_cpu(model, backend="inductor", options=None):
        if backend == "chipmunk":
            return real_compile(model, backend="chipmunk", options={**options, "compiler": "eager"})
        return real_compile(model, backend="eager")

    def wall_ms(fn):
        t = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t)

    small = {"min_tokens": 0, "first_n_dense_layers": 0}
    config = {"preset": "default", "attn": small, "mlp": small}
    monkeypatch.setattr(graphs, "EMULATE", True)
    for name, value in dict(build=build, inputs=lambda n, m, size: inputs(n, m, size), time_step=wall_ms,
                            timestep_inputs=lambda n, kw, s, steps: dict(timestep=torch.full((1,), 1.0 - s / steps)),
                            sdpa_context=lambda v: contextlib.nullcontext(), free_gpu=torch._dynamo.reset,
                            gpu_name=lambda: "cpu", RESULTS=str(tmp_path / "rows.jsonl"),
                            config_of=lambda v, p: None if v == br.BASELINE else
                            (config if v == br.CHIPMUNK else {**config, "state_shapes": 1})).items():
        monkeypatch.setattr(br, name, value)
    monkeypatch.setattr(br.torch, "compile", compile_on_cpu)
    for fn in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, fn, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 0)
    monkeypatch.setattr(sys, "argv", ["bench_resolutions.py", "--sizes", "128x128,128x192", "--steps", "12",
                                      "--variants", ",".join(br.VARIANTS)])
    br.main()
    (row,) = [json.loads(line) for line in open(tmp_path / "rows.jsonl")]
    res = row["results"]
    assert set(res) == set(br.VARIANTS) and all(len(t) == 2 for v in res.values() for t in v["generation_ms"].values())
    kept, one = res[br.CHIPMUNK], res[br.SHAPES1]
    assert kept["timed_graph_work"] == 0 and kept["counters"]["state_shape_reused"] > 0
    # the first size's caches moved from the static first graph into the symbolic one, not copied
    assert kept["counters"]["state_followed_module"] > 0 and one["counters"]["state_followed_module"] > 0
    assert one["timed_graph_work"] > 0 and one["counters"]["state_shape_evicted"] > 0
    assert "speedup" in kept and "speedup" in one
