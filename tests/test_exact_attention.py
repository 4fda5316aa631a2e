"""ops.exact_attention: library choice, counted fallback, output layout and lse (CPU + GPU)."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from chipmunk_compile.ops import exact_attention as ea


def _qkv(B=1, H=2, N=40, D=64, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, N, H, D, generator=g).transpose(1, 2).to(device, dtype) for _ in range(3))
    return q, k, v


def _truth(q, k, v, scale):
    s = torch.einsum("bhnd,bhkd->bhnk", q.double(), k.double()) * scale
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale), torch.logsumexp(s, -1)


@pytest.fixture
def fake_libraries(monkeypatch):
    """Pretend to be on CUDA with a broken first library and a working second one (returning (B, H, N, D)
    contiguous output, another layout than the op's)."""
    calls = []

    def broken(q, k, v, scale, key_mask=None, bias=None):
        calls.append("broken")
        raise RuntimeError("no kernel for this shape")

    def good(q, k, v, scale, key_mask=None, bias=None):
        calls.append("good")
        o = F.scaled_dot_product_attention(q, k, v, scale=scale).contiguous()
        lse = torch.logsumexp(torch.einsum("bhnd,bhkd->bhnk", q, k) * scale, -1)
        return o, lse[..., None]  # (B, H, N, 1), as some libraries return it

    monkeypatch.setattr(ea, "LIBRARIES", {"broken": broken, "good": good})
    monkeypatch.setattr(ea, "_library_usable", lambda q, k: True)
    monkeypatch.setattr(ea, "_choice", {})
    counters.clear()
    return calls


def test_fallback_is_counted_and_remembered(fake_libraries):
    q, k, v = _qkv()
    o, lse = ea.exact_attention_lse(q, k, v, None, 0.125, 16, None)
    o2, _ = ea.exact_attention_lse(q, k, v, None, 0.125, 16, None)
    assert fake_libraries == ["broken", "good", "good"]  # the broken library is tried once per key
    assert counters["chipmunk"]["exact_lse_fallback:broken"] == 1
    o_t, lse_t = _truth(q, k, v, 0.125)
    assert o.transpose(1, 2).is_contiguous() and o.shape == q.shape  # the op's (B, N, H, D) layout
    assert torch.allclose(o.double(), o_t, atol=1e-5) and torch.equal(o, o2)
    assert lse.shape == (1, 2, 40) and torch.allclose(lse.double(), lse_t, atol=1e-5)


def test_all_libraries_failing_uses_our_kernel(fake_libraries, monkeypatch):
    monkeypatch.setattr(ea, "LIBRARIES", {"broken": ea.LIBRARIES["broken"]})
    q, k, v = _qkv(seed=1)
    o, lse = ea.exact_attention_lse(q, k, v, None, 0.125, 16, None)
    o_t, lse_t = _truth(q, k, v, 0.125)
    assert torch.allclose(o.double(), o_t, atol=1e-5) and torch.allclose(lse.double(), lse_t, atol=1e-5)
    ea.exact_attention_lse(q, k, v, None, 0.125, 16, None)
    assert counters["chipmunk"]["exact_lse_fallback:broken"] == 1  # "kernel" remembered: not retried


def test_wrong_lse_shape_is_rejected(fake_libraries, monkeypatch):
    monkeypatch.setattr(ea, "LIBRARIES", {"bad": lambda q, k, v, scale, key_mask=None, bias=None: (q.clone(), torch.zeros(3))})
    q, k, v = _qkv(seed=2)
    o, lse = ea.exact_attention_lse(q, k, v, None, 0.125, 16, None)
    assert counters["chipmunk"]["exact_lse_fallback:bad"] == 1
    assert torch.allclose(lse.double(), _truth(q, k, v, 0.125)[1], atol=1e-5)


def _biased_truth(q, k, v, bias, scale, key_mask=None):
    s = torch.einsum("bhnd,bhkd->bhnk", q.double(), k.double()) * scale + bias.double()
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


def _band(N, Nk, width, device="cpu"):
    """0 inside |i - j| <= width, -inf outside: a banded (N, Nk) bias in fp32."""
    i, j = torch.arange(N, device=device)[:, None], torch.arange(Nk, device=device)[None, :]
    return torch.zeros(N, Nk, device=device).masked_fill((i - j).abs() > width, float("-inf"))


def test_score_bias_broadcasts_by_strides():
    """An (Nq, Nk) fp32 bias reaches the libraries as (B, H, Nq, Nk) in q's dtype without a copy per
    (batch, head); a key mask folds into it as -inf columns."""
    q, k, _ = _qkv(B=2, dtype=torch.float16)
    bias = torch.randn(40, 40)
    sb = ea.score_bias(q, k, None, bias)
    assert sb.shape == (2, 2, 40, 40) and sb.dtype == torch.float16 and sb.stride()[:2] == (0, 0)
    key_mask = torch.ones(2, 40, dtype=torch.bool)
    key_mask[1, 30:] = False
    sb = ea.score_bias(q, k, key_mask, bias)
    assert torch.isinf(sb[1, :, :, 30:]).all() and torch.equal(sb[0, 1], bias.half())
    assert ea.score_bias(q, k) is None


@pytest.mark.parametrize("masks", ["key", "bias", "key+bias"])
def test_masks_reach_only_the_libraries_that_take_them(fake_libraries, monkeypatch, masks):
    """A masked or biased call skips the libraries that take neither (not a fallback: not counted) and
    hands both to the first that does, as one additive bias broadcast by strides."""
    calls = []

    def unmasked_only(q, k, v, scale, key_mask=None, bias=None):
        calls.append("unmasked_only")
        raise AssertionError("never called with a mask or bias")

    def with_bias(q, k, v, scale, key_mask=None, bias=None):
        calls.append("with_bias")
        sb = ea.score_bias(q, k, key_mask, bias)
        assert sb.shape == (*q.shape[:3], k.shape[-2]) and sb.stride()[1] == 0
        s = torch.einsum("bhnd,bhkd->bhnk", q, k) * scale + sb
        return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)

    monkeypatch.setattr(ea, "LIBRARIES", {"unmasked_only": unmasked_only, "with_bias": with_bias})
    monkeypatch.setattr(ea, "MASKED", {"with_bias"})
    q, k, v = _qkv(B=2, seed=3)
    key_mask = bias = None
    if "key" in masks:
        key_mask = torch.ones(2, 40, dtype=torch.bool)
        key_mask[0, 25:], key_mask[1, :7] = False, False
    if "bias" in masks:
        bias = _band(40, 40, 20) + torch.randn(40, 40)  # every query keeps a key the key mask allows
    o, lse = ea.exact_attention_lse(q, k, v, key_mask, 0.125, 16, None, bias)
    assert calls == ["with_bias"] and not counters["chipmunk"]
    o_t, lse_t = _biased_truth(q, k, v, torch.zeros(()) if bias is None else bias, 0.125, key_mask)
    assert torch.allclose(o.double(), o_t, atol=1e-5) and torch.allclose(lse.double(), lse_t, atol=1e-5)


