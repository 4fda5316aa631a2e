"""Packed sequences with no batch axis (Cosmos3 Omni's mixture of transformers): every activation is
(tokens, C); a text prefix and the image tokens are cut from one sequence and run through their own
weights; the image queries attend to cat(text keys, image keys).

What is checked: the two cuts of one sequence are different token streams (the image attention is a
joint attention with the text keys as the other part, not a cross-attention), the (tokens, C) MLPs on
attention tokens are sites, and an MLP on rows routed by data (sorted by a router score, as MoE
dispatch does) is not: its cache rows would hold other tokens from one step to the next."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import chipmunk_compile

from helpers import fresh_dynamo  # noqa: F401
from test_patterns import SMALL, check

H, D = 2, 8
C = H * D
N_TXT, N_IMG = 8, 24


class SwiGLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(C, 4 * C), nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class PackedLayer(nn.Module):
    """Text and image pathways of one packed layer; `routed`: the image MLP runs on its rows sorted by
    a router score and scattered back."""

    def __init__(self, routed=False, explicit=False):
        super().__init__()
        self.txt_qkv, self.img_qkv = nn.Linear(C, 3 * C), nn.Linear(C, 3 * C)
        self.txt_out, self.img_out = nn.Linear(C, C), nn.Linear(C, C)
        self.txt_mlp, self.img_mlp = SwiGLU(), SwiGLU()
        self.router = nn.Linear(C, 1) if routed else None
        self.explicit = explicit  # the image attention written as softmax(q kᵀ) v on (heads, tokens, dim)

    def forward(self, txt, img):
        qt, kt, vt = (y.view(-1, H, D) for y in self.txt_qkv(F.rms_norm(txt, (C,))).chunk(3, -1))
        qi, ki, vi = (y.view(-1, H, D) for y in self.img_qkv(F.rms_norm(img, (C,))).chunk(3, -1))
        # (tokens, heads, dim) -> (1, heads, tokens, dim)
        txt_att = F.scaled_dot_product_attention(*(t.unsqueeze(0).transpose(1, 2) for t in (qt, kt, vt)), is_causal=True)
        k, v = torch.cat([kt, ki], 0), torch.cat([vt, vi], 0)
        if self.explicit:
            q, k, v = (t.transpose(0, 1) for t in (qi, k, v))
            img_att = (torch.softmax(q @ k.transpose(-1, -2) * D ** -0.5, dim=-1) @ v).unsqueeze(0)
        else:
            img_att = F.scaled_dot_product_attention(*(t.unsqueeze(0).transpose(1, 2) for t in (qi, k, v)))
        txt = txt + self.txt_out(txt_att.transpose(1, 2).reshape(-1, C))
        img = img + self.img_out(img_att.transpose(1, 2).reshape(-1, C))
        txt = txt + self.txt_mlp(F.rms_norm(txt, (C,)))
        h = F.rms_norm(img, (C,))
        if self.router is None:
            return txt, img + self.img_mlp(h)
        order = self.router(h).squeeze(-1).argsort()
        routed = torch.empty_like(h)
        routed[order] = self.img_mlp(h[order])
        return txt, img + routed


class Packed(nn.Module):
    def __init__(self, routed=False, explicit=False):
        super().__init__()
        self.layers = nn.ModuleList([PackedLayer(routed, explicit) for _ in range(2)])

    def forward(self, seq, t):
        txt, img = seq[:N_TXT], seq[N_TXT:]
        for layer in self.layers:
            txt, img = layer(txt, img)
        return torch.cat([txt, img], 0)


def packed(step):
    g = torch.Generator().manual_seed(1)
    return torch.randn(N_TXT + N_IMG, C, generator=g) * (1 + 0.05 * step), torch.tensor([1000.0 - 100 * step])


def test_packed_sequence_sites(fresh_dynamo):
    """Image attention over cat(text keys, image keys) in each layer (the text attention is causal:
    rejected), both (tokens, C) MLPs of each layer; the compiled model matches eager."""
    rep = check(Packed(), packed, attention=2, mlp=4)
    attn = [s for s in rep.sites if s.kind == "attention"]
    assert [s.shapes["k"] for s in attn] == [(1, H, N_TXT + N_IMG, D)] * 2
    assert {s.shapes["x"] for s in rep.sites if s.kind == "mlp"} == {(N_TXT, C), (N_IMG, C)}
    assert [r.reason for r in rep.rejected if r.kind == "attention"] == ["causal attention"] * 2


def test_packed_mlps_behind_explicit_softmax_attention(fresh_dynamo):
    """The image attention written out as softmax(q kᵀ) v on (heads, tokens, dim): its queries make
    the image rows tokens as an SDPA's do, so the image MLPs are sites too."""
    rep = check(Packed(explicit=True), packed, attention=2, mlp=4)
    assert {s.pattern for s in rep.sites if s.kind == "attention"} == {"explicit"}, str(rep)
    assert sorted(s.path for s in rep.sites if s.kind == "mlp") == [
        "layers.0.img_mlp.down", "layers.0.txt_mlp.down", "layers.1.img_mlp.down", "layers.1.txt_mlp.down"]


def test_routed_rows_are_not_tokens(fresh_dynamo):
    """The image MLP on router-sorted rows stays dense (rejected: no token dimension); the text MLPs
    and the attention are still sites."""
    model = Packed(routed=True).eval()
    rep = chipmunk_compile.inspect(model, *packed(0), config=SMALL)
    assert sorted(s.path for s in rep.sites if s.kind == "mlp") == ["layers.0.txt_mlp.down", "layers.1.txt_mlp.down"]
    routed = [r for r in rep.rejected if r.kind == "mlp" and "img_mlp" in r.path]
    assert len(routed) == 2 and all("no token dimension" in r.reason for r in routed), str(rep)
    assert rep.count("attention") == 2


@pytest.mark.parametrize("same_cut_twice", [False, True])
def test_cuts_of_one_sequence_are_streams(fresh_dynamo, same_cut_twice):
    """Keys from seq[:8] and queries from seq[8:] (equal lengths: 8 and 8) are different token
    streams: a cross-attention. The same cut made twice is one stream: self-attention."""

    class TwoCuts(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.kv = nn.Linear(C, C), nn.Linear(C, 2 * C)

        def forward(self, seq, t):
            a = seq[8:16]
            b = seq[8:16] if same_cut_twice else seq[:8]
            q = self.q(a).view(-1, H, D).unsqueeze(0).transpose(1, 2)
            k, v = (y.view(-1, H, D).unsqueeze(0).transpose(1, 2) for y in self.kv(b).chunk(2, -1))
            return F.scaled_dot_product_attention(q, k, v)

    rep = chipmunk_compile.inspect(TwoCuts().eval(), *packed(0), config=SMALL)
    if same_cut_twice:
        assert rep.count("attention") == 1, str(rep)
    else:
        assert rep.count("attention") == 0 and "different token streams" in rep.rejected[0].reason, str(rep)
