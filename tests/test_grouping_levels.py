"""Grouping of multi-resolution denoisers (U-Nets, hourglass DiTs): sites whose token count the
graph's grid does not explain take the grid of the reshape that merges their level's (h, w) into
tokens, when that grid is the graph's scaled by a power of two and the only one of their count;
otherwise they stay ungrouped."""

from __future__ import annotations

import torch

import chipmunk_compile
from helpers import plan_sites

from chipmunk_compile.grouping import GridInfo, _a_level_of, _effective_tile, image_order, site_perm, tile_order

LOOSE = {"attn": {"min_tokens": 1, "first_n_dense_layers": 0}, "mlp": {"min_tokens": 1, "first_n_dense_layers": 0},
         "step_signal": "calls"}


class _Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.qkv = torch.nn.Linear(c, 3 * c)
        self.out = torch.nn.Linear(c, c)
        self.fc1 = torch.nn.Linear(c, 4 * c)
        self.fc2 = torch.nn.Linear(4 * c, c)

    def forward(self, t):
        b, n, c = t.shape
        q, k, v = self.qkv(t).view(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)
        t = t + self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return t + self.fc2(torch.nn.functional.gelu(self.fc1(t), approximate="tanh"))


class Hourglass(torch.nn.Module):
    """A conv patch embedding (the graph's grid), a block on it, a stride-2 conv (3×3, as a U-Net's
    downsampler) down to a level of a quarter of the tokens, a block there, and a transposed conv
    back up. `rival`: a table of as many
    rows as the lower level, merged from a (4, 12) layout, is added to its tokens (no scaling of the
    16×12 grid: not a level). `text`: a feed-forward on 16 caption tokens that a reshape merges
    from (8, 2) (Mochi's caption layout in the zoo), a count of no level either."""

    def __init__(self, c=24, rival=False, text=False):
        super().__init__()
        self.rival, self.text = rival, text
        self.txt_fc1, self.txt_fc2 = torch.nn.Linear(c, 4 * c), torch.nn.Linear(4 * c, c)
        self.embed = torch.nn.Conv2d(4, c, 2, stride=2)
        self.down = torch.nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose2d(c, c, 2, stride=2)
        self.blocks = torch.nn.ModuleList(_Block(c) for _ in range(3))

    def forward(self, latent, caption=None):
        x = self.embed(latent)
        b, c, h, w = x.shape
        t = self.blocks[0](x.flatten(2).transpose(1, 2))
        y = self.down(t.transpose(1, 2).reshape(b, c, h, w))
        s = y.flatten(2).transpose(1, 2)
        if self.rival:
            s = s + torch.ones(4, 12, c).cumsum(0).reshape(48, c)
        s = self.blocks[1](s)
        z = self.up(s.transpose(1, 2).reshape(b, c, h // 2, w // 2))
        out = self.blocks[2](t + z.flatten(2).transpose(1, 2))
        if self.text:
            cap = caption.reshape(b, 16, c)
            out = out + (cap + self.txt_fc2(torch.nn.functional.gelu(self.txt_fc1(cap)))).mean(1, keepdim=True)
        return out


def _sites(model):
    kw = dict(latent=torch.randn(1, 4, 32, 24))
    if model.text:
        kw["caption"] = torch.randn(1, 8, 2, 24)
    return plan_sites(model, kw, LOOSE)


def test_lower_level_sites_take_their_own_grid():
    sites = _sites(Hourglass())
    by_tokens = {}
    for s in sites:
        by_tokens.setdefault(int(s.shapes["q"][2] if s.kind == "attention" else s.shapes["x"][-2]), []).append(s)
    assert sorted(by_tokens) == [48, 192], by_tokens.keys()
    for s in by_tokens[192]:
        assert s.grouping.startswith("conv2d patch embed h×w 16×12"), s.grouping
    lower = by_tokens[48]
    assert {s.kind for s in lower} == {"attention", "mlp"}
    for s in lower:
        assert "h×w 8×6 (a level of its own)" in s.grouping, s.grouping
        expected = site_perm(48, tile_order((8, 6), _effective_tile(None, (8, 6))), 0, True)
        assert torch.equal(s.perm.long(), expected.long()) and s.always_keep is None


def test_only_merges_that_scale_the_grid_are_levels():
    """A merge of the lower level's count that is no power-of-two scaling of the graph's grid (the
    (4, 12) table) does not compete with the level's own; caption tokens merged from (8, 2) stay
    ungrouped (before this rule, Mochi's 16 caption tokens were grouped as an 8×2 level)."""
    sites = _sites(Hourglass(rival=True, text=True))
    lower = [s for s in sites if "h×w 8×6 (a level of its own)" in s.grouping]
    assert len(lower) == 2, [s.grouping for s in sites]
    text = [s for s in sites if s.kind == "mlp" and s.shapes["x"][-2] == 16]
    assert len(text) == 1 and text[0].perm is None and text[0].grouping.startswith("none: 16 tokens"), \
        [s.grouping for s in sites]


def test_a_level_is_the_grid_scaled_by_a_power_of_two():
    assert _a_level_of((16, 16), (8, 8)) and _a_level_of((8, 8), (16, 16)) and _a_level_of((16, 12), (4, 3))
    assert _a_level_of((15, 13), (8, 7)) and _a_level_of((15, 13), (7, 6))  # stride-2 convs round either way
    assert _a_level_of((3, 16, 16), (3, 8, 8)) and _a_level_of((3, 16, 16), (8, 8))  # frames kept, or in the batch
    assert not _a_level_of((16, 16), (16, 16)) and not _a_level_of((16, 16), (8, 4))
    assert not _a_level_of((3, 8, 8), (8, 2)) and not _a_level_of((16, 12), (4, 12))


def _compiled_hourglass():
    """(eager model, compiled with backend="chipmunk" and the eager inner compiler): sparse steps at
    half the keys / neurons, query groups and token blocks of 16, a refresh every 4 calls."""
    torch.manual_seed(0)
    model = Hourglass().eval()
    cfg = {"attn": {"min_tokens": 1, "first_n_dense_layers": 0, "top_keys": 0.5, "group": 16, "full_step_every": 4},
           "mlp": {"min_tokens": 1, "first_n_dense_layers": 0, "top_keys": 0.5, "block": 16, "full_step_every": 4},
           "step_signal": "calls"}
    torch._dynamo.reset()
    return model, torch.compile(model, backend="chipmunk", options={"config": cfg, "compiler": "eager"})


def test_lower_level_grouping_runs_end_to_end():
    """Compiled (eager inner compiler): the dense first call matches eager, and the sparse calls after
    it run on the level's permutation and stay close to eager."""
    model, compiled = _compiled_hourglass()
    latent = torch.randn(1, 4, 32, 24)
    drift = torch.randn(1, 4, 32, 24)
    with torch.no_grad():
        for step in range(4):
            x = latent + 0.01 * step * drift
            ref, out = model(x), compiled(x)
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            assert err < (1e-5 if step == 0 else 0.05), (step, err)
    lower = [s for s in chipmunk_compile.stats(compiled)["sites"] if s["path"].startswith("blocks.1")]
    assert len(lower) == 2 and all("8×6 (a level of its own)" in s["grouping"] for s in lower), lower
    assert all(s["steps"].get("sparse", 0) >= 2 for s in lower), lower


def test_levels_follow_a_new_resolution_under_dynamic_shapes():
    """At a second and third resolution Dynamo recompiles with symbolic token counts: every site is
    grouped per call, the main level on its latent's grid and the lower one on that grid scaled by
    the level's power of two (remembered per module); nothing runs ungrouped."""
    from torch._dynamo.utils import counters

    counters.clear()
    model, compiled = _compiled_hourglass()
    with torch.no_grad():
        for size in ((32, 24), (48, 32), (32, 48)):
            latent, drift = torch.randn(1, 4, *size), torch.randn(1, 4, *size)
            for step in range(4):
                x = latent + 0.01 * step * drift
                ref, out = model(x), compiled(x)
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                assert err < (1e-5 if step == 0 else 0.1), (size, step, err)
    assert counters["chipmunk"]["grouping_ungrouped_count"] == 0
    per_call = [s for s in chipmunk_compile.stats(compiled)["sites"] if "per call" in s["grouping"]]
    lower = [s for s in per_call if s["path"].startswith("blocks.1")]
    assert len(per_call) == 6 and len(lower) == 2, [s["grouping"] for s in per_call]
    assert all("a level of its own of each new count (the call's grid scaled by 2^-1)" in s["grouping"]
               for s in lower), [s["grouping"] for s in lower]
    # the level of each latent: 12×8 tokens at 48×32 and 8×12 at 32×48 (one count, two grids: the
    # per-call cache is keyed by the input's size), in the tile order of query groups and token
    # blocks of 16 (4×4 boxes of the 8×8 tiles, as `image_order` lays them)
    from chipmunk_compile.runtime import sessions_of

    groupings = [site.call_grouping for sess in sessions_of(compiled) for site in sess.sites
                 if site.path.startswith("blocks.1") and getattr(site, "call_grouping", None) is not None]
    assert len(groupings) == 2
    for g in groupings:
        for latent_size, grid in (((48, 32), (12, 8)), ((32, 48), (8, 12))):
            perm, keep = g.cache[(96, latent_size)]
            expected = site_perm(96, image_order(GridInfo(grid, ""), None, 16)[0], 0, True)
            assert torch.equal(perm.long(), expected.long()) and keep is None, (latent_size, perm)
