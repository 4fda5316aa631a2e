"""benchmarks/arch_zoo.py on a few of its architectures: each runs through inspect and the
compiled backend, dense steps are exact, sparse steps really ran and stay close. The forms that
were missed before: Flux2's SwiGLU (halves sliced out of one linear; in its single blocks, out of
the linear that also projects q/k/v), Allegro's per-frame conv grid, CogView4's patchified latent,
Qwen-Image's rotary table and LTX-Video's coordinates merged into the token axis, Z-Image's
grid seen in a graph before a graph break, HunyuanVideo 1.5's attention mask (the outer
product of a padding vector) with its conv grid from the graph before its data-dependent break,
ERNIE-Image's sequence-first feed-forwards, PRX's image queries over text + image keys, and
the KV-cached steps of Qwen-Image 2.1 (image queries over cached prefix keys + their own) and its
prefill (image queries, the tail of the joint sequence, over all of its keys), and
FLUX.2 Klein (cached reference keys between the own text and image keys), Krea 2's grid in
the image rows of its joint text + image position ids, and DiTs written outside diffusers
(nn.MultiheadAttention, nn.TransformerEncoder, einsum attention, checkpointed blocks, and since session 44
non-fused timm attention, complex rotary, LLaMA SwiGLU, learned biases, baddbmm scores, U-ViT skips); Wan-Animate-2, whose own forward makes no
graph while one of its methods resumes in one (its session never advances: the blocks must not
follow it)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import arch_zoo  # noqa: E402
from helpers import fresh_dynamo  # noqa: E402,F401


@pytest.mark.parametrize("name,mlp_sites,grouping", [
    ("flux2", 3, "position ids input img_ids h×w 12×12"),
    ("allegro", 3, "conv2d patch embed (per frame) t×h×w"),
    ("cogview4", 4, "patchified input hidden_states h×w"),
    ("qwen_image", 4, "merged axes freqs h×w 10×10, tile 8×8, text 8 first"),
    ("ltx_video", 3, "merged axes flatten t×h×w 3×8×8"),
    ("z_image", 4, "patchified input x h×w (earlier graph) 8×8, tile 8×8, text 32"),
    ("hunyuan_video15", 5, "conv3d patch embed t×h×w (earlier graph) 3×8×8, tile 3×6×8"),
    # four conv patch embeddings (three history lengths + the chunk) joined: one image stream of 4 runs
    ("helios", 3, "conv patch embeds hidden_states_4 in 4 runs 2×2 + 3×3 + 6×6 + 3"),
    # the same for FramePack (4×/2× history, clean frames, current latent), whose blocks run in a
    # graph after a break: its first graph's 4-token image-projection MLP fits the 2×2 history grid
    ("hunyuan_video_framepack", 5, "conv patch embeds hidden_states_4 in 4 runs (earlier graph)"),
    # sequence-first (S, B, C) feed-forwards, grouped with the attention's 16×16 grid
    ("ernie_image", 2, "conv2d patch embed h×w 16×16, tile 8×8, text 8 last"),
    # image queries over cat(text keys, image keys): attention sites (row asserts attn >= 1)
    ("prx", 2, "merged axes img_2 h×w 12×12, tile 8×8"),
    # KV-cached steps: image queries over cat(cached text keys (a graph input), own keys); the grid
    # from the rotary index vectors its embedder computes in a graph of its own
    ("qwen_image21_cached", 3, "rotary index cat after 8 other rows h×w (earlier graph) 12×12"),
    # its prefill (every step without the KV cache): image queries cut as the tail of the joint
    # [text, image] sequence, over all of its keys
    ("qwen_image21", 3, "rotary index cat after 8 other rows h×w (earlier graph) 12×12"),
    # KV-cached steps: [text, image] queries over cat(own text keys, cached reference keys, own image keys)
    ("flux2_kv_cached", 3, "position ids input img_ids h×w 12×12, tile 8×8, text 8 first"),
    # one joint id table: 8 text rows at the origin, then the image grid
    ("krea2", 5, "position ids input position_ids after 8 other rows h×w 12×12"),
    # DiTs written outside diffusers (arch_zoo_research.py): nn.MultiheadAttention and
    # nn.TransformerEncoder (opaque calls in Dynamo's graph) and einsum attention with the row max
    # subtracted were not seen as attention (nor the encoder layer's feed-forward as an MLP)
    ("research_timm", 2, "conv2d patch embed h×w 12×12, tile 8×8"),
    ("research_mha", 2, "conv2d patch embed h×w 12×12, tile 8×8"),
    ("research_encoder", 2, "conv2d patch embed h×w 12×12, tile 8×8"),
    ("research_einsum", 2, "conv2d patch embed h×w 12×12, tile 8×8"),
    # blocks under activation checkpointing: higher-order ops whose bodies the patterns never saw
    ("research_checkpoint", 2, "conv2d patch embed h×w 12×12, tile 8×8"),
])
def test_zoo_rows(fresh_dynamo, name, mlp_sites, grouping):
    row = arch_zoo.measure(name)
    assert row["status"] == "ok", row["note"]
    assert row["mlp"] == mlp_sites and row["attn"] >= 1
    assert not name.startswith("research_") or row["attn"] == 2  # one attention site per block
    assert grouping in row["grouping"]
    assert float(row["dense_err"]) < 1e-5
    # sparse steps ran and beat reusing the previous output (Z-Image's output moves 0.38 per call)
    assert 0 < float(row["sparse_err"]) < min(0.25, float(row["out_change"]))
    assert row["sparse_steps"] > 0 and not row["fallbacks"]


# more research spellings (arch_zoo_spellings.py, session 44): (name, attention sites, MLP sites)
@pytest.mark.parametrize("name,attn_sites,mlp_sites", [
    ("research_timm_nonfused", 2, 2),  # (q @ kᵀ) * scale, .softmax, attn_drop, q/k LayerNorm
    ("research_rope_sdpa", 2, 2),  # complex axial rotary, SDPA(scale=)
    ("research_swiglu", 2, 2),  # w3(silu(w1 x) * w2 x)
    ("research_rel_bias", 2, 2),  # learned (H, N, N) bias: a biased site
    ("research_baddbmm", 2, 2),  # baddbmm(empty, q, kᵀ, beta=0, alpha=scale) + bmm
    ("research_uvit", 4, 4),  # long skips: block outputs kept across blocks
    ("research_uvit_token", 4, 4),  # + the timestep as a token before the image: kept whole, first
    ("research_conv_mlp", 2, 0),  # 1x1 Conv1d feed-forward: no MLP site, left as it was
])
def test_zoo_research_spellings(fresh_dynamo, name, attn_sites, mlp_sites):
    row = arch_zoo.measure(name)
    assert row["status"] == "ok", row["note"]
    assert (row["attn"], row["mlp"]) == (attn_sites, mlp_sites)
    assert "conv2d patch embed h×w 12×12, tile 8×8" in row["grouping"]
    assert float(row["dense_err"]) < 1e-5
    assert 0 < float(row["sparse_err"]) < min(0.25, float(row["out_change"]))
    assert row["sparse_steps"] > 0 and not row["fallbacks"]


def test_zoo_runtime_mmdit(fresh_dynamo):
    """An MMDiT written as UI runtimes write their own model code (arch_zoo_runtimes.py): the latent
    patchified and the position ids built inside the forward, rotary as 2×2 matrices, text and
    image q/k/v joined per head: every block's attention and MLP is a site, the image sites grouped
    on the patchified grid with the text first."""
    row = arch_zoo.measure("runtime_mmdit")
    assert row["status"] == "ok", row["note"]
    assert (row["attn"], row["mlp"]) == (4, 6)
    assert "patchified input x h×w 12×12, tile 8×8, text 8 first" in row["grouping"]
    assert row["grouped"] == "8/10"  # the two text-stream MLPs: 8 tokens, no grid
    assert float(row["dense_err"]) < 1e-5
    assert 0 < float(row["sparse_err"]) < min(0.25, float(row["out_change"]))
    assert row["sparse_steps"] > 0 and not row["fallbacks"]


def test_wan_animate2_runs_sparse_steps(fresh_dynamo):
    """Its forward runs eagerly (a `.item()` in a generator expression) and the root's only graph is
    a resumed frame of `unpatchify`: a session that never begins a call. Following it pinned every
    block at step 0, all dense, with nothing counted; the MLP sites now run sparse steps."""
    row = arch_zoo.measure("wan_animate2")
    assert row["status"] == "ok", row["note"]
    assert row["mlp"] == 2 and float(row["dense_err"]) < 1e-5
    assert row["sparse_steps"] > 0 and not row["fallbacks"]
    assert 1e-5 < float(row["sparse_err"]) < min(0.25, float(row["out_change"]))


@pytest.mark.parametrize("name,attn_grouped,source", [
    ("hunyuan_video15", 1, "conv3d patch embed t×h×w (earlier graph) 3×8×8"),
    ("lumina2", 3, "patchified input hidden_states h×w (earlier graph) 8×8"),
    # the rotary table of its embedder's frame; the model's own forward makes no graph (no session
    # to share), so the grid is kept for the outermost module on the stack
    ("nucleus_moe_image", 2, "rotary table freqs h×w (earlier graph) 12×12"),
])
def test_compiled_frames_share_the_models_grid(fresh_dynamo, name, attn_grouped, source):
    """Compiled (not inspected), a model split into frames keeps one grid: HunyuanVideo 1.5's blocks
    run as frames of their own after its data-dependent graph break (each block with its own
    session), and Lumina2's patchified grid shows in the frame of its rotary embedder, a submodule
    with a session of its own. The grid reaches the sites of the other frames."""
    import torch

    import chipmunk_compile

    case = arch_zoo.MODELS[name][1]()
    c = torch.compile(case.model, backend="chipmunk", options={"config": arch_zoo.CFG, "compiler": "eager"})
    with torch.no_grad():
        c(**case.kwargs)
    attn = [s for s in chipmunk_compile.stats(c)["sites"] if s["kind"] == "attention"]
    grouped = [s["grouping"] for s in attn if not s["grouping"].startswith("none")]
    assert len(grouped) == attn_grouped and all(g.startswith(source) for g in grouped), attn


def test_resolution_change_groups_the_recompiled_graph(fresh_dynamo):
    """A second resolution recompiles with symbolic token counts: its sites take the grid of that
    graph's own position ids (not the first resolution's) and the text side the same modules had
    in the first graph; a third resolution reuses that graph and is grouped on the grid of its own
    call's position ids (read once, on that count's first call). A count that no grid explains
    runs ungrouped, counted."""
    import torch
    from torch._dynamo.utils import counters

    import chipmunk_compile
    from chipmunk_compile.grouping import GridInfo, image_order
    from zoo_common import _r

    case = arch_zoo.MODELS["flux2"][1]()
    c = torch.compile(case.model, backend="chipmunk", options={"config": arch_zoo.CFG, "compiler": "eager"})
    kw = dict(case.kwargs)

    def at(h, w):
        kw.update(hidden_states=_r(1, h * w, 4),
                  img_ids=torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))[None])
        with torch.no_grad():
            return c(**kw)[0], case.model(**kw)[0]

    at(12, 12)
    at(8, 10)
    counters["chipmunk"].clear()
    out, ref = at(6, 6)
    assert torch.isfinite(out).all() and out.shape == ref.shape
    assert counters["chipmunk"]["grouping_ungrouped_count"] == 0
    session = chipmunk_compile.runtime.sessions_of(c)[0]
    per_call = [s for s in session.sites if s.kind == "attention" and s.call_grouping is not None]
    assert per_call and all("8×10" in s.grouping and "from its call's ids" in s.grouping for s in per_call)
    for s in per_call:
        cg = s.call_grouping
        for h, w in ((8, 10), (6, 6)):  # each count on its own grid, text (8 tokens) first
            perm, keep = cg.for_count(8 + h * w, session)
            order, _ = image_order(GridInfo((h, w), ""), cg.tile, cg.group)
            assert torch.equal(perm[:h * w].long(), order + 8) and torch.equal(perm[h * w:].long(), torch.arange(8))
            assert keep[:8].all() and not keep[8:].any()
        # more other tokens than any grid here explains (6×6 ids of the last call, 8×10 compiled)
        assert cg.for_count(8 + 168, session) == (None, None)
    assert counters["chipmunk"]["grouping_ungrouped_count"] > 0  # counted (and logged), not silent


@pytest.mark.parametrize("key,sizes", [("sd3", ((24, 24), (16, 24), (24, 16), (12, 12))),
                                       ("wan", ((3, 16, 16), (3, 12, 16), (3, 16, 12), (2, 8, 8))),
                                       ("auraflow", ((16, 16), (12, 16), (16, 12), (12, 12)))])
def test_resolution_change_groups_conv_embedded_counts(fresh_dynamo, key, sizes):
    """A conv patch embedding (SD3's conv2d, Wan's conv3d) or a latent patchified by views
    (AuraFlow): the graph recompiled with symbolic token counts groups each new count on the grid
    that call's input size makes (shapes only), with the text side of the first graph; nothing
    runs ungrouped. The same count at the other aspect ratio (24×16 after 16×24) gets its own grid
    (until session 40 it kept the first ratio's)."""
    import math

    import torch
    from torch._dynamo.utils import counters

    import chipmunk_compile
    from chipmunk_compile.grouping import GridInfo, image_order, site_perm
    from zoo_common import _r

    case = arch_zoo.MODELS[key][1]()
    c = torch.compile(case.model, backend="chipmunk", options={"config": arch_zoo.CFG, "compiler": "eager"})
    kw = dict(case.kwargs)
    counters["chipmunk"].clear()
    for size in sizes:
        kw["hidden_states"] = _r(1, 4, *size)
        with torch.no_grad():
            out = c(**kw)[0]
        assert out.shape[-len(size):] == size and torch.isfinite(out).all()
    assert counters["chipmunk"]["grouping_ungrouped_count"] == 0
    sites = [s for ses in chipmunk_compile.runtime.sessions_of(c) for s in ses.sites
             if s.kind == "attention" and s.call_grouping is not None and s.call_grouping.shape_input is not None]
    assert sites and all("input's size" in s.grouping for s in sites)
    assert all(hit[0] is not None for s in sites for hit in s.call_grouping.cache.values())
    def grid_of(size):  # 2x2 patches, size-1 axes dropped
        return tuple(d for d in (size[:-2] + (size[-2] // 2, size[-1] // 2)) if d > 1)

    static = [s for ses in chipmunk_compile.runtime.sessions_of(c) for s in ses.sites
              if s.kind == "attention" and s.call_grouping is None and s.perm is not None]
    counts = {s.perm.numel() for s in static}
    assert len(counts) == 1, counts
    n_text = counts.pop() - math.prod(grid_of(sizes[0]))  # the other tokens of the first graph's sites
    for size in sizes[1:]:  # a later size may recompile once more (Wan: the frame count): any graph's sites
        grid = grid_of(size)
        n_img = math.prod(grid)
        checked = 0
        for s in sites:
            cg = s.call_grouping
            for key, (perm, _) in cg.cache.items():
                if key == (n_img + n_text, size):  # per count and input size
                    n = key[0]
                    order, _ = image_order(GridInfo(grid, ""), cg.tile, cg.group)
                    assert torch.equal(perm, site_perm(n, order, n - n_img, bool(cg.text_first))), (size, s.path)
                    checked += 1
        assert checked, (size, [list(s.call_grouping.cache) for s in sites])


@pytest.mark.parametrize("key", ["lumina2", "z_image"])
def test_resolution_change_groups_sites_after_a_graph_break(fresh_dynamo, key):
    """Lumina2 and Z-Image patchify their latent in a graph before a graph break; at a new
    resolution that graph recompiles with symbolic sizes and shows no grid (Z-Image's whole model
    then recompiles as one graph with symbolic counts). The latent that graph takes, recorded per
    call (or the recompiled graph's own latent input), gives the blocks their new grid; the text
    side is the one each module had before. Z-Image pads its image tokens to a multiple of 32
    before its 32 text tokens: on the call's exact grid the pad goes with the text. Every size is
    grouped on its own grid, none runs ungrouped."""
    import math

    import torch
    from torch._dynamo.utils import counters

    import chipmunk_compile
    from chipmunk_compile.grouping import GridInfo, image_order, site_perm
    from zoo_common import _r

    case = arch_zoo.MODELS[key][1]()
    c = torch.compile(case.model, backend="chipmunk", options={"config": arch_zoo.CFG, "compiler": "eager"})
    kw = dict(case.kwargs)
    name = case.latent or "hidden_states"
    counters["chipmunk"].clear()
    lead = (kw[name][0] if key == "z_image" else kw[name]).shape[:-2]
    for size in ((16, 16), (12, 16), (12, 12)):
        before = max((s.id for ses in chipmunk_compile.runtime.sessions_of(c) for s in ses.sites), default=-1)
        latent = _r(*lead, *size)
        kw[name] = [latent] if key == "z_image" else latent
        with torch.no_grad():
            out = c(**kw)[0]
        out = out[0] if isinstance(out, (list, tuple)) else out
        assert out.shape[-2:] == size and torch.isfinite(out).all()
        grid = (size[0] // 2, size[1] // 2)
        n_img = math.prod(grid)
        if key == "lumina2":  # text first, as many tokens as the prompt
            n, first = n_img + kw["encoder_hidden_states"].shape[1], True
        else:  # image padded to a multiple of 32, then the prompt padded to 32
            n, first = -(-n_img // 32) * 32 + 32, False
        new = [s for ses in chipmunk_compile.runtime.sessions_of(c) for s in ses.sites if s.id > before]
        blocks = [s for s in new if s.kind == "attention" and s.path.startswith("layers.")]
        assert blocks, (size, [s.path for s in new])
        for s in blocks:  # image + text tokens: the joint blocks
            cg = s.call_grouping
            order, _ = image_order(GridInfo(grid, ""), cg.tile if cg else s.session.config.grouping.tile,
                                   cg.group if cg else s.cfg.group)
            perm = s.perm if cg is None else cg.for_count(n, s.session)[0]
            assert perm is not None and torch.equal(perm, site_perm(n, order, n - n_img, first)), (size, s.grouping)
            assert "×".join(map(str, grid)) in s.grouping, (size, s.grouping)
    assert counters["chipmunk"]["grouping_ungrouped_count"] == 0


def test_symbolic_sites_take_the_grid_of_the_calls_latent(fresh_dynamo):
    """HiDream's attention, recompiled with symbolic token counts at a third resolution (its
    patchify runs in an earlier graph, which recompiled too), takes its grid from the latent of
    the call that compiled it (6×6 at 12×12), per call: not the first resolution's 8×8."""
    import torch

    import chipmunk_compile
    from zoo_common import _r

    case = arch_zoo.MODELS["hidream"][1]()
    c = torch.compile(case.model, backend="chipmunk", options={"config": arch_zoo.CFG, "compiler": "eager"})
    kw = dict(case.kwargs)
    for size in ((16, 16), (12, 16), (12, 12)):  # site ids grow: the last size's graphs made those above `before`
        before = max((s.id for ses in chipmunk_compile.runtime.sessions_of(c) for s in ses.sites), default=-1)
        kw["hidden_states"] = _r(1, 4, *size)
        with torch.no_grad():
            c(**kw)
    new = [s for ses in chipmunk_compile.runtime.sessions_of(c) for s in ses.sites if s.id > before]
    attn = [s for s in new if s.kind == "attention"]
    assert attn and all(s.call_grouping is not None and s.call_grouping.call_latent for s in attn), \
        [s.grouping for s in attn]
    assert all("this call's size" in s.grouping and "6×6" in s.grouping for s in attn), [s.grouping for s in attn]


def test_kv_pipeline_flow_groups_the_cached_steps(fresh_dynamo):
    """FLUX.2 Klein's KV flow through one compiled model: the extract step (two images: no grid),
    then cached steps, a recompile with symbolic token counts. Their attention sites are matched and
    grouped per call with the text first, although the cached reference keys (as many as the image
    tokens) sit between the text and image keys; outputs stay close to eager."""
    import torch

    import chipmunk_compile
    from arch_zoo_newer import flux2_kv_cached
    from zoo_common import _r

    case = flux2_kv_cached()  # its processors and inputs; the flow below extracts its own cache
    m, kw = case.model, dict(case.kwargs)
    ids0 = kw.pop("img_ids")
    kw.pop("kv_cache"), kw.pop("kv_cache_mode")
    lat, ref_lat = kw.pop("hidden_states"), _r(1, 144, 4, seed=3)
    ref_ids = ids0.clone()
    ref_ids[..., 0] = 10
    c = torch.compile(m, backend="chipmunk", options={"config": arch_zoo.SPARSE, "compiler": "eager"})
    with torch.no_grad():
        _, cache = c(hidden_states=torch.cat([ref_lat, lat], 1), img_ids=torch.cat([ref_ids, ids0], 1),
                     kv_cache_mode="extract", num_ref_tokens=144, **kw)
        for i in range(4):
            x = dict(kw, hidden_states=lat + 0.01 * i, img_ids=ids0, kv_cache=cache, kv_cache_mode="cached")
            out, ref = c(**x)[0], m(**x)[0]
            assert ((out - ref).norm() / ref.norm()).item() < 0.1
    session = chipmunk_compile.runtime.sessions_of(c)[0]
    cached = [s for s in session.sites if s.kind == "attention" and s.key_layout is not None]
    assert cached, [s.grouping for s in session.sites]
    for s in cached:
        perm, keep = s.call_grouping.for_count(8 + 144, session) if s.call_grouping else (s.perm, s.always_keep)
        assert perm is not None and keep is not None and keep[:8].all() and not keep[8:].any(), s.grouping


def test_cosmos3_packed_sequence_sites(fresh_dynamo):
    """Cosmos3 Omni: one packed (tokens, C) sequence cut into a text prefix and vision tokens with
    their own weights. Its vision attention (over cat(text keys, vision keys)) was rejected as a
    cross-attention and its (tokens, C) MLPs as conditioning MLPs: 0 sites. Now 2 attention + 4 MLP
    sites, the vision ones grouped on the latent's grid, dense steps exact, sparse steps run."""
    row = arch_zoo.measure("cosmos3_omni")
    assert row["status"] == "ok", row["note"]
    assert (row["attn"], row["mlp"]) == (2, 4) and row["grouped"] == "4/6"
    assert "t×h×w 3×6×6" in row["grouping"]
    assert float(row["dense_err"]) < 1e-5 and 0 < float(row["sparse_err"]) < 0.1
    assert row["sparse_steps"] > 0 and not row["fallbacks"]


@pytest.mark.parametrize("key", ["hidream", "glm_image", "nucleus_moe_image"])
def test_zoo_models_whose_entry_graph_lacks_the_timestep_track_steps(fresh_dynamo, key):
    """Under timestep tracking (benchmarks/zoo_step_tracking.py) every site ends at generation 1,
    step 3, branch 1 of two 4-step generations with two guidance calls per step. Until session 50
    these three counted every call as a step (0/15/0): HiDream reads its timestep in a child's
    frame, GLM-Image only after a graph break, NucleusMoE-Image's forward yields no graph."""
    import zoo_step_tracking

    row = zoo_step_tracking.track(key)
    assert row["status"] == "ok" and row["positions"] == "1/3/1", row
    assert row["step_signal_none"] <= 1  # GLM-Image's first call, before its resumed graph compiled
