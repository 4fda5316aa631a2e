"""The ops drive the Triton kernels exactly as they drive the references: a small DiT compiled with
backend="chipmunk" gives the same outputs on every step type with `CHIPMUNK_KERNELS=triton`
(Triton's CPU interpreter here; real kernels on a GPU) and with `CHIPMUNK_KERNELS=ref`."""

import os

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import chipmunk_compile
from helpers import TinyBlock, fresh_dynamo  # noqa: F401


class TinyDiT(nn.Module):
    def __init__(self, pair_bias: int = 0, width: int = 128, heads: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList([TinyBlock(width, heads=heads, mult=2, pair_bias=pair_bias) for _ in range(2)])
        self.t = nn.Linear(1, width)

    def forward(self, x, t):
        x = x + self.t(t[:, None])[:, None]
        for b in self.blocks:
            x = b(x)
        return x


CFG = {"attn": {"min_tokens": 0, "first_n_dense_layers": 0, "top_keys": 0.3, "group": 64},
       "mlp": {"min_tokens": 0, "first_n_dense_layers": 0, "block": 64}}


def _run(model, x, mode, monkeypatch, config=CFG):
    monkeypatch.setenv("CHIPMUNK_KERNELS", mode)
    torch._dynamo.reset()
    counters.clear()
    c = torch.compile(model, backend="chipmunk", options={"config": config, "compiler": "eager"}, fullgraph=True)
    with torch.no_grad():
        outs = [c(x + 0.01 * i, torch.full((x.shape[0],), 1 - i / 10)) for i in range(4)]
    return outs, dict(counters["chipmunk"]), c


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU tensors on Triton's interpreter (tests/conftest.py sets it where there is no GPU; "
                           "tests/test_gpu_backend.py runs the model on the GPU)")
@pytest.mark.parametrize("pair_bias", [False, True])
def test_triton_kernels_match_references_through_the_ops(fresh_dynamo, monkeypatch, pair_bias):
    """With pair_bias every attention kernel also adds a banded (heads, N, N) bias; the MLPs then stay
    dense (their neuron choice near a tie would flip on the ~1e-7 the attention paths differ by)."""
    _check_triton_matches_references(lambda: TinyDiT(pair_bias=150 if pair_bias else 0), monkeypatch,
                                     mlp=not pair_bias)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU tensors on Triton's interpreter (tests/conftest.py sets it where there is no GPU)")
def test_head_dim_256_runs_the_triton_kernels_through_the_ops(fresh_dynamo, monkeypatch):
    """AuraFlow's head dim: one head of 256, on the Triton kernels (no head_dim fallback), as the references.
    The MLPs stay dense: with them sparse, a neuron choice near a tie flips at step 3 on the ~1e-7 the
    attention paths differ by (1.6e-4 there; each op alone matches to ~1e-7)."""
    _check_triton_matches_references(lambda: TinyDiT(width=256, heads=1), monkeypatch, mlp=False)


def _check_triton_matches_references(build, monkeypatch, mlp: bool):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 150, model.t.out_features)  # 150 tokens: partial last group and block
    config = CFG if mlp else {**CFG, "mlp": {**CFG["mlp"], "enabled": False}}
    ref, ref_counts, _ = _run(model, x, "ref", monkeypatch, config)
    tri, tri_counts, c = _run(model, x, "triton", monkeypatch, config)
    assert ref_counts["kernel_fallback:attn_column_sparse:forced_ref"] > 0
    assert not any(k.startswith("kernel_fallback") for k in tri_counts), tri_counts
    kinds = {k for s in chipmunk_compile.stats(c)["sites"] for k in s["steps"]}
    assert kinds == {"dense", "refresh", "sparse"}
    for a, b in zip(tri, ref):
        assert ((a - b).norm() / b.norm()).item() < 1e-5


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="CPU tensors on Triton's interpreter (tests/conftest.py sets it where there is no GPU; "
                           "tests/test_gpu_backend.py runs the model on the GPU)")
def test_fp8_column_scores_through_the_ops(fresh_dynamo, monkeypatch):
    """attn.colsum_fp8 past the key threshold: refreshes rank columns by e4m3 scores, on the kernel
    and on the reference alike (same outputs)."""
    import importlib

    attention = importlib.import_module("chipmunk_compile.ops.attention")  # the module, not the op it exports
    decisions = []
    decide = attention.colsum_fp8
    monkeypatch.setattr(attention, "COLSUM_FP8_MIN_KEYS", 100)
    monkeypatch.setattr(attention, "colsum_fp8", lambda cfg, k: decisions.append(decide(cfg, k)) or decisions[-1])
    torch.manual_seed(0)
    model = TinyDiT().eval()
    x = torch.randn(2, 150, 128)
    ref, _, _ = _run(model, x, "ref", monkeypatch)
    tri, tri_counts, _ = _run(model, x, "triton", monkeypatch)
    assert decisions and all(decisions)
    assert not any(k.startswith("kernel_fallback") for k in tri_counts), tri_counts
    for a, b in zip(tri, ref):
        assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_colsum_fp8_needs_many_keys_and_the_option():
    from chipmunk_compile.config import AttnConfig
    from chipmunk_compile.ops.attention import COLSUM_FP8_MIN_KEYS, colsum_fp8

    many, few = torch.empty(1, 2, COLSUM_FP8_MIN_KEYS, 8), torch.empty(1, 2, COLSUM_FP8_MIN_KEYS - 1, 8)
    assert colsum_fp8(AttnConfig(), many) and not colsum_fp8(AttnConfig(), few)
    assert not colsum_fp8(AttnConfig(colsum_fp8=False), many)
