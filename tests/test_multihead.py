"""`nn.MultiheadAttention`: Dynamo keeps its forward as one opaque call, which the rewrite writes out
(projections, SDPA, output projection) so that its self-attention becomes a site; the calls it
cannot write out exactly stay as they are and are reported with the reason."""

import pytest
import torch
import torch.nn as nn

import chipmunk_compile

from helpers import FULL_KEYS, cfg, fresh_dynamo, matches_eager  # noqa: F401

B, N, C, H = 2, 32, 16, 2
SMALL = cfg(attn={"group": 8, **FULL_KEYS}, mlp={"block": 8, **FULL_KEYS})


class MhaBlock(nn.Module):
    """A pre-norm transformer block on nn.MultiheadAttention, as many research DiTs write it."""

    def __init__(self, batch_first=True, need_weights=None, kdim=None, **mha_kw):
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.norm = nn.LayerNorm(C)
        self.attn = nn.MultiheadAttention(C, H, batch_first=batch_first, kdim=kdim, vdim=kdim, **mha_kw)

    def forward(self, x, t, context=None, key_padding_mask=None, attn_mask=None):
        h = self.norm(x) * (1 + t.mean() * 1e-4)
        if not self.batch_first:
            h = h.transpose(0, 1)
        kv = h if context is None else context
        kw = {} if self.need_weights is None else {"need_weights": self.need_weights}
        o = self.attn(h, kv, kv, key_padding_mask=key_padding_mask, attn_mask=attn_mask, **kw)[0]
        if not self.batch_first:
            o = o.transpose(0, 1)
        return x + o


def tokens(step, n=N):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, n, C, generator=g) * (1 + 0.05 * step), torch.tensor([1000.0 - 100 * step])


def run_steps(mod, make_args, steps=3):
    return matches_eager(mod, SMALL, [make_args(i) for i in range(steps)])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [None, False])  # None: the default (True), weights unused
def test_self_attention_becomes_a_site(fresh_dynamo, batch_first, need_weights):
    mod = MhaBlock(batch_first, need_weights).eval()
    rep = chipmunk_compile.inspect(mod, *tokens(0), config=SMALL)
    assert [(s.kind, s.pattern, s.path) for s in rep.sites] == [("attention", "sdpa", "attn")], str(rep)
    assert rep.sites[0].shapes["q"] == (B, H, N, C // H), str(rep)
    assert not rep.rejected, str(rep)
    sc = run_steps(mod, lambda i: (tokens(i), {}))
    assert sc.get("attention_sparse", 0) > 0, sc  # full-key sparse steps reproduce eager


def test_boolean_key_padding_mask(fresh_dynamo):
    """MultiheadAttention's mask reads True = ignore; the written-out SDPA mask True = attend."""
    mod = MhaBlock().eval()
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, -5:] = True  # the second sample's last 5 tokens are padding
    rep = chipmunk_compile.inspect(mod, *tokens(0), key_padding_mask=pad, config=SMALL)
    assert len(rep.sites) == 1 and "mask" in rep.sites[0].shapes, str(rep)
    sc = run_steps(mod, lambda i: (tokens(i), {"key_padding_mask": pad}))
    assert sc.get("attention_sparse", 0) > 0, sc


def test_cross_attention_is_rejected_and_exact(fresh_dynamo):
    """Separate projection weights (kdim != embed_dim) over another stream: written out, rejected
    by the SDPA pattern as cross-attention, computed as before."""
    mod = MhaBlock(kdim=12).eval()
    context = torch.randn(B, 7, 12)
    rep = chipmunk_compile.inspect(mod, *tokens(0), context=context, config=SMALL)
    assert not rep.sites and [r.reason for r in rep.rejected if "cross-attention" in r.reason], str(rep)
    run_steps(mod, lambda i: (tokens(i), {"context": context}))


