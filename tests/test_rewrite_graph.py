"""The graph rewrite, as a diff of the Dynamo graph before and after the chipmunk backend ran:
exactly the matched nodes go, exactly one chipmunk op per site comes (plus the documented views),
everything else (placeholders included) is unchanged; and the counters agree."""

import collections
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from chipmunk_compile.backend import chipmunk_backend
from chipmunk_compile.runtime import SITES

from helpers import cfg, fresh_dynamo  # noqa: F401
from test_patterns import (  # noqa: F401  (reuse the tiny modules)
    B, C, D, H, N, ExplicitBaddbmm, ExplicitUpcast, Gated, Mlp, Nothing, ParallelBlock, SdpaKeyPadding,
    SdpaPositional, SwiGLU2, _padding_args, qkv, tokens,
)

CHIP_ATTN = torch.ops.chipmunk.attention.default
CHIP_MLP = torch.ops.chipmunk.mlp.default


def _sig(node):
    return node.op, node.target


def _snapshot(gm):
    return {n.name: (n.op, n.target, n) for n in gm.graph.nodes}


class Recorder:
    """A torch.compile backend that snapshots the graph, then hands it to the chipmunk backend."""

    def __init__(self, config):
        self.config = config
        self.graphs = []

    def __call__(self, gm, example_inputs):
        before = {n.name: (n.op, n.target, repr(n.args), repr(n.kwargs)) for n in gm.graph.nodes}
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        code_before = gm.code
        fn = chipmunk_backend(gm, example_inputs, options={"config": self.config, "compiler": "eager"})
        self.graphs.append(dict(before=before, placeholders=placeholders, code_before=code_before, gm=gm,
                                plan=fn._chipmunk_plan, session=fn._chipmunk_session))
        return fn


def diff(mod, args, config=None):
    rec = Recorder(config or cfg())
    compiled = torch.compile(mod.eval(), backend=rec, fullgraph=True)
    with torch.no_grad():
        out = compiled(*args)
        ref = mod(*args)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(rec.graphs) == 1
    g = rec.graphs[0]
    gm = g["gm"]
    after = {n.name: n for n in gm.graph.nodes}
    removed = {k: v for k, v in g["before"].items() if k not in after}
    added = [n for k, n in after.items() if k not in g["before"]]
    kept = [n for k, n in after.items() if k in g["before"]]
    for n in kept:  # unchanged target; args equal up to the renamed site outputs
        op, target, _, _ = g["before"][n.name]
        assert (n.op, n.target) == (op, target), n.name
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == g["placeholders"]
    gm.graph.lint()
    return g, removed, added


def _targets(nodes):
    return collections.Counter(t if isinstance(t, str) else getattr(t, "__name__", str(t)) for t in nodes)


def test_sdpa_rewrite_diff(fresh_dynamo):
    g, removed, added = diff(SdpaPositional(), qkv(0))
    assert [v[1] for v in removed.values()] == [F.scaled_dot_product_attention]
    assert [n.target for n in added] == [CHIP_ATTN]
    op = added[0]
    q, k, v, key_mask, scale, site_id = op.args
    assert [a.op for a in (q, k, v)] == ["placeholder"] * 3 and key_mask is None and scale is None
    assert SITES[site_id].kind == "attention" and SITES[site_id] is g["plan"].sites[0]
    assert "chipmunk.attention" not in g["code_before"] and "chipmunk.attention" in g["gm"].code
    c = fresh_dynamo["chipmunk"]
    assert (c["graphs"], c["attention_sites"], c["mlp_sites"], c["rejected"]) == (1, 1, 0, 0)


def test_masked_sdpa_rewrite_adds_only_mask_views(fresh_dynamo):
    _, removed, added = diff(SdpaKeyPadding(), _padding_args(0))
    assert [v[1] for v in removed.values()] == [F.scaled_dot_product_attention]
    assert sorted(str(n.target) for n in added) == sorted(["flatten", "size", "expand", str(CHIP_ATTN)])
    op = next(n for n in added if n.target is CHIP_ATTN)
    assert op.args[3].target == "expand"


