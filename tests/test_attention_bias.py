"""Attention with an additive score bias or a boolean pair mask (SDPA's attn_mask beyond key padding:
OmniGen's N×N mask, ACE-Step's banded window, RFD4's learned pair bias). Such calls are sites; the
op adds the bias to every score it computes, so the compiled model matches eager on dense, refresh
and full-key sparse steps (a bias ignored anywhere would break that), rows a mask hides whole come
out as SDPA's zeros, and partial-key sparse steps stay finite when a group's selected keys are all
masked for some of its queries."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import chipmunk_compile
from helpers import FULL_KEYS, cfg, chip, fresh_dynamo, max_rel, step_counts  # noqa: F401
from test_patterns import B, H, N, SMALL, SdpaKeyPadding, check, qkv


def _band(width, n=N):
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).abs() <= width


def _float_bias(shape, seed=0):
    """Small random values of `shape`, -inf outside a band (the diagonal always kept) where it is (.., N, N)."""
    g = torch.Generator().manual_seed(seed)
    bias = 0.5 * torch.randn(*shape, generator=g)
    return bias.masked_fill(~_band(6), float("-inf")) if shape[-2:] == (N, N) else bias


def _bool_mask(shape, seed=0):
    mask = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) > 0.3
    mask[..., 0] = True  # every query keeps a key
    return mask


def _masked_args(mask):
    def make(i):
        q, k, v, t = qkv(i)
        return q, k, v, mask, t
    return make


@pytest.mark.parametrize("kind", ["float", "bool"])
@pytest.mark.parametrize("shape", [(N, N), (B, H, N, N), (B, 1, N, N), (1, N, N), (H, 1, N)])
def test_pair_masks_are_biased_sites(fresh_dynamo, kind, shape):
    mask = _float_bias(shape) if kind == "float" else _bool_mask(shape)
    rep = check(SdpaKeyPadding(), _masked_args(mask), attention=1)
    assert rep.sites[0].shapes["bias"] == shape and "mask" not in rep.sites[0].shapes


def test_float_key_bias_is_a_site(fresh_dynamo):
    """A float (B, 1, 1, Nk) mask is not provably padding: an additive bias over the keys."""
    bias = torch.zeros(B, 1, 1, N)
    bias[0, ..., 20:] = -3.0
    bias[1, ..., :4] = float("-inf")
    rep = check(SdpaKeyPadding(), _masked_args(bias), attention=1)
    assert rep.sites[0].shapes["bias"] == (B, 1, 1, N)


def test_2d_mask_with_query_rows_equal_to_batch_is_per_query(fresh_dynamo):
    """A 2-D SDPA mask broadcasts as (N, Nk): with N == B it is per query, not a (B, Nk) key mask
    (read as one, the outputs would differ from eager)."""
    mask = _bool_mask((N, N))

    def make(i):
        q, k, v, t = qkv(i, batch=N)
        return q, k, v, mask, t

    rep = check(SdpaKeyPadding(), make, attention=1)
    assert rep.sites[0].shapes["bias"] == (N, N)


class PairBias(nn.Module):
    """RFD4-style: a per-head pair bias computed from the timestep, so it changes on every call."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Linear(1, H)

    def forward(self, q, k, v, t):
        i = torch.arange(N, dtype=q.dtype, device=q.device)
        dist = (i[:, None] - i[None, :]).abs()
        slope = self.scale(t[:, None] / 1000).abs().view(-1, H, 1, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=-slope * dist)


def test_bias_that_changes_every_call(fresh_dynamo):
    torch.manual_seed(0)
    rep = check(PairBias(), qkv, attention=1, steps=4)
    assert rep.sites[0].shapes["bias"] == (1, H, N, N)


def test_rows_masked_whole_are_zeros(fresh_dynamo):
    """Padding AND causal: batch 1's first queries see only padded keys. SDPA returns zero rows there;
    so do the refresh (the exact lse is -inf there: no NaN reaches the column sums) and the sparse steps."""

    class PaddingAndCausal(nn.Module):
        def forward(self, q, k, v, m, t):
            b, n = m.shape
            tril = torch.ones(n, n, dtype=torch.bool, device=m.device).tril()
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m.view(b, 1, 1, n) & tril)

    m = torch.ones(B, N, dtype=torch.bool)
    m[1, :3] = False
    model = PaddingAndCausal().eval()
    compiled = chip(model, SMALL)
    with torch.no_grad():
        for i in range(3):
            q, k, v, t = qkv(i)
            out = compiled(q, k, v, m, t)
            assert torch.isfinite(out).all() and (out[1, :, :3] == 0).all()
            assert max_rel(out, model(q, k, v, m, t)) < 1e-5
    assert step_counts(model)["attention_sparse"] == 1


