"""Pattern matchers: one tiny hand-written module per supported spelling (matched, and the compiled
model reproduces eager), and one per unsupported form (rejected with the reason, or ignored)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import chipmunk_compile
from chipmunk_compile.patterns.fx_utils import source_to_path

from helpers import FULL_KEYS, ccount, cfg, chip, fresh_dynamo, matches_eager, max_rel, step_counts  # noqa: F401

B, H, N, D = 2, 2, 32, 8
C = H * D
SMALL = cfg(attn={"group": 8, **FULL_KEYS}, mlp={"block": 8, **FULL_KEYS})


def qkv(step, *, hq=H, hkv=H, nk=N, batch=B):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, hq, N, D, generator=g)
    k = torch.randn(batch, hkv, nk, D, generator=g)
    v = torch.randn(batch, hkv, nk, D, generator=g)
    d = 0.05 * step
    return q + d, k - d, v * (1 + d), torch.tensor([1000.0 - 100 * step])


def tokens(step, m=N, c=C, batch=B):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, m, c, generator=g) * (1 + 0.05 * step), torch.tensor([1000.0 - 100 * step])


def check(mod, make_args, *, attention=0, mlp=0, config=SMALL, steps=3, pattern=None, tol=1e-5):
    """inspect() finds exactly the expected sites; the compiled model matches eager on every step
    (dense, refresh and full-key sparse steps); the ops really ran."""
    mod = mod.eval()
    rep = chipmunk_compile.inspect(mod, *make_args(0), config=config)
    assert (rep.count("attention"), rep.count("mlp")) == (attention, mlp), str(rep)
    if pattern is not None:
        assert {s.pattern for s in rep.sites} == {pattern}, str(rep)
    sc = matches_eager(mod, config, [(make_args(i), {}) for i in range(steps)], tol=tol)
    if attention:
        assert sc.get("attention_dense", 0) + sc.get("attention_refresh", 0) + sc.get("attention_sparse", 0) == attention * steps
        assert steps < 3 or sc.get("attention_sparse", 0) > 0
    if mlp:
        assert sc.get("mlp_dense", 0) + sc.get("mlp_sparse", 0) == mlp * steps
        assert steps < 2 or sc.get("mlp_sparse", 0) > 0
    return rep


def rejected(mod, args, config=SMALL):
    rep = chipmunk_compile.inspect(mod.eval(), *args, config=config)
    assert not rep.sites, str(rep)
    return rep


# ---------------------------------------------------------------------------------------------
# attention: supported spellings
# ---------------------------------------------------------------------------------------------
class SdpaPositional(nn.Module):
    def forward(self, q, k, v, t):
        return F.scaled_dot_product_attention(q, k, v, None, 0.0, False)


class SdpaKeyword(nn.Module):
    def forward(self, q, k, v, t):
        return F.scaled_dot_product_attention(query=q, key=k, value=v, scale=0.3, dropout_p=0.0)


class SdpaGqa(nn.Module):
    def forward(self, q, k, v, t):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


class SdpaTransposedViews(nn.Module):
    """The diffusers layout: (B, N, H*D) projections viewed and transposed to (B, H, N, D)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.out = nn.Linear(C, C)

    def forward(self, x, t):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (y.view(b, n, H, D).transpose(1, 2) for y in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, n, C))


@pytest.mark.parametrize("mod", [SdpaPositional, SdpaKeyword], ids=["positional", "keyword"])
def test_sdpa(fresh_dynamo, mod):
    rep = check(mod(), qkv, attention=1, pattern="sdpa")
    assert rep.sites[0].shapes["q"] == (B, H, N, D)


def test_sdpa_keyword_scale_passed(fresh_dynamo):
    """The op must use scale=0.3, not 1/sqrt(D): a wrong scale fails the numerics in check()."""
    check(SdpaKeyword(), qkv, attention=1, steps=1)


def _attend(q, k, v, dropout_p=0.0, scale=0.3):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


def _attend_with_dropout(q, k, v, dropout_p=0.1):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


class SdpaThroughDefaults(nn.Module):
    """SDPA called through a function whose float defaults give dropout_p and scale, as diffusers'
    dispatch_attention_fn(..., dropout_p=0.0) does."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v, t):
        return self.fn(q, k, v)


def test_sdpa_float_defaults_under_dynamic_shapes(fresh_dynamo):
    """Under dynamic=True Dynamo passes float defaults in as 0-d tensors and SDPA gets their
    `.item()`: read as the defaults' numbers, dropout_p=0.0 is no dropout and scale=0.3 the scale
    the op uses (all keys attended: equal to eager). Until session 44 every such attention was
    rejected as "attention dropout". A default dropout of 0.1 stays rejected."""
    from torch._dynamo.utils import counters

    mod = SdpaThroughDefaults(_attend).eval()
    compiled = chip(mod, SMALL, dynamic=True)
    for i in range(3):
        torch.testing.assert_close(compiled(*qkv(i)), mod(*qkv(i)), rtol=1e-5, atol=1e-5)
    assert ccount("attention_sites") == 1 and ccount("attention_sparse") > 0
    counters.clear()
    torch._dynamo.reset()
    chip(SdpaThroughDefaults(_attend_with_dropout).eval(), SMALL, dynamic=True)(*qkv(0))
    assert ccount("attention_sites") == 0 and ccount("rejected") == 1


class ConvFeedForward(nn.Module):
    """Two 1x1 convolutions with a GELU between them over the (B, C, N) transpose of the tokens."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv1d(C, 4 * C, 1), nn.Conv1d(4 * C, C, 1)

    def forward(self, x, t):
        return self.fc2(F.gelu(self.fc1(x.transpose(1, 2)))).transpose(1, 2)


def test_conv_feed_forward_is_listed_as_rejected(fresh_dynamo):
    """A 1x1-convolution feed-forward is no MLP site (only linears are matched), and inspect() now
    says so instead of nothing; a 3-wide convolution pair is no feed-forward and is not listed."""
    rep = rejected(ConvFeedForward(), tokens(0))
    rows = [r for r in rep.rejected if r.pattern == "conv_feed_forward"]
    assert len(rows) == 1 and rows[0].kind == "mlp" and "1x1 convolution" in rows[0].reason, str(rep)
    wide = ConvFeedForward()
    wide.fc1 = nn.Conv1d(C, 4 * C, 3, padding=1)
    assert not [r for r in rejected(wide, tokens(0)).rejected if r.pattern == "conv_feed_forward"]


def test_sdpa_gqa(fresh_dynamo):
    rep = check(SdpaGqa(), lambda i: qkv(i, hq=4, hkv=2), attention=1)
    assert rep.sites[0].shapes["k"] == (B, 2, N, D)


def test_sdpa_transposed_views(fresh_dynamo):
    check(SdpaTransposedViews(), tokens, attention=1)


class SdpaKeyPadding(nn.Module):
    def forward(self, q, k, v, mask, t):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _padding_args(i, shape=(B, 1, 1, N)):
    q, k, v, t = qkv(i)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, N - 5:] = False
    mask[1, :3] = False
    return q, k, v, mask.view(*shape) if shape[0] == B else mask[:1].view(*shape), t


def test_sdpa_bool_key_padding_mask(fresh_dynamo):
    rep = check(SdpaKeyPadding(), _padding_args, attention=1)
    assert rep.sites[0].shapes["mask"] == (B, 1, 1, N)


def test_sdpa_broadcast_key_padding_masks(fresh_dynamo):
    check(SdpaKeyPadding(), lambda i: _padding_args(i, (1, 1, 1, N)), attention=1)
    torch._dynamo.reset()
    check(SdpaKeyPadding(), lambda i: _padding_args(i, (1, N)), attention=1)