def test_explicit_3d_rewrite_diff(fresh_dynamo):
    _, removed, added = diff(ExplicitBaddbmm(), qkv(0))
    # baddbmm, transpose of k, softmax and bmm go; the `empty` input of baddbmm stays (dead, harmless)
    assert _targets(v[1] for v in removed.values()) == _targets([torch.baddbmm, "transpose", "softmax", torch.bmm])
    assert _targets(n.target for n in added) == _targets(["unsqueeze"] * 3 + [CHIP_ATTN, "squeeze"])
    op = next(n for n in added if n.target is CHIP_ATTN)
    assert op.args[4] == pytest.approx(0.3)


def test_explicit_upcast_rewrite_diff(fresh_dynamo):
    _, removed, added = diff(ExplicitUpcast(), qkv(0))
    assert _targets(v[1] for v in removed.values()) == _targets(
        [operator.matmul, "transpose", operator.mul, "float", "softmax", "to", F.dropout, operator.matmul])
    assert [n.target for n in added] == [CHIP_ATTN]
    assert added[0].args[4] == pytest.approx(0.35)


def test_mlp_rewrite_diff(fresh_dynamo):
    g, removed, added = diff(Mlp(F.gelu, dropout=True), tokens(0))
    assert _targets(v[1] for v in removed.values()) == _targets([torch._C._nn.linear, F.gelu, F.dropout, torch._C._nn.linear])
    assert [n.target for n in added] == [CHIP_MLP]
    x, w_act, b_act, w_lin, b_lin, w2, b2, act, site_id = added[0].args
    assert x.op == "placeholder" and w_lin is None and b_lin is None and act == "gelu"
    assert all(a.op in ("get_attr", "placeholder") for a in (w_act, b_act, w2, b2))
    assert SITES[site_id].kind == "mlp" and SITES[site_id].path == "fc2"
    c = fresh_dynamo["chipmunk"]
    assert (c["graphs"], c["attention_sites"], c["mlp_sites"]) == (1, 0, 1)


def test_gated_chunk_rewrite_slices_weight(fresh_dynamo):
    _, removed, added = diff(Gated(F.silu, True), tokens(0))
    assert _targets(v[1] for v in removed.values()) == _targets(
        [torch._C._nn.linear, "chunk", operator.getitem, operator.getitem, F.silu, operator.mul, torch._C._nn.linear])
    assert _targets(n.target for n in added) == _targets([operator.getitem] * 4 + [CHIP_MLP])
    op = next(n for n in added if n.target is CHIP_MLP)
    w_act, b_act, w_lin, b_lin = op.args[1:5]
    f = 3 * C
    assert w_act.args[1] == slice(0, f) and w_lin.args[1] == slice(f, 2 * f)
    assert b_act.args[1] == slice(0, f) and b_lin.args[1] == slice(f, 2 * f)


def test_two_linear_swiglu_rewrite_diff(fresh_dynamo):
    _, removed, added = diff(SwiGLU2(), tokens(0))
    assert _targets(v[1] for v in removed.values()) == _targets([torch._C._nn.linear] * 3 + [F.silu, operator.mul])
    assert [n.target for n in added] == [CHIP_MLP]
    assert added[0].args[3] is not None


@pytest.mark.parametrize("mlp_first", [False, True])
def test_parallel_rewrite_diff(fresh_dynamo, mlp_first):
    g, removed, added = diff(ParallelBlock(mlp_first), tokens(0))
    assert _targets(v[1] for v in removed.values()) == _targets(
        [F.scaled_dot_product_attention, torch._C._nn.linear, F.gelu, torch.cat, torch._C._nn.linear])
    assert _targets(n.target for n in added) == _targets(
        [CHIP_ATTN, operator.getitem, operator.getitem, CHIP_MLP, torch._C._nn.linear, operator.add])
    op = next(n for n in added if n.target is CHIP_MLP)
    w2_mlp = op.args[5]
    cols = w2_mlp.args[1][1]
    assert (cols.start, cols.stop) == ((0, 4 * C) if mlp_first else (C, 5 * C))
    assert op.args[6] is None  # b2 goes to the dense part
    assert g["plan"].sites[1].layer == 0


