"""An attention kernel behind a custom op (diffusers' flash / sage backends, a flash-attn build) is
one opaque node: it stays as it is, and `inspect()` lists it as a rejected attention candidate that
says what to do, where it said only that no softmax attention was found."""

import pytest
import torch
import torch.nn.functional as F

import chipmunk_compile

from helpers import ALL_SITES, fresh_dynamo  # noqa: F401


@torch.library.custom_op("chipmunk_tests::fused_attention", mutates_args=())
def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, H, D) layout as flash-attn takes it; returns (output, lse) as flash kernels do."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2).contiguous(), torch.zeros(q.shape[0], q.shape[2], q.shape[1])


@fused_attention.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q), q.new_empty(q.shape[0], q.shape[2], q.shape[1])


@torch.library.custom_op("chipmunk_tests::scale_rows", mutates_args=())
def scale_rows(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Three same-rank tensors that are no attention: the key/value lengths differ."""
    return x * a.mean() * b.mean()


@scale_rows.register_fake
def _(x, a, b):
    return torch.empty_like(x)


class Block(torch.nn.Module):
    def __init__(self, packet: bool = False):
        super().__init__()
        self.packet = packet
        self.qkv, self.o = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)
        self.fc1, self.fc2 = torch.nn.Linear(32, 128), torch.nn.Linear(128, 32)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 16).unbind(2)
        op = torch.ops.chipmunk_tests.fused_attention if self.packet else fused_attention  # an OpOverloadPacket
        a, _ = op(q, k, v, 0.25)
        x = x + self.o(a.reshape(b, n, c))
        x = scale_rows(x, x[:, :3], x[:, :5])
        return x + self.fc2(F.gelu(self.fc1(x)))


@pytest.mark.parametrize("packet", [False, True])
def test_an_attention_kernel_in_a_custom_op_is_reported(fresh_dynamo, packet):
    model = Block(packet).eval()
    x = torch.randn(1, 64, 32)
    rep = chipmunk_compile.inspect(model, x, config=ALL_SITES)
    attn = [r for r in rep.rejected if r.kind == "attention"]
    assert [r.pattern for r in attn] == ["opaque"]  # the kernel, not the row-scaling op
    assert "chipmunk_tests.fused_attention" in attn[0].reason and "set_attention_backend" in attn[0].reason
    assert rep.count("attention") == 0 and rep.count("mlp") == 1
    compiled = torch.compile(model, backend="chipmunk", options={"config": ALL_SITES, "compiler": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