class ExplicitMul(nn.Module):
    def forward(self, q, k, v, t):
        s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(D))
        return torch.matmul(s.softmax(dim=-1), v)


class ExplicitMulLeft(nn.Module):
    def forward(self, q, k, v, t):
        s = 0.25 * (q @ k.transpose(-2, -1))
        return F.softmax(s, dim=-1) @ v


class ExplicitDiv(nn.Module):
    def forward(self, q, k, v, t):
        s = q @ k.transpose(-2, -1) / math.sqrt(D)
        return torch.softmax(s, dim=-1) @ v


class ExplicitBaddbmm(nn.Module):
    """diffusers `Attention.get_attention_scores`: 3-D (B*H, N, D), baddbmm with beta=0."""

    def forward(self, q, k, v, t):
        q, k, v = (x.reshape(B * H, N, D) for x in (q, k, v))
        empty = torch.empty(B * H, N, N, dtype=q.dtype)
        s = torch.baddbmm(empty, q, k.transpose(-1, -2), beta=0, alpha=0.3)
        p = s.softmax(dim=-1)
        return torch.bmm(p, v).reshape(B, H, N, D)


class ExplicitUpcast(nn.Module):
    def forward(self, q, k, v, t):
        s = (q @ k.transpose(-1, -2)) * 0.35
        p = s.float().softmax(dim=-1).to(q.dtype)
        p = F.dropout(p, p=0.0)
        return p @ v


class ExplicitEinsum(nn.Module):
    """The einsum spelling of research code (named or ellipsis batch subscripts, the scale on q),
    optionally with the row max subtracted before the softmax, as numerically careful code does."""

    def __init__(self, qk="b h i d, b h j d -> b h i j", pv="b h i j, b h j d -> b h i d", stabilize=None):
        super().__init__()
        self.qk, self.pv, self.stabilize = qk, pv, stabilize

    def forward(self, q, k, v, t):
        s = torch.einsum(self.qk, q * 0.3, k)
        if self.stabilize == "amax":
            s = s - s.amax(dim=-1, keepdim=True).detach()
        elif self.stabilize == "max":
            s = s - torch.max(s, dim=-1, keepdim=True).values
        return torch.einsum(self.pv, [s.softmax(dim=-1), v])  # the operand-list form


@pytest.mark.parametrize("mod", [ExplicitMul, ExplicitMulLeft, ExplicitDiv, ExplicitBaddbmm, ExplicitUpcast,
                                 ExplicitEinsum, lambda: ExplicitEinsum("...xc,...yc->...xy", "...xy,...yc->...xc"),
                                 lambda: ExplicitEinsum(stabilize="amax"), lambda: ExplicitEinsum(stabilize="max")],
                         ids=["mul", "mul-left", "div", "baddbmm", "upcast", "einsum", "einsum-ellipsis",
                              "einsum-amax", "einsum-max"])
def test_explicit_attention(fresh_dynamo, mod):
    check(mod(), qkv, attention=1, pattern="explicit")


class ExplicitMixedPrecision(nn.Module):
    """Half-precision q/k/v with the scores computed in float32: q and k upcast before the product
    (`upcast="qk"`: a site, on the half-precision q/k), or only v upcast (`upcast="v"`: q, k and v
    of different dtypes, rejected)."""

    def __init__(self, upcast):
        super().__init__()
        self.upcast = upcast

    def forward(self, q, k, v, t):
        q, k, v = (x.to(torch.bfloat16) for x in (q, k, v))
        if self.upcast == "qk":
            p = (q.float() @ k.float().transpose(-1, -2) * 0.3).softmax(dim=-1).to(v.dtype)
            return (p @ v).float()
        p = (q @ k.transpose(-1, -2) * 0.3).float().softmax(dim=-1)
        return p @ v.float()


def test_explicit_attention_with_exact_upcasts(fresh_dynamo):
    """Before: the site took float32 q/k and a bfloat16 v, and the op raised on the first call."""
    rep = check(ExplicitMixedPrecision("qk"), qkv, attention=1, pattern="explicit", tol=2e-2)
    assert rep.sites[0].shapes["q"] == (B, H, N, D)


def test_explicit_attention_of_mixed_dtypes_is_rejected(fresh_dynamo):
    mod = ExplicitMixedPrecision("v").eval()
    rep = rejected(mod, qkv(0))
    assert [r for r in rep.rejected if "different dtypes" in r.reason], str(rep)
    cm = chip(mod, SMALL)
    with torch.no_grad():
        assert max_rel(cm(*qkv(1)), mod(*qkv(1))) < 1e-6


class ExplicitMaskedFill(nn.Module):
    """Research code's masking: the scores' masked_fill(~keep, -inf) (or a large negative), with
    `keep` a (B, 1, 1, N) key-padding mask (`form="keys"`), a (N, N) banded mask (`form="band"`:
    a bias) or, on (B*H, N, N) baddbmm scores, a (B*H, 1, N) one (`form="3d"`); the softmax
    written out (`e / e.sum(-1, keepdim=True)`) with `written=True`."""

    def __init__(self, form="keys", written=False, value=float("-inf")):
        super().__init__()
        self.form, self.written, self.value = form, written, value

    def forward(self, q, k, v, t):
        b, h, n, d = q.shape
        keep = torch.ones(b, 1, 1, n, dtype=torch.bool)
        keep[1, ..., n - 3:] = False  # the second item's last three keys are padding
        if self.form == "band":
            idx = torch.arange(n)
            keep = (idx[:, None] - idx[None, :]).abs() < n // 2
        if self.form == "3d":
            q, k, v = (x.reshape(b * h, n, d) for x in (q, k, v))
            keep = keep.expand(b, h, 1, n).reshape(b * h, 1, n)
            s = torch.baddbmm(torch.empty(b * h, n, n), q, k.transpose(1, 2), beta=0, alpha=0.3)
        else:
            s = q @ k.transpose(-1, -2) * 0.3
        s = s.masked_fill(~keep, self.value)
        if self.written:
            e = (s - s.amax(dim=-1, keepdim=True)).exp()
            p = e / e.sum(dim=-1, keepdim=True)
        else:
            p = s.softmax(dim=-1)
        o = p @ v
        return o.reshape(b, h, n, d)


@pytest.mark.parametrize("form, written, value", [
    ("keys", False, float("-inf")), ("keys", True, float("-inf")), ("keys", False, -1e9),
    ("band", False, float("-inf")), ("3d", True, torch.finfo(torch.float32).min),
])
def test_explicit_attention_masked_fill_and_written_out_softmax(fresh_dynamo, form, written, value):
    """Before: a masked_fill between the scores and the softmax, or a softmax written out as
    exp / sum, left the attention unmatched (no site, nothing in inspect's rejected list)."""
    rep = check(ExplicitMaskedFill(form, written, value), qkv, attention=1, pattern="explicit")
    assert rep.sites[0].shapes["q"] == ((B, H, N, D) if form != "3d" else (B * H, N, D))


class ExplicitMaskedFillAndBias(nn.Module):
    def forward(self, q, k, v, t):
        s = q @ k.transpose(-1, -2) * 0.3 + torch.ones(N, N)
        keep = torch.ones(q.shape[0], 1, 1, N, dtype=torch.bool)
        return s.masked_fill(~keep, float("-inf")).softmax(dim=-1) @ v


class ExplicitSmallFill(nn.Module):
    """A fill of -1 is no mask: exp(-1) is not 0."""

    def forward(self, q, k, v, t):
        keep = torch.ones(q.shape[0], 1, 1, N, dtype=torch.bool)
        return (q @ k.transpose(-1, -2) * 0.3).masked_fill(~keep, -1.0).softmax(dim=-1) @ v


