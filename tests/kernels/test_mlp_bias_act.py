"""mlp_bias_act: the one-pass Triton kernel against the reference, in place over (F, M) products."""

import pytest
import torch
import torch.nn.functional as F
from kernel_testutils import DEV, compile_kernel_for_hopper, rel_err

from chipmunk_compile.kernels import get_kernel, mlp_bias_act_ref
from chipmunk_compile.kernels._common import ACTS


def _inputs(F_, M, dtype, seed, gated, biased, strided=False):
    g = torch.Generator().manual_seed(seed)
    if strided:  # a (F, M) view of a wider buffer, as hᵀ[b] of a padded neuron-major cache
        h = torch.randn(F_, M + 24, generator=g).to(DEV, dtype)[:, 5:5 + M]
    else:
        h = torch.randn(F_, M, generator=g).to(DEV, dtype)
    bias = torch.randn(F_, generator=g).to(DEV, dtype) if biased else None
    gate = torch.randn(F_, M, generator=g).to(DEV, dtype) if gated else None
    gate_bias = torch.randn(F_, generator=g).to(DEV, dtype) if gated and biased else None
    return h, bias, gate, gate_bias


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("F_,M,dtype,gated,biased,strided", [
    (40, 70, torch.float32, False, True, False),  # neither a multiple of the tile
    (33, 100, torch.float16, True, True, False),  # gated, both biases
    (17, 45, torch.float32, True, False, True),  # gated, no biases, strided h
    (64, 64, torch.float16, False, False, False),  # activation only
])
def test_triton_matches_reference(triton_mode, act, F_, M, dtype, gated, biased, strided):
    from chipmunk_compile.kernels.mlp_bias_act import mlp_bias_act

    h, bias, gate, gate_bias = _inputs(F_, M, dtype, F_ + M, gated, biased, strided)
    assert get_kernel("mlp_bias_act", h) is mlp_bias_act
    ref = mlp_bias_act_ref(h.clone(), bias, act=act, gate=gate, gate_bias=gate_bias)
    before = h.clone()
    out = mlp_bias_act(h, bias, act=act, gate=gate, gate_bias=gate_bias)
    assert out is h  # in place
    assert rel_err(h.float(), ref.float()) < (1e-6 if dtype == torch.float32 else 2e-3)
    assert not torch.equal(h, before)  # every case changes h (relu keeps the positives, not the negatives)


def test_reference_is_the_gated_mlp_hidden_state():
    """The reference against the formula it stands for: act(x wᵀ + b) * (x w_linᵀ + b_lin), transposed."""
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(12, 16, generator=g), torch.randn(20, 16, generator=g), torch.randn(20, generator=g)
    wl, bl = torch.randn(20, 16, generator=g), torch.randn(20, generator=g)
    hT = mlp_bias_act_ref(w @ x.t(), b, act="gelu_tanh", gate=wl @ x.t(), gate_bias=bl)
    want = F.gelu(x @ w.t() + b, approximate="tanh") * (x @ wl.t() + bl)
    assert rel_err(hT.t(), want) < 1e-6


def test_triton_leaves_the_padding_of_a_wider_buffer_alone(triton_mode):
    """Masked at M: the columns of the underlying buffer past the view are not written."""
    from chipmunk_compile.kernels.mlp_bias_act import mlp_bias_act

    buf = torch.randn(24, 90).to(DEV, torch.float32)
    keep = buf[:, 70:].clone()
    mlp_bias_act(buf[:, :70], torch.ones(24, device=DEV), act="relu")
    assert torch.equal(buf[:, 70:], keep)


def test_both_refuse_a_gate_of_another_shape(triton_mode):
    """A (1, M) gate would broadcast in torch's ops: both implementations refuse it instead."""
    from chipmunk_compile.kernels.mlp_bias_act import mlp_bias_act

    h, gate = torch.randn(8, 16).to(DEV), torch.randn(1, 16).to(DEV)
    for fn in (mlp_bias_act, mlp_bias_act_ref):
        with pytest.raises(ValueError, match="gate of the same shape"):
            fn(h, None, act="silu", gate=gate)


@pytest.mark.parametrize("gated", [False, True])
def test_compiles_for_hopper_without_a_gpu(gated):
    from chipmunk_compile.kernels.mlp_bias_act import TILE

    block_f, block_m, warps = TILE
    compile_kernel_for_hopper("chipmunk_compile.kernels.mlp_bias_act", "_mlp_bias_act_kernel",
                              ["*bf16"] * 4 + ["i32"] * 2 + ["i64"] * 4,
                              {"ACT": 1, "HAS_BIAS": True, "HAS_GATE": gated, "HAS_GATE_BIAS": gated,
                               "BLOCK_F": block_f, "BLOCK_M": block_m}, warps)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_flux_shape_bf16():
    """FLUX.1's fc1 product (12288 x 4352) in bf16 against the reference."""
    from chipmunk_compile.kernels.mlp_bias_act import mlp_bias_act

    h = torch.randn(12288, 4352, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(12288, device="cuda", dtype=torch.bfloat16)
    ref = mlp_bias_act_ref(h.clone(), bias, act="gelu_tanh")
    assert get_kernel("mlp_bias_act", h) is mlp_bias_act
    mlp_bias_act(h, bias, act="gelu_tanh")
    assert rel_err(h.float(), ref.float()) < 1e-2
