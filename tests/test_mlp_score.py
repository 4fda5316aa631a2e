"""Neuron ranking of the sparse MLP: the published pre-activation rule and the output-weighted one."""

import pytest
import torch

from chipmunk_compile.config import MlpConfig
from chipmunk_compile.kernels.mlp_select_neurons_ref import neuron_scores
from chipmunk_compile.ops.mlp import _output_score


class _State:
    def __init__(self, **t):
        self.t = t

    def get(self, name):
        return self.t.get(name)


def test_output_score_weighs_activation_slope_and_fan_out():
    # neuron 0: big pre-activation move deep in gelu's flat negative tail; neuron 1: small move in
    # the linear part; neuron 2: like neuron 1 but its fc2 column is zero
    ref = torch.tensor([[[-9.0, 1.0, 1.0]]])
    now = torch.tensor([[[-6.0, 1.5, 1.5]]])
    st = _State(w2_col_norm=torch.tensor([1.0, 1.0, 0.0]))
    pre = neuron_scores(now, ref, gated=False)
    out = _output_score(st, now, ref, 3, False, "gelu_tanh")
    assert pre[0, 0, 0] > pre[0, 0, 1]  # the published rule prefers neuron 0
    assert out[0, 0, 1] > 100 * out[0, 0, 0]  # the output rule prefers neuron 1 by far
    assert out[0, 0, 2] == 0
    assert torch.allclose(pre, (now - ref).abs())


def test_output_score_gated_uses_the_product():
    Fh = 2
    ref = torch.tensor([[[0.0, 2.0, 1.0, 1.0]]])  # a | b halves
    now = torch.tensor([[[0.0, 2.0, 5.0, 1.0]]])  # only b of neuron 0 moves, but silu(0) = 0
    st = _State(w2_col_norm=torch.ones(Fh))
    out = _output_score(st, now, ref, Fh, True, "silu")
    pre = neuron_scores(now, ref, gated=True)
    assert out[0, 0, 0] == 0 and pre[0, 0, 0] == 4.0  # h = silu(a) * b does not move


def test_score_is_validated():
    with pytest.raises(ValueError, match="mlp.score"):
        MlpConfig(score="magnitude")