def test_partial_keys_under_a_narrow_band_stay_finite(fresh_dynamo):
    """30% of the keys per group of 8 queries under a band of ±1: many queries find none of their
    group's keys inside their band. They get no delta (the refresh's residual holds), never NaN, and
    the sparse steps stay close to eager."""
    band = torch.zeros(N, N).masked_fill(~_band(1), float("-inf"))
    config = cfg(attn={"group": 8, "top_keys": 0.3, "random_keys": 0.0}, mlp={"enabled": False})
    model = SdpaKeyPadding().eval()
    compiled = chip(model, config)
    make = _masked_args(band)
    with torch.no_grad():
        for i in range(4):
            out, ref = compiled(*make(i)), model(*make(i))
            assert torch.isfinite(out).all()
            assert max_rel(out, ref) < 0.5, (i, max_rel(out, ref))
    assert step_counts(model)["attention_sparse"] == 2


def test_op_turns_a_boolean_pair_mask_into_the_queries_dtype():
    from chipmunk_compile.ops.attention import additive_bias

    mask = _bool_mask((N, N))
    bias = additive_bias(mask, torch.float16)
    assert bias.dtype == torch.float16 and torch.equal(torch.isinf(bias), ~mask) and (bias[mask] == 0).all()
    with pytest.raises(TypeError, match="float or boolean"):
        additive_bias(mask.long(), torch.float16)


def test_inspect_lists_the_bias(fresh_dynamo):
    rep = chipmunk_compile.inspect(SdpaKeyPadding().eval(), *_masked_args(_float_bias((N, N)))(0), config=SMALL)
    assert "bias" in str(rep)


class ExplicitBias(nn.Module):
    """softmax(QKᵀ) V written out with an added bias: after the scale, before it, or in 3-D (B*H, N, D)."""

    def __init__(self, form):
        super().__init__()
        self.form = form

    def forward(self, q, k, v, bias, t):
        if self.form == "after_scale":
            s = q @ k.transpose(-1, -2) * 0.3 + bias
        elif self.form == "before_scale":  # the bias is scaled too
            s = (bias + q @ k.transpose(-1, -2)) * 0.3
        elif self.form == "constant":  # a shift: no bias at all
            s = q @ k.transpose(-1, -2) * 0.3 + 2.0
        elif self.form == "flat":
            q, k, v = (x.reshape(-1, N, x.shape[-1]) for x in (q, k, v))
            s = torch.bmm(q, k.transpose(1, 2)) * 0.3 + bias.reshape(-1, N, N)
            return (s.softmax(-1) @ v).view(B, H, N, -1)
        else:  # two added tensors
            s = q @ k.transpose(-1, -2) * 0.3 + bias + bias.transpose(-1, -2)
        return s.softmax(-1) @ v


@pytest.mark.parametrize("form", ["after_scale", "before_scale", "constant", "flat"])
def test_written_out_attention_with_a_bias(fresh_dynamo, form):
    bias = _float_bias((B, H, N, N))
    rep = check(ExplicitBias(form), _masked_args(bias), attention=1, pattern="explicit")
    assert ("bias" in rep.sites[0].shapes) == (form != "constant"), str(rep)


@pytest.mark.parametrize("form, bias, reason", [
    ("two_terms", _float_bias((B, H, N, N)), "not one bias"),
    ("after_scale", _bool_mask((N, N)), "bool tensor added"),
])
def test_written_out_biases_that_stay_dense(fresh_dynamo, form, bias, reason):
    rep = chipmunk_compile.inspect(ExplicitBias(form).eval(), *_masked_args(bias)(0), config=SMALL)
    assert not rep.sites and any(reason in r.reason for r in rep.rejected), str(rep)


@pytest.mark.slow
def test_bias_through_inductor(fresh_dynamo):
    """The op's optional bias operand under the default inner compiler: a bias computed in the graph
    from the timestep (new every call) reaches every step; full-key sparse steps equal eager."""
    model = PairBias().eval()
    compiled = chip(model, SMALL, compiler="inductor")
    with torch.no_grad():
        errs = [max_rel(compiled(*qkv(i)), model(*qkv(i))) for i in range(4)]
    assert max(errs) < 1e-5, errs
    assert step_counts(model)["attention_sparse"] == 2


@pytest.mark.parametrize("attn", [{"recompute_mask": False}, {"recompute_mask": True}])
def test_every_refresh_path_adds_the_bias(fresh_dynamo, attn):
    """Refreshes every 3 steps over 8: the kept-index refresh (plain SDPA) and the re-selecting one
    (exact lse, column sums), with a bias that changes every call; at full key budget every step
    equals eager."""
    config = cfg(attn={"group": 8, **FULL_KEYS, "full_step_every": 3, **attn}, mlp={"enabled": False})
    model = PairBias().eval()
    compiled = chip(model, config)
    with torch.no_grad():
        errs = [max_rel(compiled(*qkv(i)), model(*qkv(i))) for i in range(8)]
    assert max(errs) < 1e-5, errs
    assert step_counts(model) == {"attention_dense": 1, "attention_refresh": 3, "attention_sparse": 4}

