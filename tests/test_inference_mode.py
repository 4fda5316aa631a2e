"""Calls under torch.inference_mode() and under torch.no_grad() may follow each other.

Tensors made under inference mode are inference tensors, which no later call outside inference
mode may update in place. The backend's state (caches, the device step, the step graphs' input
buffers) is therefore made as plain tensors (`runtime.plain_tensors`): until session 40 a
generation under no_grad after one under inference_mode raised "Inplace update to inference tensor
outside InferenceMode is not allowed" at its first call."""

import pytest
import torch

import chipmunk_compile
from chipmunk_compile import graphs
from helpers import TwoTinyBlocks, fresh_dynamo  # noqa: F401

CFG = {"attn": {"min_tokens": 0, "first_n_dense_layers": 0, "top_keys": 0.3, "group": 64},
       "mlp": {"min_tokens": 0, "first_n_dense_layers": 0, "block": 64}}


def _generations(modes, emulate_graphs: bool, monkeypatch):
    """One 8-step generation per grad mode in `modes`, on a fresh compile of the same model."""
    monkeypatch.setattr(graphs, "EMULATE", emulate_graphs)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TwoTinyBlocks().eval()
    x, drift = torch.randn(1, 150, 64), torch.randn(1, 150, 64)
    c = torch.compile(model, backend="chipmunk", options={"config": CFG, "compiler": "eager"})
    gens = []
    for g, mode in enumerate(modes):
        if g:
            chipmunk_compile.reset(c)
        with mode():
            gens.append([c(x + 0.05 * i * drift).clone() for i in range(8)])
    return gens, c


@pytest.mark.parametrize("emulate_graphs", [False, True], ids=["eager", "step_graphs"])
def test_no_grad_after_inference_mode_updates_the_same_state(fresh_dynamo, monkeypatch, emulate_graphs):
    modes = [torch.inference_mode, torch.no_grad, torch.inference_mode]
    got, c = _generations(modes, emulate_graphs, monkeypatch)
    want, _ = _generations([torch.no_grad] * 3, emulate_graphs, monkeypatch)
    state = [t for s in chipmunk_compile.sessions_of(c) for t in s.state.buffers()]
    assert state and not any(t.is_inference() for t in state)
    if emulate_graphs:
        assert fresh_dynamo["chipmunk"]["graph_replays"] > 0
    steps = [s["steps"] for s in chipmunk_compile.stats(c)["sites"]]
    assert all(st.get("sparse", 0) > 0 for st in steps), steps
    for gen_got, gen_want in zip(got, want):
        for a, b in zip(gen_got, gen_want):
            assert ((a - b).norm() / b.norm()).item() < 1e-6
