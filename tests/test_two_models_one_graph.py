"""Two models of one class, each compiled: Dynamo serves both with one graph (parameters are graph
inputs), as in Wan 2.2's two experts (`transformer` for the high-noise steps, `transformer_2` for
the rest). The second model is no block of the first: its calls begin model calls of its own and
advance the steps, and its layers count from 0 (`first_n_dense_layers` keeps its own first layer
dense). Until session 40 it was taken for a further block of the first model: its calls never
advanced the step, so it ran every step at the position the first model had left (no refresh, no
dense step after its first), and its layers counted on from the first model's."""

import torch
from torch._dynamo.utils import counters

import chipmunk_compile
from helpers import TinyBlock, fresh_dynamo  # noqa: F401

CFG = {"attn": {"min_tokens": 0, "first_n_dense_layers": 1, "top_keys": 0.3, "group": 64, "full_step_every": 3},
       "mlp": {"min_tokens": 0, "first_n_dense_layers": 1, "block": 64, "full_step_every": 3}}


class TimedBlocks(torch.nn.Module):
    def __init__(self, width: int = 64, heads: int = 2, mult: int = 2, blocks: int = 2):
        super().__init__()
        self.t = torch.nn.Linear(1, width)
        self.blocks = torch.nn.ModuleList([TinyBlock(width, heads=heads, mult=mult) for _ in range(blocks)])

    def forward(self, x, timestep):
        x = x + self.t(timestep[:, None])[:, None]
        for b in self.blocks:
            x = b(x)
        return x


def test_second_model_sharing_the_graph_tracks_its_own_steps_and_layers(fresh_dynamo):
    torch.manual_seed(0)
    high, low = TimedBlocks().eval(), TimedBlocks().eval()
    c_high, c_low = (torch.compile(m, backend="chipmunk", options={"config": CFG, "compiler": "eager"})
                     for m in (high, low))
    x, drift = torch.randn(1, 150, 64), torch.randn(1, 150, 64)
    steps = 12
    with torch.no_grad():
        for gen in range(2):
            for i in range(steps):  # the first half on one expert, the second on the other
                model, compiled = (high, c_high) if i < steps // 2 else (low, c_low)
                t = torch.full((1,), 1.0 - i / steps)
                out, ref = compiled(x + 0.05 * i * drift, t), model(x + 0.05 * i * drift, t)
                if i == steps // 2 or i % 3 == 0:  # the second expert's first call; the schedule's dense steps
                    assert ((out - ref).norm() / ref.norm()).item() < 1e-5, (gen, i)
    assert counters["stats"]["unique_graphs"] == 1  # one graph served both
    (session,) = chipmunk_compile.sessions_of(c_high)
    sites = session.sites
    assert [len(s.graph.keys) for s in sites] == [2] * len(sites)
    assert session.position().step == steps - 1  # the second expert's calls advanced the steps
    for s in sites:  # layer 0 of each model dense on every call: no state there for either
        if s.layer == 0:
            assert set(s.steps) == {"dense"} and not s.states, (s.path, s.steps)
        else:  # layer 1 of each: steps of every kind, with caches per model
            assert s.steps.get("sparse", 0) > 0 and len(s.states) == 2, (s.path, s.steps, list(s.states))


def _two_experts():
    torch.manual_seed(0)
    high, low = TimedBlocks().eval(), TimedBlocks().eval()
    return high, low, *(torch.compile(m, backend="chipmunk", options={"config": CFG, "compiler": "eager"})
                        for m in (high, low))


def test_helpers_reach_the_session_through_the_second_model(fresh_dynamo):
    """stats / set_step / reset / release on the second model act on the session its calls run in
    (until session 41 it had none: stats was empty, set_step raised, reset did nothing)."""
    high, low, c_high, c_low = _two_experts()
    x = torch.randn(1, 150, 64)
    with torch.no_grad():
        for i in range(6):
            (c_high if i < 3 else c_low)(x, torch.full((1,), 1.0 - i / 6))
    assert chipmunk_compile.sessions_of(c_low) == chipmunk_compile.sessions_of(c_high)
    assert chipmunk_compile.sessions_of(low) == chipmunk_compile.sessions_of(high)
    stats = chipmunk_compile.stats(c_low)
    assert stats["step"] == 5 and stats["sites"] and stats["state_bytes"] > 0
    chipmunk_compile.set_step(c_low, 2)
    with torch.no_grad():
        c_low(x, torch.full((1,), 0.1))
    assert chipmunk_compile.stats(c_high)["step"] == 2
    chipmunk_compile.clear_step(c_low)
    generation = chipmunk_compile.stats(c_high)["generation"]
    chipmunk_compile.reset(c_low)  # a new generation for both models; their caches stay
    assert chipmunk_compile.stats(c_high)["generation"] == generation + 1
    assert chipmunk_compile.stats(c_high)["state_bytes"] > 0
    chipmunk_compile.release(c_low)
    assert chipmunk_compile.stats(c_high)["state_bytes"] == 0


def test_scheduler_followed_for_the_second_model_gives_its_steps(fresh_dynamo):
    """A scheduler followed for the second model steps its calls, though the graph's owner (the
    first model) follows none: its calls here pass one constant timestep, which read as a signal
    made every call after the first another guidance branch of one step (until session 41)."""
    from types import SimpleNamespace

    high, low, c_high, c_low = _two_experts()
    scheduler = SimpleNamespace(step_index=None)
    chipmunk_compile.follow_scheduler(c_low, scheduler)
    x = torch.randn(1, 150, 64)
    seen = []
    with torch.no_grad():
        for i in range(10):
            scheduler.step_index = i or None
            if i < 5:
                c_high(x, torch.full((1,), 1.0 - i / 10))
            else:
                c_low(x, torch.full((1,), 0.5))
            stats = chipmunk_compile.stats(c_high)
            seen.append((stats["step"], stats["branch"]))
    assert seen == [(i, "0") for i in range(10)], seen