def test_biased_call_with_every_library_failing_uses_our_kernel(fake_libraries, monkeypatch):
    monkeypatch.setattr(ea, "LIBRARIES", {"broken": ea.LIBRARIES["broken"]})
    monkeypatch.setattr(ea, "MASKED", {"broken"})
    q, k, v = _qkv(seed=5)
    bias = _band(40, 40, 9) + 0.5 * torch.randn(2, 40, 40)
    o, lse = ea.exact_attention_lse(q, k, v, None, 0.125, 16, None, bias)
    assert counters["chipmunk"]["exact_lse_fallback:broken"] == 1
    o_t, lse_t = _biased_truth(q, k, v, bias, 0.125)
    assert torch.allclose(o.double(), o_t, atol=1e-5) and torch.allclose(lse.double(), lse_t, atol=1e-5)


def test_gqa_never_reaches_the_libraries():
    q, k, v = _qkv()
    assert not ea._library_usable(q, k[:, :1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_library_lse_matches_reference(dtype):
    counters.clear()
    q, k, v = _qkv(1, 4, 4352, 128, "cuda", dtype)
    o, lse = ea.exact_attention_lse(q, k, v, None, 128 ** -0.5, 128, None)
    o_t, lse_t = _truth(q, k, v, 128 ** -0.5)
    assert not any(key.startswith("exact_lse_fallback") for key in counters["chipmunk"])  # cuDNN worked
    assert o.transpose(1, 2).is_contiguous()
    assert ((o.double() - o_t).norm() / o_t.norm()).item() < 2e-2
    assert (lse.double() - lse_t).abs().max().item() < 2e-2


@pytest.mark.gpu
def test_gpu_masked_library_lse_matches_reference():
    """cuDNN with the key mask as a bias, HunyuanVideo 1.5's padding layout (valid keys first)."""
    counters.clear()
    q, k, v = _qkv(2, 4, 4352, 128, "cuda", torch.bfloat16)
    key_mask = torch.ones(2, 4352, dtype=torch.bool, device="cuda")
    key_mask[0, 4000:], key_mask[1, 4100:] = False, False
    o, lse = ea.exact_attention_lse(q, k, v, key_mask, 128 ** -0.5, 128, None)
    o_t, lse_t = _biased_truth(q, k, v, torch.zeros((), device="cuda"), 128 ** -0.5, key_mask)
    assert not any(key.startswith("exact_lse_fallback") for key in counters["chipmunk"])  # cuDNN took the mask
    assert ((o.double() - o_t).norm() / o_t.norm()).item() < 2e-2
    assert (lse.double() - lse_t).abs().max().item() < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4352, 4352), (1, 4, 4352, 4352)])
def test_gpu_biased_library_lse_matches_reference(shape):
    """A library (not our kernel) takes a score bias, broadcast (N, Nk) fp32 or per head in q's dtype."""
    counters.clear()
    ea._choice.clear()
    q, k, v = _qkv(1, 4, 4352, 128, "cuda", torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    bias = _band(4352, 4352, 700, "cuda") + torch.randn(shape, device="cuda", generator=g)
    bias = bias.to(torch.float32 if len(shape) == 2 else torch.bfloat16)
    o, lse = ea.exact_attention_lse(q, k, v, None, 128 ** -0.5, 128, None, bias)
    o_t, lse_t = _biased_truth(q, k, v, bias, 128 ** -0.5)
    print("chosen:", set(ea._choice.values()), dict(counters["chipmunk"]))
    assert set(ea._choice.values()) <= {"cudnn", "efficient"}
    assert ((o.double() - o_t).norm() / o_t.norm()).item() < 2e-2
    assert (lse.double() - lse_t).abs().max().item() < 5e-2