def test_explicit_attention_masked_fill_not_matched(fresh_dynamo):
    rep = rejected(ExplicitMaskedFillAndBias(), qkv(0))
    assert [r for r in rep.rejected if "masked fill and an added bias" in r.reason], str(rep)
    rep = rejected(ExplicitSmallFill(), qkv(0))
    assert not rep.rejected, str(rep)


@pytest.mark.parametrize("qk, pv, stabilize", [
    ("bhid,bhjd->bhji", "bhji,bhjd->bhid", None),  # scores transposed: softmax over the queries
    ("bhid,bhjd->bhij", "bhij,bhid->bhjd", None),  # not P·V
    ("bhid,bhjd->bhij", "bhij,bhjd->bhid", "min"),  # the row min subtracted: not the shift-free form
    # a trailing ellipsis contracts every feature axis (here heads and head dim together)
    ("bi...,bj...->bij", "bij,bj...->bi...", None),
])
def test_einsum_that_is_not_attention_is_left_alone(fresh_dynamo, qk, pv, stabilize):
    class Other(ExplicitEinsum):
        def forward(self, q, k, v, t):
            s = torch.einsum(self.qk, q, k)
            if self.stabilize == "min":
                s = s - s.amin(dim=-1, keepdim=True)
            return torch.einsum(self.pv, s.softmax(dim=-1), v)

    mod = Other(qk, pv, stabilize).eval()
    rep = chipmunk_compile.inspect(mod, *qkv(0), config=SMALL)
    assert not rep.sites, str(rep)
    cm = chip(mod, SMALL)
    with torch.no_grad():
        assert max_rel(cm(*qkv(1)), mod(*qkv(1))) < 1e-6


class AtenSdpa(nn.Module):
    """An SDPA backend op called directly, as diffusers' `_native_cudnn` backend does under context
    parallelism. Those ops need a GPU (flash_for_cpu aside), so eager runs F.sdpa: the same values,
    and the compiled graph, traced with fake tensors, holds the op itself."""

    def __init__(self, op: str, use_lse: bool = False):
        super().__init__()
        self.op, self.use_lse = op, use_lse

    def forward(self, q, k, v, t):
        if not torch.compiler.is_compiling():
            return F.scaled_dot_product_attention(q, k, v, scale=0.3)
        fn = getattr(torch.ops.aten, self.op)
        if self.op in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_efficient_attention"):
            res = fn(q, k, v, None, self.use_lse, scale=0.3)
        else:
            res = fn(q, k, v, scale=0.3)
        return res[0] + 0 * res[1].sum() if self.use_lse else res[0]


ATEN_OPS = ["_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu"]


@pytest.mark.parametrize("op", ATEN_OPS)
def test_sdpa_backend_ops(fresh_dynamo, op):
    # not through check(): inspect() runs the traced graph, whose op needs a GPU; the rewritten one does not
    mod = AtenSdpa(op).eval()
    cm = chip(mod, SMALL)
    with torch.no_grad():
        for i in range(3):
            assert max_rel(cm(*qkv(i)), mod(*qkv(i))) < 1e-5
    sites = chipmunk_compile.stats(mod)["sites"]
    assert [s["kind"] for s in sites] == ["attention"] and sites[0]["steps"].get("sparse", 0) == 1


# ---------------------------------------------------------------------------------------------
# attention: rejected / ignored
# ---------------------------------------------------------------------------------------------
def test_reject_sdpa_backend_op_with_used_lse(fresh_dynamo):
    """Ring attention merges per-shard results by their log-sum-exp: not a whole attention (the CPU
    flash op: inspect() runs the traced graph)."""
    assert "log-sum-exp" in _reason(rejected(AtenSdpa(ATEN_OPS[3], use_lse=True), qkv(0)))


def _reason(rep):
    assert len(rep.rejected) == 1, str(rep)
    return rep.rejected[0].reason


class Causal(nn.Module):
    def forward(self, q, k, v, t):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Dropout(nn.Module):
    def forward(self, q, k, v, t):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1)


def test_reject_causal(fresh_dynamo):
    assert "causal" in _reason(rejected(Causal(), qkv(0)))


def test_reject_cross_attention(fresh_dynamo):
    rep = rejected(SdpaPositional(), qkv(0, nk=12))
    assert "cross-attention" in _reason(rep)
    rep = rejected(ExplicitMul(), qkv(0, nk=12))
    assert "cross-attention" in _reason(rep)


def test_reject_dropout(fresh_dynamo):
    assert "dropout" in _reason(rejected(Dropout(), qkv(0)))


class Flex(nn.Module):
    def forward(self, q, k, v, t):
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, score_mod=lambda score, b, h, i, j: score + 0.01 * (i - j))


def test_reject_flex_attention(fresh_dynamo):
    """flex_attention runs arbitrary code per score: never rewritten, but named among the rejected
    (a model that only uses it would otherwise show no attention at all), and exact when compiled."""
    args = qkv(0)
    assert "flex_attention" in _reason(rejected(Flex(), args))
    with torch.no_grad():
        assert max_rel(chip(Flex(), SMALL)(*args), Flex()(*args)) < 1e-5


def test_reject_too_short(fresh_dynamo):
    rep = rejected(SdpaPositional(), qkv(0), config=cfg(attn={"min_tokens": 64}))
    assert "too short" in _reason(rep)


def test_disabled_by_override(fresh_dynamo):
    rep = rejected(SdpaPositional(), qkv(0), config=cfg(attn={"enabled": False}))
    assert "disabled" in _reason(rep)


class LinearAttention(nn.Module):
    """Sana-style ReLU linear attention: no softmax anywhere."""

    def forward(self, q, k, v, t):
        q, k = F.relu(q), F.relu(k)
        kv = k.transpose(-1, -2) @ v
        num = q @ kv
        den = q @ k.sum(dim=-2, keepdim=True).transpose(-1, -2)
        return num / (den + 1e-6)


def test_linear_attention_never_matches(fresh_dynamo):
    rep = rejected(LinearAttention(), qkv(0))
    assert not rep.rejected
    # the report says that nothing of either kind was found, instead of an empty table
    assert "no softmax attention" in str(rep) and "no linear → activation → linear MLP" in str(rep)
    found = str(check(SdpaPositional(), qkv, attention=1))
    assert "no softmax attention" not in found and "no linear → activation" in found


class ProbsReused(nn.Module):
    def forward(self, q, k, v, t):
        p = (q @ k.transpose(-1, -2) * 0.3).softmax(-1)
        return p @ v, p.mean()


def test_explicit_probs_with_other_users(fresh_dynamo):
    assert "other users" in _reason(rejected(ProbsReused(), qkv(0)))


# ---------------------------------------------------------------------------------------------
# MLP: supported forms
# ---------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    def __init__(self, act, bias=True, dropout=False, hidden=4 * C):
        super().__init__()
        self.fc1 = nn.Linear(C, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, C, bias=bias)
        self.act, self.dropout = act, dropout

    def forward(self, x, t):
        h = self.act(self.fc1(x))
        if self.dropout:
            h = F.dropout(h, p=0.0, training=self.training)
        return self.fc2(h)