@pytest.mark.parametrize("variant, reason", [
    ("attn_mask", "attn_mask"),
    ("weights", "need_weights"),
    ("bias_kv", "add_bias_kv"),
    ("float_padding", "additive key_padding_mask"),
])
def test_calls_that_cannot_be_written_out_stay_and_are_reported(fresh_dynamo, variant, reason):
    mod = MhaBlock(add_bias_kv=variant == "bias_kv").eval()
    kwargs = {"attn_mask": torch.zeros(N, N, dtype=torch.bool)} if variant == "attn_mask" else {}
    if variant == "float_padding":  # an additive mask given as such: not provably 0 / -inf
        kwargs = {"key_padding_mask": torch.zeros(B, N).index_fill_(1, torch.tensor([3]), -2.0)}
    if variant == "weights":
        class UsesWeights(nn.Module):
            def __init__(self):
                super().__init__()
                self.attn = nn.MultiheadAttention(C, H, batch_first=True)

            def forward(self, x, t):
                o, w = self.attn(x, x, x)
                return o + w.mean()
        mod = UsesWeights().eval()
    rep = chipmunk_compile.inspect(mod, *tokens(0), **kwargs, config=SMALL)
    assert not rep.sites, str(rep)
    assert [r for r in rep.rejected if r.pattern == "multihead" and reason in r.reason], str(rep)
    run_steps(mod, lambda i: (tokens(i), kwargs))


class EncoderLayer(nn.Module):
    def __init__(self, norm_first, activation):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(C, H, 4 * C, dropout=0.1, activation=activation, batch_first=True,
                                                norm_first=norm_first)

    def forward(self, x, t, src_key_padding_mask=None):
        return self.layer(x * (1 + t.mean() * 1e-4), src_key_padding_mask=src_key_padding_mask)


@pytest.mark.parametrize("norm_first, activation", [(True, "gelu"), (False, "relu")])
def test_encoder_layer_fast_path_is_written_out(fresh_dynamo, norm_first, activation):
    """Under no_grad, nn.TransformerEncoderLayer runs one fused op (its fast path); written out as
    norms, attention and feed-forward, both become sites and reproduce the fused op."""
    mod = EncoderLayer(norm_first, activation).eval()
    rep = chipmunk_compile.inspect(mod, *tokens(0), config=SMALL)
    assert sorted((s.kind, s.path) for s in rep.sites) == [("attention", "layer"), ("mlp", "layer")], str(rep)
    assert not rep.rejected, str(rep)
    sc = run_steps(mod, lambda i: (tokens(i), {}))
    assert sc.get("attention_sparse", 0) > 0 and sc.get("mlp_sparse", 0) > 0, sc


def test_encoder_layer_fast_path_with_a_mask_is_reported(fresh_dynamo):
    mod = EncoderLayer(True, "gelu").eval()
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[0, -3:] = True
    rep = chipmunk_compile.inspect(mod, *tokens(0), src_key_padding_mask=pad, config=SMALL)
    assert not rep.sites and [r for r in rep.rejected if r.pattern == "multihead" and "mask" in r.reason], str(rep)


class NativeFastPath(nn.Module):
    """A direct call of MultiheadAttention's fused fast path (batch-first inputs)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(C, H, batch_first=True)

    def forward(self, x, t):
        a = self.attn
        return torch._native_multi_head_attention(x, x, x, C, H, a.in_proj_weight, a.in_proj_bias,
                                                  a.out_proj.weight, a.out_proj.bias, None, False)[0] * (1 + t)


def test_native_fast_path_is_written_out(fresh_dynamo):
    mod = NativeFastPath().eval()
    rep = chipmunk_compile.inspect(mod, *tokens(0), config=SMALL)
    assert [(s.kind, s.pattern) for s in rep.sites] == [("attention", "sdpa")], str(rep)
    sc = run_steps(mod, lambda i: (tokens(i), {}))
    assert sc.get("attention_sparse", 0) > 0, sc


def test_a_failed_write_out_leaves_the_call_as_it_was(fresh_dynamo, monkeypatch):
    """All or nothing: a write-out that fails midway (here the SDPA step) removes what it made, the
    call runs as before (exact), and the fallback is counted."""
    import types

    from chipmunk_compile import rewrite_multihead

    def broken(*a, **k):
        raise RuntimeError("no SDPA today")

    monkeypatch.setattr(rewrite_multihead, "F", types.SimpleNamespace(
        scaled_dot_product_attention=broken, layer_norm=None, gelu=None, relu=None))
    mod = MhaBlock().eval()
    rep = chipmunk_compile.inspect(mod, *tokens(0), config=SMALL)
    assert not rep.sites and [r for r in rep.rejected if r.pattern == "multihead"], str(rep)
    fresh_dynamo.clear()
    run_steps(mod, lambda i: (tokens(i), {}))
    assert fresh_dynamo["chipmunk"]["fallback:multihead_write_out_failed"] == 1