def test_layers_and_no_site_graph(fresh_dynamo):
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([ParallelBlock() for _ in range(3)])

        def forward(self, x, t):
            for b in self.blocks:
                x = b(x, t)
            return x

    g, removed, added = diff(Stack(), tokens(0))
    sites = g["plan"].sites
    assert [(s.kind, s.layer) for s in sites] == [("attention", 0), ("mlp", 0), ("attention", 1), ("mlp", 1),
                                                  ("attention", 2), ("mlp", 2)]
    assert [s.path for s in sites if s.kind == "mlp"] == [f"blocks.{i}.proj_out" for i in range(3)]
    assert sum(n.target is CHIP_ATTN for n in added) == 3 and sum(n.target is CHIP_MLP for n in added) == 3
    c = fresh_dynamo["chipmunk"]
    assert (c["attention_sites"], c["mlp_sites"]) == (3, 3)



class DifferentialBlock(nn.Module):
    """Differential attention (two SDPAs of one module, sharing v, subtracted) + MLP; the tail's
    attention module is called twice as well, outside any indexed block."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 5 * C)
        self.mlp = Mlp(F.gelu)

    def forward(self, x, t):
        b, n, _ = x.shape
        q1, q2, k1, k2, v = (y.view(b, n, H, D).transpose(1, 2) for y in self.qkv(x).chunk(5, -1))
        a = F.scaled_dot_product_attention(q1, k1, v) - 0.5 * F.scaled_dot_product_attention(q2, k2, v)
        return self.mlp(x + a.transpose(1, 2).reshape(b, n, C), t)


def test_layers_count_blocks_not_attention_calls(fresh_dynamo):
    """Both SDPAs of a block's differential attention are one layer (they were layers 2k and 2k+1:
    `first_n_dense_layers` covered half the blocks it names); sites outside an indexed block
    (a module called in a loop) still count one layer per call."""

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([DifferentialBlock() for _ in range(2)])
            self.tail = DifferentialBlock()

        def forward(self, x, t):
            for b in [*self.blocks, self.tail, self.tail]:
                x = b(x, t)
            return x

    g, _, _ = diff(Stack(), tokens(0))
    assert [(s.kind, s.path, s.layer) for s in g["plan"].sites] == [
        ("attention", "blocks.0", 0), ("attention", "blocks.0#1", 0), ("mlp", "blocks.0.mlp.fc2", 0),
        ("attention", "blocks.1", 1), ("attention", "blocks.1#1", 1), ("mlp", "blocks.1.mlp.fc2", 1),
        ("attention", "tail", 2), ("attention", "tail#1", 3), ("mlp", "tail.mlp.fc2", 3),
        ("attention", "tail#2", 4), ("attention", "tail#3", 5), ("mlp", "tail.mlp.fc2#1", 5)]

def test_no_sites_no_diff(fresh_dynamo):
    g, removed, added = diff(Nothing(), tokens(0))
    assert not removed and not added
    assert g["gm"].code == g["code_before"]


def test_rejected_counted_and_graph_untouched(fresh_dynamo):
    g, removed, added = diff(SdpaPositional(), qkv(0), config=cfg(attn={"min_tokens": 10_000}))
    assert not removed and not added
    assert len(g["plan"].rejections) == 1
    assert fresh_dynamo["chipmunk"]["rejected"] == 1 and fresh_dynamo["chipmunk"]["attention_sites"] == 0


def test_torch_compile_options_path(fresh_dynamo):
    """The registered backend name, options and the wrapper attributes."""
    mod = ParallelBlock().eval()
    compiled = torch.compile(mod, backend="chipmunk", fullgraph=True,
                             options={"config": cfg(), "compiler": "eager", "chipmunk.attn.group": 8})
    with torch.no_grad():
        compiled(*tokens(0))
    import chipmunk_compile

    sessions = chipmunk_compile.runtime.sessions_of(mod)
    assert len(sessions) == 1 and sessions[0].config.attn.group == 8
    (plan,) = sessions[0].plans
    assert [s.kind for s in plan.sites] == ["attention", "mlp"]