ACTS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
    "relu_module": nn.ReLU(),
    "gelu_module": nn.GELU(approximate="tanh"),
    "relu2": lambda x: F.relu(x).square(),  # squared relu (Nemotron, Primer)
    "relu2_pow": lambda x: torch.relu(x) ** 2,
}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", list(ACTS))
def test_mlp_plain(fresh_dynamo, act, bias):
    mod = Mlp(ACTS[act], bias=bias)
    check(mod, tokens, mlp=1, pattern="mlp")
    expected = {"relu_module": "relu", "gelu_module": "gelu_tanh", "relu2_pow": "relu2"}.get(act, act)
    plan_acts = {getattr(s, "act", None) for s in chipmunk_compile.runtime.sessions_of(mod)[0].sites}
    assert plan_acts == {expected}


def test_mlp_dropout_p0_between(fresh_dynamo):
    check(Mlp(F.gelu, dropout=True), tokens, mlp=1)


def test_mlp_4d_tokens(fresh_dynamo):
    check(Mlp(F.gelu), lambda i: (tokens(i)[0].view(B, 2, N // 2, C), tokens(i)[1]), mlp=1)


def test_mlp_sequence_first(fresh_dynamo):
    """(S, B, C) with a short second axis (ERNIE-Image): token blocks run along S, through a
    transposed view; below 256 tokens the same layout reads as (B, S, C) as before."""
    def seq_first(i, m=256):
        x, t = tokens(i, m=m)
        return x.transpose(0, 1).contiguous(), t

    rep = check(Mlp(F.gelu), seq_first, mlp=1)
    assert rep.sites[0].shapes["x"] == (B, 256, C)
    short = chipmunk_compile.inspect(Mlp(F.gelu).eval(), *seq_first(0, m=64), config=SMALL)
    assert short.sites[0].shapes["x"] == (64, B, C)


class Gated(nn.Module):
    """diffusers GEGLU / SwiGLU: one linear producing both halves, `.chunk(2, -1)`."""

    def __init__(self, act, act_first, bias=True):
        super().__init__()
        self.proj = nn.Linear(C, 2 * 3 * C, bias=bias)
        self.out = nn.Linear(3 * C, C, bias=bias)
        self.act, self.act_first = act, act_first

    def forward(self, x, t):
        a, b = self.proj(x).chunk(2, dim=-1)
        h = self.act(a) * b if self.act_first else b * self.act(a)
        return self.out(h)


class GatedSecondHalf(Gated):
    def forward(self, x, t):
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(hidden * self.act(gate))  # diffusers GEGLU: the second half is activated


@pytest.mark.parametrize("cls", [Gated, GatedSecondHalf], ids=["act-first-half", "act-second-half"])
@pytest.mark.parametrize("act_first", [True, False], ids=["act*lin", "lin*act"])
@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_mlp_gated_chunk(fresh_dynamo, cls, act_first, act):
    check(cls(ACTS[act], act_first), tokens, mlp=1, pattern="mlp-gated")


def test_mlp_gated_chunk_nobias(fresh_dynamo):
    check(Gated(F.silu, True, bias=False), tokens, mlp=1, pattern="mlp-gated")


class GatedSliced(Gated):
    """Flux2's SwiGLU, fused into the first linear: the halves are slices, not a chunk."""

    def __init__(self, act, act_first, bias=True, index="ellipsis"):
        super().__init__(act, act_first, bias)
        self.index = index

    def forward(self, x, t):
        y = self.proj(x)
        half = y.shape[-1] // 2
        if self.index == "ellipsis":
            a, b = y[..., :half], y[..., half:]
        else:  # every dim spelled out, the second half as an explicit stop
            a, b = y[:, :, :half], y[:, :, half:2 * half]
        return self.out(self.act(a) * b if self.act_first else b * self.act(a))


@pytest.mark.parametrize("index", ["ellipsis", "full"])
@pytest.mark.parametrize("act_first", [True, False], ids=["act*lin", "lin*act"])
def test_mlp_gated_sliced_halves(fresh_dynamo, index, act_first):
    check(GatedSliced(F.silu, act_first, index=index), tokens, mlp=1, pattern="mlp-gated")


class GatedOddSlices(Gated):
    def forward(self, x, t):
        y = self.proj(x)
        return self.out(F.silu(y[..., 1:3 * C + 1]) * y[..., 3 * C:])  # overlapping slices, not the halves


def test_mlp_sliced_but_not_halves_is_not_gated(fresh_dynamo):
    check(GatedOddSlices(F.silu, True), tokens, mlp=0)


class FusedParallel(nn.Module):
    """Flux2's single block: one linear projects q/k/v and both SwiGLU halves; the output linear
    takes cat(attention, MLP hidden)."""

    F_ = 3 * C

    def __init__(self, bias=False, spelling="split"):
        super().__init__()
        self.proj = nn.Linear(C, 3 * C + 2 * self.F_, bias=bias)
        self.out = nn.Linear(C + self.F_, C, bias=bias)
        self.spelling = spelling

    def forward(self, x, t):
        y = self.proj(x)
        if self.spelling == "plain":  # one activated range, no gate; an unused tail of the projection
            qkv_, m = y[..., :3 * C], y[..., 3 * C:3 * C + self.F_]
            q, k, v = (t_.unflatten(-1, (H, D)).transpose(1, 2) for t_ in qkv_.chunk(3, dim=-1))
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            return self.out(torch.cat([o, F.gelu(m, approximate="tanh")], dim=-1))
        if self.spelling == "split":
            qkv_, m = y.split([3 * C, 2 * self.F_], dim=-1)
            a, b = m[..., :self.F_], m[..., self.F_:]
        else:  # slices of the fused output itself, the MLP part first
            m = y[..., :2 * self.F_]
            qkv_ = y[..., 2 * self.F_:]
            a, b = m.chunk(2, dim=-1)
        q, k, v = (t_.unflatten(-1, (H, D)).transpose(1, 2) for t_ in qkv_.chunk(3, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.out(torch.cat([o, F.silu(a) * b], dim=-1))


@pytest.mark.parametrize("spelling", ["split", "slices", "plain"])
@pytest.mark.parametrize("bias", [False, True])
def test_mlp_fused_with_qkv(fresh_dynamo, bias, spelling):
    """The MLP halves are found inside the fused projection; q/k/v get a dense linear of their own
    rows and the fused linear (MLP columns included) is gone from the graph."""
    from chipmunk_compile.rewrite import rewrite
    from chipmunk_compile.runtime import Session

    mod = FusedParallel(bias, spelling)
    check(mod, tokens, attention=1, mlp=1, pattern=None)
    widths = []

    def backend(gm, example_inputs, **_):
        config = chipmunk_compile.ChipmunkConfig.from_any(SMALL)
        rewrite(gm, config, Session(config, None), example_inputs=example_inputs)
        widths.extend(n.meta["example_value"].shape[-1] for n in gm.graph.nodes
                      if n.op == "call_function" and n.target is torch._C._nn.linear and "example_value" in n.meta)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(mod.eval(), backend=backend)(*tokens(0))
    assert 3 * C + 2 * FusedParallel.F_ not in widths and 3 * C in widths, widths


class FusedWholeUsed(FusedParallel):
    def forward(self, x, t):
        y = self.proj(x)
        a, b = y[..., 3 * C:3 * C + self.F_], y[..., 3 * C + self.F_:]
        return self.out(torch.cat([y[..., :C] + y.mean(-1, keepdim=True), F.silu(a) * b], dim=-1))


def test_mlp_fused_linear_needed_whole_is_left_alone(fresh_dynamo):
    check(FusedWholeUsed(), tokens, mlp=0)


class SwiGLU2(nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        self.w1 = nn.Linear(C, 3 * C, bias=bias)
        self.w3 = nn.Linear(C, 3 * C, bias=bias)
        self.w2 = nn.Linear(3 * C, C, bias=bias)

    def forward(self, x, t):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


@pytest.mark.parametrize("bias", [False, True])
def test_mlp_two_linear_swiglu(fresh_dynamo, bias):
    check(SwiGLU2(bias), tokens, mlp=1, pattern="mlp-gated")


class Fp32Activation(nn.Module):
    """Activations evaluated in fp32 between casts (diffusers' FP32SiLU in Lumina's feed-forward)."""

    def __init__(self, form):
        super().__init__()
        self.w1 = nn.Linear(C, (6 if form == "geglu" else 3) * C)
        self.w3 = nn.Linear(C, 3 * C)
        self.w2 = nn.Linear(3 * C, C)
        self.form = form

    def forward(self, x, t):
        if self.form == "plain":
            return self.w2(F.gelu(self.w1(x).float(), approximate="tanh").to(x.dtype))
        if self.form == "swiglu":
            return self.w2(F.silu(self.w1(x).float()).to(x.dtype) * self.w3(x))
        hidden, gate = self.w1(x).chunk(2, dim=-1)  # GEGLU with the gate in fp32
        return self.w2(hidden * F.gelu(gate.float()).to(x.dtype))


@pytest.mark.parametrize("form,pattern", [("plain", "mlp"), ("swiglu", "mlp-gated"), ("geglu", "mlp-gated")])
def test_mlp_fp32_activation_casts(fresh_dynamo, form, pattern):
    check(Fp32Activation(form), tokens, mlp=1, pattern=pattern)


class ParallelBlock(nn.Module):
    """Flux / HunyuanVideo single block: proj_out(cat(attn, gelu(proj_mlp(x))))."""

    def __init__(self, mlp_first=False):
        super().__init__()
        self.qkv = nn.Linear(C, 3 * C)
        self.proj_mlp = nn.Linear(C, 4 * C)
        self.proj_out = nn.Linear(C + 4 * C, C)
        self.mlp_first = mlp_first

    def forward(self, x, t):
        b, n, _ = x.shape
        q, k, v = (y.view(b, n, H, D).transpose(1, 2) for y in self.qkv(x).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, C)
        m = F.gelu(self.proj_mlp(x), approximate="tanh")
        parts = [m, a] if self.mlp_first else [a, m]
        return x + self.proj_out(torch.cat(parts, dim=2))


@pytest.mark.parametrize("mlp_first", [False, True], ids=["attn-first", "mlp-first"])
def test_mlp_parallel_cat(fresh_dynamo, mlp_first):
    rep = check(ParallelBlock(mlp_first), tokens, attention=1, mlp=1)
    assert [s.pattern for s in rep.sites] == ["sdpa", "mlp-parallel"]


class TwoBlocks(nn.Module):
    """Site output feeding the next site directly (mlp output -> next mlp input)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = Mlp(F.gelu), Mlp(F.silu)

    def forward(self, x, t):
        return self.b(self.a(x, t), t)


def test_chained_sites(fresh_dynamo):
    rep = check(TwoBlocks(), tokens, mlp=2)
    assert [s.path for s in rep.sites] == ["a.fc2", "b.fc2"]


# ---------------------------------------------------------------------------------------------
# MLP: rejected / ignored
# ---------------------------------------------------------------------------------------------
def test_mlp_unsupported_activation(fresh_dynamo):
    rep = rejected(Mlp(torch.sigmoid), tokens(0))
    assert "unsupported activation" in _reason(rep)
    rep = rejected(Mlp(F.mish), tokens(0))
    assert "unsupported activation" in _reason(rep)


class HiddenTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x, t):
        h = F.gelu(self.fc1(x))
        return self.fc2(h) + h.mean(dim=-1, keepdim=True)


class PreActTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x, t):
        a = self.fc1(x)
        return self.fc2(F.gelu(a)) + a.mean(dim=-1, keepdim=True)


def test_mlp_hidden_used_twice(fresh_dynamo):
    rejected(HiddenTwice(), tokens(0))
    rep = rejected(PreActTwice(), tokens(0))
    assert "other users" in _reason(rep)


def test_mlp_too_short_and_rank2(fresh_dynamo):
    rep = rejected(Mlp(F.gelu), tokens(0), config=cfg(mlp={"min_tokens": 64}))
    assert "too short" in _reason(rep)
    x, t = tokens(0)
    rep = rejected(Mlp(F.silu), (x[:, 0], t))  # (B, C): a conditioning MLP, no token axis
    assert "no token dimension" in _reason(rep)


def test_plain_linears_are_not_candidates(fresh_dynamo):
    class TwoLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(C, C), nn.Linear(C, C)

        def forward(self, x, t):
            return self.b(self.a(x) * 2.0)

    rep = rejected(TwoLinears(), tokens(0))
    assert not rep.rejected


class Nothing(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(C, C, 3, padding=1)
        self.norm = nn.LayerNorm(C)

    def forward(self, x, t):
        return self.norm(self.conv(x.transpose(1, 2)).transpose(1, 2)) * t


def test_nothing_to_match_runs_unchanged(fresh_dynamo):
    mod = Nothing().eval()
    cm = chip(mod, SMALL)
    with torch.no_grad():
        for i in range(3):
            args = tokens(i)
            torch.testing.assert_close(cm(*args), mod(*args), rtol=0, atol=0)
    c = fresh_dynamo["chipmunk"]
    assert c["graphs"] == 1 and c["attention_sites"] == 0 and c["mlp_sites"] == 0
    assert chipmunk_compile.stats(mod)["sites"] == []


def test_source_to_path_spellings():
    assert source_to_path("L['self'].blocks.0.attn") == "blocks.0.attn"
    assert source_to_path("L['self']._modules['blocks']._modules['0']._modules['attn']") == "blocks.0.attn"
    assert source_to_path("L['self'].__dict__['_modules']['transformer_blocks'].0.ff.net.2") == "transformer_blocks.0.ff.net.2"
    assert source_to_path("L['self']") == ""


def _repeat_kv(y, how):
    """Grouped-query keys or values (B, H // 2, n, D) repeated to the H query heads, as `how` spells it
    (None: y has H heads already)."""
    if how == "repeat_interleave":
        return y.repeat_interleave(2, dim=1)
    if how == "expand":  # transformers' repeat_kv
        b, hkv, n, d = y.shape
        return y[:, :, None].expand(b, hkv, 2, n, d).reshape(b, 2 * hkv, n, d)
    return y


class CrossSameLength(nn.Module):
    """Cross-attention whose context happens to have as many tokens as the queries (8 audio tokens
    attending to 8 text tokens): queries from x, keys and values from another sequence."""

    def __init__(self, from_context=True, kv_repeat=None):
        super().__init__()
        self.from_context, self.kv_repeat = from_context, kv_repeat
        self.norm = nn.LayerNorm(C)
        kv = C // 2 if kv_repeat else C  # grouped-query heads: half as many k/v heads, repeated
        self.to_q, self.out = nn.Linear(C, C), nn.Linear(C, C)
        self.to_k, self.to_v = nn.Linear(C, kv), nn.Linear(C, kv)

    def forward(self, x, ctx, t):
        b, n, _ = x.shape
        h = self.norm(x)
        src = ctx if self.from_context else h
        q, k, v = (y.view(b, -1, y.shape[-1] // D, D).transpose(1, 2)
                   for y in (self.to_q(h), self.to_k(src), self.to_v(src)))
        k, v = _repeat_kv(k, self.kv_repeat), _repeat_kv(v, self.kv_repeat)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, C))


@pytest.mark.parametrize("kv_repeat", [None, "repeat_interleave", "expand"])
def test_reject_cross_attention_of_equal_lengths(fresh_dynamo, kv_repeat):
    """Also with grouped-query keys repeated to the query heads (until session 70 the repeat ended the
    walk up to the keys' projection, and such a cross-attention became a site)."""
    x, t = tokens(0)
    ctx = torch.randn(B, N, C, generator=torch.Generator().manual_seed(5))
    rep = chipmunk_compile.inspect(CrossSameLength(kv_repeat=kv_repeat).eval(), x, ctx, t, config=SMALL)
    assert rep.count("attention") == 0 and "different token streams" in _reason(rep), str(rep)
    # the same module attending to its own tokens is self-attention
    own = chipmunk_compile.inspect(CrossSameLength(False, kv_repeat).eval(), x, ctx, t, config=SMALL)
    assert own.count("attention") == 1, str(own)



def test_a_candidate_with_data_dependent_sizes_stays_dense(fresh_dynamo, monkeypatch):
    """A size only known at run time (unbacked, e.g. FramePack's text length under
    capture_scalar_outputs) raises inside a pattern's checks: that candidate is rejected with the
    reason and the graph still compiles, instead of failing the whole backend."""
    import sympy
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    from chipmunk_compile import rewrite as rw
    from chipmunk_compile.patterns.registry import Pattern

    real = rw.registered_patterns()

    def raising(match):
        def checked(node, ctx):  # the real pattern, raising where it would have decided
            if match(node, ctx) is not None:
                raise GuardOnDataDependentSymNode(sympy.true, "Could not guard on data-dependent expression Ne(u0, u1)")
            return None
        return checked

    monkeypatch.setattr(rw, "registered_patterns", lambda: [
        Pattern(p.name, p.kind, raising(p.match) if p.kind == "attention" else p.match) for p in real])
    mod = SdpaTransposedViews().eval()
    x, t = tokens(0)
    rep = chipmunk_compile.inspect(mod, x, t, config=SMALL)
    assert rep.count("attention") == 0 and "data-dependent sizes" in _reason(rep), str(rep)
    with torch.no_grad():
        assert torch.allclose(chip(mod, SMALL)(x, t), mod(x, t), atol=1e-6)


class BlockWithCrossOnly(nn.Module):
    """A block whose only attention is rejected (causal) and an MLP."""

    def __init__(self):
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))

    def forward(self, x, ctx):
        b, n, _ = x.shape
        q = x.view(b, n, H, D).transpose(1, 2)
        kv = (x + ctx.mean(1, keepdim=True)).view(b, -1, H, D).transpose(1, 2)
        x = x + F.scaled_dot_product_attention(q, kv, kv, is_causal=True).transpose(1, 2).reshape(b, n, C)
        return x + self.ff(x)


class CrossOnlyStack(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.blocks = nn.ModuleList([BlockWithCrossOnly() for _ in range(n)])

    def forward(self, x, ctx, t):
        for blk in self.blocks:
            x = blk(x, ctx)
        return x


def test_mlp_layers_count_blocks_when_every_attention_is_rejected(fresh_dynamo):
    """No attention layer to count: the MLPs are numbered by their block (0, 1, 2), so
    first_n_dense_layers keeps the first blocks dense, not every block."""
    x, t = tokens(0)
    ctx = torch.randn(B, 8, C, generator=torch.Generator().manual_seed(5))
    rep = chipmunk_compile.inspect(CrossOnlyStack().eval(), x, ctx, t, config=SMALL)
    assert rep.count("attention") == 0 and [s.layer for s in rep.sites] == [0, 1, 2], str(rep)


class JointKeys(nn.Module):
    """PRX: image queries attend to cat(text keys, image keys); the text has its own projections."""

    def __init__(self, text_first=True, own_keys=True, rope=False, kv_repeat=None):
        super().__init__()
        self.text_first, self.own_keys, self.rope, self.kv_repeat = text_first, own_keys, rope, kv_repeat
        kv = C // 2 if kv_repeat else C  # grouped-query heads, repeated after the concatenation
        self.to_q, self.out = nn.Linear(C, C), nn.Linear(C, C)
        self.to_k, self.to_v, self.txt_k, self.txt_v = (nn.Linear(C, kv) for _ in range(4))

    def forward(self, x, ctx, t):
        b, n, _ = x.shape
        heads = _QKVOut.heads
        q = heads(self.to_q(x))
        src = x if self.own_keys else ctx.flip(1)  # not own keys: a second context stream
        ki, vi = heads(self.to_k(src)), heads(self.to_v(src))
        kt, vt = heads(self.txt_k(ctx)), heads(self.txt_v(ctx))
        k = torch.cat((kt, ki) if self.text_first else (ki, kt), dim=2)
        v = torch.cat((vt, vi) if self.text_first else (vi, vt), dim=2)
        k, v = _repeat_kv(k, self.kv_repeat), _repeat_kv(v, self.kv_repeat)
        if self.rope:  # rotary product applied to the joint keys after the concatenation
            spelled = _rope_half if self.rope == "half" else _rope
            q, k = spelled(q), spelled(k)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, C))


def _angles(x):
    return torch.arange(x.shape[-2], dtype=torch.float32)[:, None] * torch.linspace(0.1, 1.0, x.shape[-1] // 2)


def _rope(x):
    angles = _angles(x)
    table = torch.polar(torch.ones_like(angles), angles)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * table).flatten(3).type_as(x)


def _rope_half(x):
    """The rotate-half spelling: the halves of the head dim rotated, concatenated on the last axis."""
    c, s = _angles(x).cos(), _angles(x).sin()
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)


@pytest.mark.parametrize("text_first,rope,kv_repeat", [
    (True, None, None), (False, None, None), (True, "complex", None), (True, "half", None),
    (True, None, "repeat_interleave"), (False, "complex", "expand"), (False, "half", "repeat_interleave")])
def test_joint_keys_queries_over_text_and_own_keys(fresh_dynamo, text_first, rope, kv_repeat):
    """Queries over cat(text keys, own keys) are matched (exact at full keys); the text keys are
    always kept, the own keys ranked; a concatenation of other streams only stays cross-attention.
    Also with grouped-query keys repeated to the query heads after the concatenation, or a rotary
    product spelled rotate-half on the joint keys (until session 71 either hid the concatenation, and
    such a joint attention was rejected as cross-attention; benchmarks/fuzz_dits.py found the second)."""
    n_txt = 8

    def args(i):
        x, t = tokens(i)
        return x, torch.randn(B, n_txt, C, generator=torch.Generator().manual_seed(7)), t

    mod = JointKeys(text_first, rope=rope, kv_repeat=kv_repeat)
    check(mod, args, attention=1)
    (site,) = chipmunk_compile.runtime.sessions_of(mod)[0].sites
    offset = n_txt if text_first else 0
    assert site.key_runs(N, N + n_txt) == ((0, offset, N),)
    keep, count = site.key_keep_on("cpu", N, N + n_txt)
    assert count == n_txt and not keep[offset:offset + N].any() and keep.sum() == n_txt
    other = chipmunk_compile.inspect(JointKeys(text_first, own_keys=False, kv_repeat=kv_repeat).eval(), *args(0),
                                     config=SMALL)
    assert other.count("attention") == 0 and "cross-attention" in _reason(other), str(other)


def test_joint_keys_keep_the_other_streams_keys(fresh_dynamo):
    """At 10% of the keys, every query group still attends all 8 text keys (kept like text)."""
    n_txt = 8

    def args(i):
        x, t = tokens(i)
        return x, torch.randn(B, n_txt, C, generator=torch.Generator().manual_seed(7)), t

    mod = JointKeys(text_first=True).eval()
    cm = chip(mod, cfg(attn={"group": 8, "top_keys": 0.1, "random_keys": 0.0, "warmup_steps": 0}))
    with torch.no_grad():
        for i in range(3):
            cm(*args(i))
    (site,) = chipmunk_compile.runtime.sessions_of(mod)[0].sites
    (st,) = site.states.values()
    idx, cnt = st.get("indices"), st.get("counts")
    assert (cnt == n_txt + round(0.1 * (N + n_txt))).all()
    for row, c in zip(idx.reshape(-1, idx.shape[-1]), cnt.reshape(-1)):
        chosen = set(row[:c].tolist())
        assert set(range(n_txt)) <= chosen and max(chosen) < N + n_txt


class _QKVOut(nn.Module):
    """q/k/v/out projections of width C and the (B, N, C) -> (B, H, N, D) head split."""

    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v, self.out = (nn.Linear(C, C) for _ in range(4))

    @staticmethod
    def heads(y):
        return y.view(y.shape[0], -1, y.shape[-1] // D, D).transpose(1, 2)

    def attend(self, q, k, v):
        b, _, n, _ = q.shape
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, C))


class CachedPrefixKeys(_QKVOut):
    """Qwen-Image 2.1's KV-cached steps: the image queries attend to cat(cached prefix keys, own
    keys); the prefix's keys are a graph input (computed by an earlier call), not a projection."""

    def __init__(self, own_in_graph=True, prefix_from_x=False):
        super().__init__()
        self.own_in_graph, self.prefix_from_x = own_in_graph, prefix_from_x

    def forward(self, x, k_prefix, v_prefix, t):
        n, heads = x.shape[1], self.heads
        q = heads(self.to_q(x))
        k_own = heads(self.to_k(x)) if self.own_in_graph else k_prefix[:, :, :n]
        if self.prefix_from_x:  # "cached" keys that are the queries' own input tokens: not other keys
            k_prefix = heads(x)
        k = torch.cat((k_prefix, k_own), dim=2)
        v = torch.cat((v_prefix, heads(self.to_v(x))), dim=2)
        return self.attend(q, k, v)


def _prefix_args(n_prefix, m=N):
    def args(i):
        x, t = tokens(i, m=m)
        g = torch.Generator().manual_seed(9)
        return x, torch.randn(B, H, n_prefix, D, generator=g), torch.randn(B, H, n_prefix, D, generator=g), t
    return args


@pytest.mark.parametrize("n_prefix", [8, N])
def test_cached_prefix_keys(fresh_dynamo, n_prefix):
    """Queries over cat(cached keys, own keys) are matched and exact at full keys; a short cached
    prefix (text) is always kept, a long one (reference-image tokens) is ranked with the own keys."""
    mod = CachedPrefixKeys()
    check(mod, _prefix_args(n_prefix), attention=1)
    (site,) = chipmunk_compile.runtime.sessions_of(mod)[0].sites
    assert site.key_runs(N, N + n_prefix) == ((0, n_prefix, N),)
    keep, count = site.key_keep_on("cpu", N, N + n_prefix)
    if n_prefix <= N // 4:
        assert count == n_prefix and keep[:n_prefix].all() and not keep[n_prefix:].any()
    else:
        assert keep is None and count == 0


@pytest.mark.parametrize("variant", [dict(own_in_graph=False), dict(prefix_from_x=True)])
def test_cached_prefix_keys_rejected_when_not_shown(fresh_dynamo, variant):
    """Own keys that are graph inputs too, or a "prefix" made of the queries' own input tokens,
    stay cross-attention."""
    rep = chipmunk_compile.inspect(CachedPrefixKeys(**variant).eval(), *_prefix_args(N)(0), config=SMALL)
    assert rep.count("attention") == 0 and "cross-attention" in _reason(rep), str(rep)


class CachedKeysBetweenOwn(_QKVOut):
    """FLUX.2 Klein's KV-cached steps: the queries are [text, image]; the cached reference keys are
    put between the own text and image keys: cat(k[:T], k_ref, k[T:])."""

    def __init__(self, n_txt, swapped=False):
        super().__init__()
        self.n_txt, self.swapped = n_txt, swapped

    def forward(self, x, k_ref, v_ref, t):
        q, k, v = self.heads(self.to_q(x)), self.heads(self.to_k(x)), self.heads(self.to_v(x))
        T = self.n_txt
        first, last = (k[:, :, T:], k[:, :, :T]) if self.swapped else (k[:, :, :T], k[:, :, T:])
        k = torch.cat((first, k_ref, last), dim=2)
        v = torch.cat((v[:, :, :T], v_ref, v[:, :, T:]), dim=2)
        return self.attend(q, k, v)


def test_cached_keys_between_own_slices(fresh_dynamo):
    """Own keys split in two slices around cached keys are matched, exact at full keys, with both
    runs placed; slices out of order stay cross-attention."""
    n_txt, n_ref = 8, N
    mod = CachedKeysBetweenOwn(n_txt)
    check(mod, _prefix_args(n_ref), attention=1)
    (site,) = chipmunk_compile.runtime.sessions_of(mod)[0].sites
    assert site.key_runs(N, N + n_ref) == ((0, 0, n_txt), (n_txt, n_txt + n_ref, N - n_txt))
    site.always_keep = torch.arange(N) < n_txt  # the grouping's text tokens among the queries
    keep, count = site.key_keep_on("cpu", N, N + n_ref)
    assert count == n_txt and keep[:n_txt].all() and not keep[n_txt:].any()  # long cached part: ranked
    rep = chipmunk_compile.inspect(CachedKeysBetweenOwn(n_txt, swapped=True).eval(), *_prefix_args(n_ref)(0),
                                   config=SMALL)
    assert rep.count("attention") == 0 and "cross-attention" in _reason(rep), str(rep)


@pytest.mark.parametrize("mod", [lambda: CachedPrefixKeys(), lambda: CachedKeysBetweenOwn(8)])
def test_cached_keys_with_symbolic_token_counts(fresh_dynamo, mod):
    """Compiled with dynamic shapes, as Dynamo recompiles a KV pipeline's steps after the token count
    changed: the sites are still matched, exact at full keys at two token counts, and their runs
    follow each call's lengths."""
    mod = mod().eval()
    cm = chip(mod, SMALL, dynamic=True)
    with torch.no_grad():
        for m in (N, N + 16):
            for i in range(3):
                args = _prefix_args(N, m=m)(i)
                assert max_rel(cm(*args), mod(*args)) < 1e-5, (m, i)
    sites = [s for s in chipmunk_compile.runtime.sessions_of(mod)[0].sites if s.kind == "attention"]
    assert sites and all(s.key_layout is not None for s in sites)
    runs = sites[0].key_runs(N + 16, 2 * N + 16)
    assert runs in (((0, N, N + 16),), ((0, 0, 8), (8, N + 8, N + 8)))
    sc = step_counts(mod)
    assert sc.get("attention_sparse", 0) > 0


class SlicedQueriesOverAllKeys(_QKVOut):
    """FLUX.2 Klein's "extract" step: [text, image] queries, cut out of the joint [text, reference,
    image] sequence, over all its keys. The key slices are not the queries' own sequence in order."""

    def forward(self, x, t):
        T, R = 8, 8
        q, k, v = self.heads(self.to_q(x)), self.heads(self.to_k(x)), self.heads(self.to_v(x))
        q = torch.cat((q[:, :, :T], q[:, :, T + R:]), dim=2)
        k = torch.cat((k[:, :, :T], k[:, :, T:T + R], k[:, :, T + R:]), dim=2)
        return self.attend(q, k, v)


def test_sliced_queries_over_all_keys_rejected(fresh_dynamo):
    rep = chipmunk_compile.inspect(SlicedQueriesOverAllKeys().eval(), *tokens(0), config=SMALL)
    assert rep.count("attention") == 0 and "cross-attention" in _reason(rep), str(rep)


class TailQueriesOverAllKeys(_QKVOut):
    """Qwen-Image 2.1's prefill (its steps without a KV cache): every token's keys, the last tokens'
    queries, cut from the same projection (before or after the head split)."""

    def __init__(self, n_prefix, cut="heads", stop=None, other_stream=False, drop_key=False, kv_repeat=None):
        super().__init__()
        self.n_prefix, self.cut, self.stop, self.other_stream, self.drop_key = n_prefix, cut, stop, other_stream, drop_key
        self.kv_repeat = kv_repeat
        if kv_repeat:  # grouped-query heads: half as many k/v heads, repeated to the query heads
            self.to_k, self.to_v = nn.Linear(C, C // 2), nn.Linear(C, C // 2)

    def forward(self, x, t):
        P, heads = self.n_prefix, self.heads
        src = x.flip(1) if self.other_stream else x  # another token stream of the same length
        if self.cut == "tokens":
            q = heads(self.to_q(src)[:, P:self.stop])
        else:
            q = heads(self.to_q(src))[:, :, P:self.stop]
        k, v = heads(self.to_k(x)), heads(self.to_v(x))
        if self.drop_key:
            k, v = k[:, :, 1:], v[:, :, 1:]
        return self.attend(q, _repeat_kv(k, self.kv_repeat), _repeat_kv(v, self.kv_repeat))


@pytest.mark.parametrize("cut,n_prefix,kv_repeat", [("heads", 8, None), ("tokens", 8, None), ("heads", 20, None),
                                                    ("heads", 8, "repeat_interleave"), ("tokens", 8, "expand")])
def test_tail_queries_over_all_keys(fresh_dynamo, cut, n_prefix, kv_repeat):
    """Queries cut as the tail of the keys' own sequence are matched, exact at full keys, with the
    prefix placed before their own keys: kept like text when short, ranked when long. Also with
    grouped-query keys repeated to the query heads (until session 71 the repeat ended the walk from
    the keys to their projection, and the prefill was rejected as cross-attention)."""
    mod = TailQueriesOverAllKeys(n_prefix, cut, kv_repeat=kv_repeat)
    check(mod, tokens, attention=1)
    (site,) = chipmunk_compile.runtime.sessions_of(mod)[0].sites
    n_q = N - n_prefix
    assert site.key_layout == (("other", n_prefix, None), ("own", 0, None))
    assert site.key_runs(n_q, N) == ((0, n_prefix, n_q),)
    keep, count = site.key_keep_on("cpu", n_q, N)
    if n_prefix <= n_q // 4:
        assert count == n_prefix and keep[:n_prefix].all() and not keep[n_prefix:].any()
    else:
        assert keep is None and count == 0


@pytest.mark.parametrize("variant", [dict(stop=N - 4), dict(other_stream=True), dict(drop_key=True),
                                     dict(other_stream=True, kv_repeat="expand")])
def test_tail_queries_rejected_when_not_shown(fresh_dynamo, variant):
    """A slice that is not the tail, queries projected from another stream of the same length, or
    keys missing a token of the queries' sequence: not the keys' own tail, so cross-attention."""
    rep = chipmunk_compile.inspect(TailQueriesOverAllKeys(8, **variant).eval(), *tokens(0), config=SMALL)
    assert rep.count("attention") == 0 and "cross-attention" in _reason(rep), str(rep)


class TailQueriesQuarterPrefix(TailQueriesOverAllKeys):
    """The prefix a quarter of the sequence: under dynamic shapes the cut's start is symbolic."""

    def forward(self, x, t):
        self.n_prefix = x.shape[1] // 4
        return super().forward(x, t)


@pytest.mark.parametrize("mod", [lambda: TailQueriesOverAllKeys(8), lambda: TailQueriesQuarterPrefix(0)])
def test_tail_queries_with_symbolic_token_counts(fresh_dynamo, mod):
    """Compiled with dynamic shapes (a fixed prefix, then one that grows with the sequence): still
    matched, exact at full keys at two token counts, the prefix placed per call."""
    mod = mod().eval()
    cm = chip(mod, SMALL, dynamic=True)
    with torch.no_grad():
        for m in (N, N + 16):
            for i in range(3):
                x, t = tokens(i, m=m)
                assert max_rel(cm(x, t), mod(x, t)) < 1e-5, (m, i)
    (site,) = [s for s in chipmunk_compile.runtime.sessions_of(mod)[0].sites if s.kind == "attention"]
    n_k = N + 16
    quarter = isinstance(mod, TailQueriesQuarterPrefix)
    assert site.key_layout[0] == ("other", None if quarter else 8, None)  # None: sized per call
    n_prefix = n_k // 4 if quarter else 8
    assert site.key_runs(n_k - n_prefix, n_k) == ((0, n_prefix, n_k - n_prefix),)
    assert step_counts(mod).get("attention_sparse", 0) > 0


def test_mlp_with_wrapped_weights_is_rejected(fresh_dynamo):
    """Quantized weights (torchao's Int8Tensor and the like: tensor subclasses wrapping others)
    cannot have their rows gathered by the kernels: the MLP is listed as rejected with the class
    and stays exact. Before, it was rewritten and the subclass raised on the chipmunk op."""
    from torch.testing._internal.two_tensor import TwoTensor

    mod = Mlp(F.gelu).eval()
    for lin in (mod.fc1, mod.fc2):
        lin.weight = nn.Parameter(TwoTensor(lin.weight.data.clone(), lin.weight.data.clone()), requires_grad=False)
    reasons = [r.reason for r in rejected(mod, tokens(0)).rejected]
    assert len(reasons) == 1 and "TwoTensor" in reasons[0], reasons
    check(mod, tokens, mlp=0)


def test_timestep_embedding_over_frames_is_no_mlp_site(fresh_dynamo):
    """SkyReels-V2's diffusion forcing embeds a timestep per frame: its time embedder's
    linear → SiLU → linear runs on (B, F, C), which looks like F tokens. Its input comes from the
    (B, F) timestep and weights only and changes whole at every step, so a sparse delta cannot
    follow it: rejected with the reason (before session 47 it was a site: in a 20-step loop of a tiny
    SkyReels-V2 with only the MLPs sparse, the latents ended 0.0107 from eager against 0.0030 with one
    timestep per sample, 0.0030 both now). The token MLP beside it stays a site."""

    class PerFrameTime(nn.Module):
        def __init__(self):
            super().__init__()
            self.t1, self.t2 = nn.Linear(16, 32), nn.Linear(32, 32)
            self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)

        def forward(self, x, t):  # x (1, F * 8, 32), t (1, F)
            freqs = torch.exp(-torch.arange(8, dtype=torch.float32) / 8)
            sin = torch.cat([torch.sin(t[..., None] * freqs), torch.cos(t[..., None] * freqs)], dim=-1)
            temb = self.t2(F.silu(self.t1(sin)))  # (1, F, 32)
            h = x + temb.repeat_interleave(x.shape[1] // t.shape[1], dim=1)
            return self.fc2(F.gelu(self.fc1(h)))

    rep = chipmunk_compile.inspect(PerFrameTime(), torch.randn(1, 80, 32), torch.full((1, 10), 500.0),
                                   config={"mlp": {"min_tokens": 1}})
    assert [s.path for s in rep.sites if s.kind == "mlp"] == ["fc2"]
    assert any(r.kind == "mlp" and "timestep/conditioning embedding" in r.reason for r in rep.rejected), rep
