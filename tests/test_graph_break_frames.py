"""Models that Dynamo splits into frames of their own: a submodule frame (an MoE-style
feed-forward that graph-breaks, as in HiDream) gets a session of its own; it follows the steps of
the enclosing block's session instead of counting its own calls (it has no timestep input, and
several of its frames may start per model call)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import chipmunk_compile
from chipmunk_compile.runtime import sessions_of
from helpers import cfg, chip, fresh_dynamo, max_rel  # noqa: F401

C, H = 32, 2


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        torch._dynamo.graph_break()  # data-dependent routing in a real MoE
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class MoeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(C, C) for _ in range(4))
        self.ff = FeedForward()

    def forward(self, x, temb):
        b, n, _ = x.shape
        x = x + temb
        q, k, v = (lin(x).view(b, n, H, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, C))
        return x + self.ff(x)


class MoeNet(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([MoeBlock() for _ in range(depth)])
        self.t_proj = nn.Linear(1, C)

    def forward(self, x, t):
        temb = self.t_proj(t.view(-1, 1) / 1000.0)[:, None, :]
        for blk in self.blocks:
            x = blk(x, temb)
        return x


def run_steps(model, steps=6):
    """Six denoising-like calls (drifting latent, decreasing timestep) of the model compiled with
    sparse attention and MLP (refresh / dense every 4 steps): the relative errors against eager."""
    sparse = {"top_keys": 0.25, "random_keys": 0.0, "full_step_every": 4, "first_n_dense_layers": 0}
    compiled = chip(model, cfg(attn={**sparse, "group": 16}, mlp={**sparse, "block": 16}), fullgraph=False)
    g = torch.Generator().manual_seed(0)
    base, drift = torch.randn(1, 64, C, generator=g), torch.randn(1, 64, C, generator=g)
    errs = []
    with torch.no_grad():
        for step in range(steps):
            x, t = base + 0.02 * step * drift, torch.tensor([1000.0 - 50.0 * step])
            errs.append(max_rel(compiled(x, t), model(x, t)))
    return errs


def test_submodule_frame_follows_enclosing_steps(fresh_dynamo):
    model = MoeNet().eval()
    errs = run_steps(model)
    sessions = sessions_of(model)
    nested = [s for s in sessions if any(site.kind == "mlp" for site in s.sites)]
    assert len(sessions) == 2 and len(nested) == 1 and nested[0].enclosing() is not None
    steps = {}
    for site in chipmunk_compile.stats(model)["sites"]:
        for kind, n in site["steps"].items():
            steps[(site["kind"], kind)] = steps.get((site["kind"], kind), 0) + n
    assert steps[("mlp", "dense")] == 3 * 2 and steps[("mlp", "sparse")] == 3 * 4  # dense at steps 0 and 4
    # step 1 refreshes attention exactly, so its error is the sparse MLP's; step 4 is exact
    assert errs[1] > 1e-6 and errs[0] < 1e-5 and errs[4] < 1e-5, errs
    assert max(errs) < 0.05, errs


class SplitRoot(nn.Module):
    """A model whose own forward yields no graph (it runs eagerly: Wan-Animate-2's does, after a
    `.item()` inside a generator expression) while a method of its resumes in a graph after a break:
    the root gets a session from that resumed frame alone, which never begins a call."""

    def __init__(self, depth=2):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([MoeBlock() for _ in range(depth)])
        for blk in self.blocks:
            blk.ff = FeedForwardInline()
        self.t_proj = nn.Linear(1, C)
        self.proj_out = nn.Linear(C, C)

    @torch.compiler.disable(recursive=False)
    def forward(self, x, t):
        temb = self.t_proj(t.view(-1, 1) / 1000.0)[:, None, :]
        for blk in self.blocks:
            x = blk(x, temb)
        return self.finish(x)

    def finish(self, x):
        torch._dynamo.graph_break()
        return self.proj_out(x)


class FeedForwardInline(FeedForward):
    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def test_a_session_that_never_begins_a_call_is_not_followed(fresh_dynamo):
    """The blocks must not follow the root's session (born from a resumed frame, it never
    advances, so every site would stay at step 0, dense): they count their own calls and run
    sparse steps between refreshes."""
    model = SplitRoot().eval()
    errs = run_steps(model)
    sessions = sessions_of(model)
    root = [s for s in sessions if s.owner() is model]
    assert len(root) == 1 and not root[0].has_entry  # it counts its calls in `finish`, too late for the blocks
    (blocks, ) = [s for s in sessions if s.sites]  # one graph serves both blocks
    assert blocks.enclosing() is None and blocks.calls == 6
    steps = {}
    for site in chipmunk_compile.stats(model)["sites"]:
        for kind, n in site["steps"].items():
            steps[kind] = steps.get(kind, 0) + n
    # per block: attention dense at step 0 and refreshed at 1 and 4, the MLP dense at 0 and 4
    assert steps == {"dense": 6, "refresh": 4, "sparse": 14}, steps
    assert max(errs) < 0.05, errs


class EarlyBreak(nn.Module):
    """A forward that graph-breaks before its first tensor op (a print, a host-side check): its
    entry frame makes no graph, and its attention and MLP live in the resumed frame's graph."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = MoeBlock()
        self.block.ff = FeedForwardInline()
        self.t_proj = nn.Linear(1, C)

    def forward(self, x, t):
        torch._dynamo.graph_break()
        return self.block(x, self.t_proj(t.view(-1, 1) / 1000.0)[:, None, :])


def test_a_forward_that_breaks_before_its_first_op_still_advances(fresh_dynamo):
    """Without an entry graph the session's first resumed frame begins its calls: the steps move
    (they stayed at 0, every call dense, nothing counted) and the timestep input is the signal."""
    model = EarlyBreak().eval()
    errs = run_steps(model)
    steps = {}
    for site in chipmunk_compile.stats(model)["sites"]:
        for kind, n in site["steps"].items():
            steps[(site["kind"], kind)] = steps.get((site["kind"], kind), 0) + n
    assert steps.get(("mlp", "sparse")) == 4 and steps.get(("attention", "sparse")) == 3, steps
    (session, ) = [s for s in sessions_of(model) if s.sites]
    assert not session.has_entry and session.step_frame and session.calls == 6
    assert max(errs) < 0.05 and errs[0] < 1e-5, errs
