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


class SinusoidTime(nn.Module):
    """A timestep embedding (sinusoid, then a linear): the frame that reads the step signal."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, C)
        self.register_buffer("freqs", torch.exp(-torch.arange(8) / 8.0))

    def forward(self, t):
        ang = t[:, None] * self.freqs[None]
        return self.lin(torch.cat([ang.sin(), ang.cos()], dim=-1))[:, None, :]


class SkippedRoot(nn.Module):
    """A model whose own forward Dynamo never traces (as when a graph break inside its loop over
    blocks makes Dynamo skip the frame: diffusers' cache hooks on FLUX do): its time embedding, its
    blocks and its output projection are frames of their own, and the model has no session."""

    def __init__(self, depth=2):
        super().__init__()
        torch.manual_seed(0)
        self.time = SinusoidTime()
        self.blocks = nn.ModuleList([MoeBlock() for _ in range(depth)])
        for blk in self.blocks:
            blk.ff = FeedForwardInline()
        self.proj_out = nn.Linear(C, C)

    @torch.compiler.disable(recursive=False)
    def forward(self, x, t):
        temb = self.time(t)
        for blk in self.blocks:
            x = blk(x, temb)
        return self.proj_out(x)


def _guided_generations(model, n=3, steps=6):
    """n generations of `steps` steps, two guidance calls per step with one timestep, under sparse
    attention and MLP (refresh / dense every 4 steps): the outputs per generation."""
    sparse = {"top_keys": 0.25, "random_keys": 0.0, "full_step_every": 4}
    compiled = chip(model, cfg(attn={**sparse, "group": 16}, mlp={**sparse, "block": 16}), fullgraph=False)
    g = torch.Generator().manual_seed(0)
    base, drift, uncond = (torch.randn(1, 64, C, generator=g) for _ in range(3))
    gens = []
    with torch.no_grad():
        for _ in range(n):
            outs = []
            for step in range(steps):
                x, t = base + 0.02 * step * drift, torch.tensor([1.0 - 0.05 * step])
                outs += [compiled(x, t), compiled(x + 0.1 * uncond, t)]
            gens.append(outs)
    return gens


def test_blocks_of_a_model_with_no_graph_follow_its_time_embedding(fresh_dynamo):
    """The blocks' session takes its steps from the time embedding's, which reads the timestep:
    both guidance calls of a step are one step (two branches), and each generation begins at step
    0. Until session 50 the blocks counted their own calls: 12 "steps" per 6-step generation, no
    generation ever ended, and the second generation ran on the first one's caches and indices."""
    model = SkippedRoot().eval()
    gens = _guided_generations(model)
    (blocks, ) = [s for s in sessions_of(model) if s.sites]
    (time, ) = [s for s in sessions_of(model) if s.owner() is model.time]
    assert blocks.step_parent() is time and time.signalled and not blocks.signalled
    pos = blocks.position()
    assert (pos.generation, pos.step) == (2, 5), pos
    steps = {}
    for site in chipmunk_compile.stats(model)["sites"]:
        for kind, n in site["steps"].items():
            steps[(site["kind"], kind)] = steps.get((site["kind"], kind), 0) + n
    # per generation, block and branch: the MLP dense at steps 0 and 4, sparse at 1-3 and 5
    assert steps[("mlp", "dense")] == 3 * 2 * 2 * 2 and steps[("mlp", "sparse")] == 3 * 2 * 2 * 4, steps
    for i, (a, b) in enumerate(zip(gens[1], gens[2])):
        assert torch.equal(a, b), i
    g = torch.Generator().manual_seed(0)  # _guided_generations' inputs
    base, drift, _ = (torch.randn(1, 64, C, generator=g) for _ in range(3))
    with torch.no_grad():
        ref = [model(base + 0.02 * s * drift, torch.tensor([1.0 - 0.05 * s])) for s in range(6)]
    errs = [max_rel(o, r) for o, r in zip(gens[2][::2], ref)]
    assert errs[0] < 1e-5 and errs[4] < 1e-5 and max(errs) < 0.05, errs


class TextMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class LateTimestep(nn.Module):
    """A forward that uses its timestep only after a graph break, with an MLP site before it (as
    GLM-Image and Qwen-Image 2.1 refine their text first): the entry graph has no step signal."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.refine = TextMlp()
        self.time = SinusoidTime()
        self.block = MoeBlock()
        self.block.ff = FeedForwardInline()

    def forward(self, x, t):
        x = x + self.refine(x)
        torch._dynamo.graph_break()
        return self.block(x, self.time(t))


class PrepFirst(SkippedRoot):
    """HiDream's shape: the model's forward yields no graph, its first frame is a method of the model
    (so the model's session has an entry graph, with no step signal), and the timestep is read in
    the time embedding's frame, whose session follows the model's."""

    @torch.compiler.disable(recursive=False)
    def forward(self, x, t):
        x = self.prep(x)
        temb = self.time(t)
        for blk in self.blocks:
            x = blk(x, temb)
        return self.proj_out(x)

    def prep(self, x):
        return x * 1.0


def test_a_timestep_read_only_after_a_graph_break_is_the_signal(fresh_dynamo):
    """The entry graph's call reads the timestep from its frame's locals (the name the resumed graph
    reads it by), so an op in the entry graph already runs at the right step. Until session 50 each
    call was a step of its own and no generation ended; now only the very first call, before the
    resumed graph was compiled, has no signal (counted once, not logged)."""
    model = LateTimestep().eval()
    gens = _guided_generations(model)
    (session, ) = [s for s in sessions_of(model) if s.sites]
    assert session.late_signals == {"t"} and not session.signalled
    assert (session.position().generation, session.position().step) == (2, 5)
    assert fresh_dynamo["chipmunk"]["step_signal_none"] == 1
    assert fresh_dynamo["chipmunk"]["mlp_sparse"] > 0
    for i, (a, b) in enumerate(zip(gens[1], gens[2])):
        assert torch.equal(a, b), i


def test_a_call_begun_without_signal_waits_for_a_following_session(fresh_dynamo):
    """The model's session (entry graph: a method with no signal) defers each call until its time
    embedding's session, which follows it, reads the timestep; the blocks then run at that step."""
    model = PrepFirst().eval()
    gens = _guided_generations(model)
    root = [s for s in sessions_of(model) if s.owner() is model]
    (time, ) = [s for s in sessions_of(model) if s.owner() is model.time]
    assert len(root) == 1 and root[0].has_entry and not root[0].signalled
    assert time.signalled and time.step_parent() is root[0]
    pos = root[0].position()
    assert (pos.generation, pos.step) == (2, 5) and fresh_dynamo["chipmunk"]["step_signal_none"] == 0
    for i, (a, b) in enumerate(zip(gens[1], gens[2])):
        assert torch.equal(a, b), i
