"""Higher-order ops whose subgraphs the patterns never saw: Dynamo records
`torch.utils.checkpoint.checkpoint(block, x)` as `tag_activation_checkpoint` and, under no_grad, a
call of a `torch.compiler.nested_compile_region` function as `invoke_subgraph`, each with the block
as a subgraph of its own, so a DiT that checkpoints its blocks or marks them as a compile region got
no sites. The rewrite inlines the bodies first (neither op changes the forward values)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import chipmunk_compile

from helpers import FULL_KEYS, cfg, fresh_dynamo, matches_eager  # noqa: F401

B, N, C, H = 2, 32, 16, 2
SMALL = cfg(attn={"group": 8, **FULL_KEYS}, mlp={"block": 8, **FULL_KEYS})


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, H, c // H).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(x)))


class Checkpointed(nn.Module):
    def __init__(self, nested=False):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block() for _ in range(2)])
        self.nested = nested

    def _both(self, x):
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False)
        return x

    def forward(self, x, t):
        x = x * (1 + 1e-3 * t)
        if self.nested:  # a checkpointed region that checkpoints each block again
            return checkpoint(self._both, x, use_reentrant=False)
        return self._both(x)


def tokens(step):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, N, C, generator=g) * (1 + 0.05 * step), torch.tensor([1000.0 - 100 * step])


class RegionBlock(Block):
    def forward(self, x):
        return super().forward(x)


if hasattr(torch.compiler, "nested_compile_region"):  # torch >= 2.8
    RegionBlock.forward = torch.compiler.nested_compile_region(RegionBlock.forward)


class Regions(Checkpointed):
    """Its blocks as one nested compile region: one body shared by both calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([RegionBlock() for _ in range(2)])

    def _both(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


# each block's sites by its own path (a region's shared body, traced in blocks.0, re-rooted per call)
PATHS = [("attention", "blocks.0"), ("attention", "blocks.1"), ("mlp", "blocks.0.fc2"), ("mlp", "blocks.1.fc2")]


@pytest.mark.parametrize("make, paths", [
    (lambda: Checkpointed(nested=False), PATHS),
    (lambda: Checkpointed(nested=True), PATHS),
    pytest.param(Regions, PATHS, marks=pytest.mark.skipif(
        not hasattr(torch.compiler, "nested_compile_region"), reason="torch without nested_compile_region")),
], ids=["checkpoint", "nested-checkpoint", "nested-compile-region"])
def test_blocks_inside_subgraphs_get_sites(fresh_dynamo, make, paths):
    mod = make().eval()
    with torch.no_grad():  # where Dynamo records invoke_subgraph for a compile region
        rep = chipmunk_compile.inspect(mod, *tokens(0), config=SMALL)
    assert sorted((s.kind, s.path) for s in rep.sites) == paths, str(rep)
    sc = matches_eager(mod, SMALL, [(tokens(i), {}) for i in range(3)])
    assert sc.get("attention_sparse", 0) > 0 and sc.get("mlp_sparse", 0) > 0, sc


@pytest.mark.skipif(not hasattr(torch.compiler, "nested_compile_region"), reason="torch without nested_compile_region")
def test_path_overrides_reach_each_call_of_a_shared_region(fresh_dynamo):
    """The shared body was traced in blocks.0; an override of blocks.1 must reach blocks.1's copy."""
    config = {**SMALL, "overrides": {"blocks.1*": {"attn": {"enabled": False}}}}
    with torch.no_grad():
        rep = chipmunk_compile.inspect(Regions().eval(), *tokens(0), config=config)
    assert sorted((s.kind, s.path) for s in rep.sites) == [
        ("attention", "blocks.0"), ("mlp", "blocks.0.fc2"), ("mlp", "blocks.1.fc2")], str(rep)
    assert [(r.path, r.reason) for r in rep.rejected if r.kind == "attention"] == [("blocks.1", "disabled by config")]
