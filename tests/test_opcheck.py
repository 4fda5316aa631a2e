"""torch.library.opcheck on both chipmunk ops, with a registered site that runs dense."""

import pytest
import torch
import torch.nn.functional as F

import chipmunk_compile.ops  # noqa: F401  (registers torch.ops.chipmunk)
from chipmunk_compile import ChipmunkConfig
from chipmunk_compile.ops.sites import Site
from chipmunk_compile.runtime import Session

from helpers import fresh_dynamo  # noqa: F401


@pytest.fixture
def dense_session():
    conf = ChipmunkConfig.from_any({"attn": {"first_n_dense_layers": 99, "min_tokens": 0},
                                    "mlp": {"first_n_dense_layers": 99, "min_tokens": 0}})
    session = Session(conf, None)
    session.tracker.advance(None)  # step 0
    return session


def _site(session, kind):
    c = session.config
    return Site(kind, "test", f"test.{kind}", 0, c.attn if kind == "attention" else c.mlp, session, {})


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("masks", ["none", "key", "bias", "key+bias", "bool pairs"])
def test_opcheck_attention(fresh_dynamo, dense_session, gqa, masks):
    site = _site(dense_session, "attention")
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, N, D = 2, 4, 2 if gqa else 4, 24, 8
    q = torch.randn(B, N, Hq, D, generator=g).transpose(1, 2)  # a permuted view, as diffusers passes
    k, v = torch.randn(B, Hkv, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    mask = bias = attn_mask = None
    if "key" in masks:
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[0, -5:] = False
        attn_mask = mask[:, None, None, :]
    if "bias" in masks:
        bias = torch.randn(N, N, generator=g)
        attn_mask = bias if mask is None else bias.masked_fill(~attn_mask, float("-inf"))
    if masks == "bool pairs":
        bias = attn_mask = torch.rand(Hq, N, N, generator=g) > 0.3
        bias[..., 0] = True
    for scale in (None, 0.3):
        args = (q, k, v, mask, scale, site.id) + ((bias,) if bias is not None else ())
        torch.library.opcheck(torch.ops.chipmunk.attention.default, args)
        out = torch.ops.chipmunk.attention(*args)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=gqa)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert out.shape == (B, Hq, N, D) and out.transpose(1, 2).is_contiguous()
    assert site.steps.get("dense", 0) > 0 and set(site.steps) == {"dense"}


@pytest.mark.parametrize("form", ["plain", "plain-nobias", "gated"])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu", "relu", "relu2"])
def test_opcheck_mlp(fresh_dynamo, dense_session, form, act):
    site = _site(dense_session, "mlp")
    g = torch.Generator().manual_seed(0)
    B, M, Cin, Fh, Cout = 2, 20, 8, 16, 6
    x = torch.randn(B, M, Cin, generator=g)
    w_act, w2 = torch.randn(Fh, Cin, generator=g), torch.randn(Cout, Fh, generator=g)
    b_act, b2 = torch.randn(Fh, generator=g), torch.randn(Cout, generator=g)
    w_lin = b_lin = None
    if form == "gated":
        w_lin, b_lin = torch.randn(Fh, Cin, generator=g), torch.randn(Fh, generator=g)
    if form == "plain-nobias":
        b_act = b2 = None
    args = (x, w_act, b_act, w_lin, b_lin, w2, b2, act, site.id)
    torch.library.opcheck(torch.ops.chipmunk.mlp.default, args)
    out = torch.ops.chipmunk.mlp(*args)
    acts = {"gelu": F.gelu, "gelu_tanh": lambda a: F.gelu(a, approximate="tanh"), "silu": F.silu, "relu": F.relu,
            "relu2": lambda a: F.relu(a).square()}
    h = acts[act](F.linear(x, w_act, b_act))
    if w_lin is not None:
        h = h * F.linear(x, w_lin, b_lin)
    torch.testing.assert_close(out, F.linear(h, w2, b2), rtol=1e-5, atol=1e-5)
    assert set(site.steps) == {"dense"}


def test_unknown_site_runs_exact_and_counts(fresh_dynamo):
    q = k = v = torch.randn(1, 2, 8, 4)
    out = torch.ops.chipmunk.attention(q, k, v, None, None, -12345)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    x, w1, w2 = torch.randn(1, 8, 4), torch.randn(6, 4), torch.randn(4, 6)
    out = torch.ops.chipmunk.mlp(x, w1, None, None, None, w2, None, "silu", -12345)
    torch.testing.assert_close(out, F.linear(F.silu(F.linear(x, w1)), w2))
    assert fresh_dynamo["chipmunk"]["fallback:unknown_site"] == 2
    torch.library.opcheck(torch.ops.chipmunk.attention.default, (q, k, v, None, None, -12345))
