"""Models with fp32 weights run under torch.autocast, around the compiled call or inside the forward:
each chipmunk op gets its inputs in the autocast dtype, as the linears and SDPA it replaces would have
computed in (`chipmunk_compile.autocast_casts`). Before session 48 the MLP op raised a dtype error
(fp32 weights, bf16 activations) on its first call under autocast."""

import torch
import torch.fx as fx

from chipmunk_compile.autocast_casts import autocast_at, cast

from helpers import FULL_KEYS, cfg, chip, fresh_dynamo, max_rel, step_counts  # noqa: F401
from test_numerics import Block, Net, run, sparse_cfg

FULL = cfg(attn=dict(FULL_KEYS, full_step_every=4), mlp=dict(FULL_KEYS, full_step_every=4))
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


class MlpOnProjection(Block):
    """The MLP reads the attention's output projection: under autocast a bf16 activation beside the
    fp32 weights (a layer norm's output, as in `Block`, is fp32 under CPU autocast)."""

    def forward(self, x, mask=None):
        b, n, _ = x.shape
        y = self.n1(x)
        q, k, v = (lin(y).view(b, n, -1, x.shape[-1] // 2).transpose(1, 2) for lin in (self.q, self.k, self.v))
        h = self.o(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))
        return x + h + self.fc2(torch.nn.functional.gelu(self.fc1(h), approximate="tanh"))


def _net() -> Net:
    net = Net()
    for blk in net.blocks:
        blk.__class__ = MlpOnProjection
    return net.eval()


def _bf16_rel(outs, refs) -> float:
    assert all(o.dtype == r.dtype for o, r in zip(outs, refs))  # the residual stream stays fp32
    return max(max_rel(o.float(), r.float()) for o, r in zip(outs, refs))


def test_ambient_autocast_full_budget_matches_eager(fresh_dynamo):
    """fp32 weights, `with torch.autocast("cpu", bfloat16)` around the calls: dense, refresh and
    full-key sparse steps equal eager under the same autocast up to bf16 rounding, and sparse steps
    at a real budget stay as close as they are in fp32."""
    model = _net()
    with torch.autocast(**BF16):
        outs, refs = run(model, chip(model, FULL), 6)
    assert _bf16_rel(outs, refs) < 5e-3
    assert step_counts(model)["attention_sparse"] > 0 and step_counts(model)["mlp_sparse"] > 0
    torch._dynamo.reset()
    model = _net()
    with torch.autocast(**BF16):
        outs, refs = run(model, chip(model, sparse_cfg()), 6)
    torch._dynamo.reset()
    fp32 = _net()
    fp32_outs, fp32_refs = run(fp32, chip(fp32, sparse_cfg()), 6)
    assert _bf16_rel(outs, refs) < max(max_rel(o, r) for o, r in zip(fp32_outs, fp32_refs)) + 5e-3


class AutocastInside(torch.nn.Module):
    """A forward that runs its blocks under autocast itself and returns fp32."""

    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x, t):
        with torch.autocast(**BF16):
            y = self.net(x, t)
        return y.float()


def test_autocast_region_inside_the_forward(fresh_dynamo):
    model = AutocastInside().eval()
    outs, refs = run(model, chip(model, FULL), 6)
    assert all(o.dtype == torch.float32 for o in outs)
    assert max(max_rel(o, r) for o, r in zip(outs, refs)) < 5e-3
    assert step_counts(model)["mlp_sparse"] > 0


def test_autocast_at_follows_the_graphs_regions():
    """Inside an `_enter_autocast` / `_exit_autocast` pair the region's dtype, outside the ambient
    state (off here)."""
    g = fx.Graph()
    x = g.placeholder("x")
    before = g.call_function(torch.neg, (x,))
    enter = g.call_function(torch.amp.autocast_mode._enter_autocast, ("cpu", torch.float16, True, None))
    inside = g.call_function(torch.neg, (before,))
    g.call_function(torch.amp.autocast_mode._exit_autocast, (enter,))
    after = g.call_function(torch.neg, (inside,))
    g.output(after)
    at = autocast_at(g)
    assert (at(before, "cpu"), at(inside, "cpu"), at(after, "cpu")) == (None, torch.float16, None)
    assert at(inside, "cuda") is None
    with torch.autocast(**BF16):
        assert at(after, "cpu") == torch.bfloat16 and at(inside, "cpu") == torch.float16


def test_the_second_weight_is_cast_column_major():
    """The sparse mm2 reads w2 with stride(0) == 1; the cast hands it over in that layout, so the op
    makes no column-major copy of a tensor that is new on every call."""
    g = fx.Graph()
    w = g.placeholder("w")
    w.meta["val"] = torch.empty(8, 4)
    g.output(cast(g, w, torch.bfloat16, column_major=True))
    gm = fx.GraphModule(torch.nn.Module(), g)
    weight = torch.randn(8, 4)  # row-major, as nn.Linear keeps it
    out = gm(weight)
    assert out.dtype == torch.bfloat16 and out.stride(0) == 1 and torch.equal(out, weight.to(torch.bfloat16))
    assert cast(g, w, None) is w


class MaskedFillBand(torch.nn.Module):
    """Explicit attention that masks its scores with `masked_fill(~band, -inf)` (a boolean mask the
    op takes as a bias, inverted), on q/k/v projected under autocast."""

    def __init__(self, c=16, heads=2):
        super().__init__()
        self.qkv, self.heads = torch.nn.Linear(c, 3 * c), heads

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        idx = torch.arange(n, device=x.device)
        band = (idx[:, None] - idx[None, :]).abs() < n // 4
        s = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~band, float("-inf"))
        return x + (s.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c).float()


def test_masked_fill_mask_stays_boolean_under_autocast(fresh_dynamo):
    """The rewrite inverts the fill's mask after the autocast cast (which leaves booleans alone):
    an inverted node cast to bf16 would have turned the mask into a bias of 0s and 1s."""
    model = MaskedFillBand().eval()
    xs = [torch.randn(2, 32, 16, generator=torch.Generator().manual_seed(0)) * (1 + 0.02 * i) for i in range(5)]
    compiled = chip(model, cfg(attn=dict(FULL_KEYS, group=8, full_step_every=3), mlp={"enabled": False}))
    with torch.no_grad(), torch.autocast(**BF16):
        outs, refs = [compiled(x) for x in xs], [model(x) for x in xs]
    assert _bf16_rel(outs, refs) < 2e-2
    assert step_counts(model)["attention_sparse"] > 0
