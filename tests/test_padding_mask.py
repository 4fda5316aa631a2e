"""Attention masks built from padding vectors inside the graph (patterns/padding_mask.py): each
spelling is matched and the compiled model reproduces eager on dense, refresh and sparse steps,
padded query rows (zeros in SDPA) included; forms that are not provably padding become pair biases
(tests/test_attention_bias.py)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import fresh_dynamo  # noqa: F401
from test_patterns import B, N, check, qkv


def _vectors(i):
    q, k, v, t = qkv(i)
    m = torch.ones(B, N, dtype=torch.bool)
    m[0, N - 5:] = False  # trailing padding (text padded to a fixed length)
    m[1, :3] = False
    return q, k, v, m, t


class OuterRepeat(nn.Module):
    """HunyuanVideo 1.5's spelling: repeat over queries, transpose, AND, cast."""

    def forward(self, q, k, v, m, t):
        b, n = m.shape
        m1 = m.view(b, 1, 1, n).repeat(1, 1, n, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(m1 & m1.transpose(2, 3)).bool())


class OuterBroadcast(nn.Module):
    def forward(self, q, k, v, m, t):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None, :, None] & m[:, None, None, :])


class KeyRepeated(nn.Module):
    def forward(self, q, k, v, m, t):
        b, n = m.shape
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m.view(b, 1, 1, n).expand(b, 1, n, n))


class QueryOnly(nn.Module):
    def forward(self, q, k, v, m, t):
        b, n = m.shape
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m.reshape(b, 1, n, 1).expand(-1, -1, -1, n))


class LogicalAndOfInts(nn.Module):
    def forward(self, q, k, v, m, t):
        mi = m.long()
        b, n = m.shape
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.logical_and(mi.view(b, 1, 1, n), mi.view(b, 1, n, 1)))


class TwoVectors(nn.Module):
    """Keys and queries padded by different vectors."""

    def forward(self, q, k, v, m, t):
        b, n = m.shape
        mq = m.flip(-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mq.view(b, 1, n, 1) & m.view(b, 1, 1, n))


@pytest.mark.parametrize("mod", [OuterRepeat, OuterBroadcast, KeyRepeated, QueryOnly, LogicalAndOfInts, TwoVectors])
def test_padding_masks_match_eager(fresh_dynamo, mod):
    rep = check(mod(), _vectors, attention=1)
    assert rep.sites[0].shapes["mask"] == (B, 1, N, N)


def test_padded_query_rows_are_zero(fresh_dynamo):
    """What the query side of the mask is for: SDPA's fully masked rows are zeros, and so are ours."""
    from helpers import chip
    from test_patterns import SMALL

    mod = OuterRepeat().eval()
    cm = chip(mod, SMALL)
    with torch.no_grad():
        for i in range(3):
            q, k, v, m, t = _vectors(i)
            out = cm(q, k, v, m, t)
            assert (out[0, :, N - 5:] == 0).all() and (out[1, :, :3] == 0).all()
            assert (out[0, :, : N - 5] != 0).any()


class BitwiseAndOfInts(nn.Module):
    def forward(self, q, k, v, m, t):
        mi = m.long() * 2 + 1  # all nonzero, but (2a+1) & (2b+1) is not a & b
        b, n = m.shape
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(mi.view(b, 1, 1, n) & mi.view(b, 1, n, 1)).bool())


class PaddingAndCausal(nn.Module):
    def forward(self, q, k, v, m, t):
        b, n = m.shape
        tril = torch.ones(n, n, dtype=torch.bool, device=m.device).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m.view(b, 1, 1, n) & tril)


class TiledHalfVector(nn.Module):
    """A vector of length N/2 repeated twice along the keys: not one padding vector of the keys."""

    def forward(self, q, k, v, m, t):
        b, n = m.shape
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, : n // 2].view(b, 1, 1, n // 2).repeat(1, 1, n, 2))


@pytest.mark.parametrize("mod", [BitwiseAndOfInts, PaddingAndCausal, TiledHalfVector])
def test_non_padding_masks_are_pair_biases(fresh_dynamo, mod):
    """Not provably padding: the op takes them as a 0 / -inf pair bias, which is exact as well."""
    rep = check(mod(), _vectors, attention=1)
    assert "bias" in rep.sites[0].shapes and "mask" not in rep.sites[0].shapes
