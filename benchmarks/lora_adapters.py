"""LoRA adapters shaped as peft leaves them (diffusers' `load_lora_weights` before `fuse_lora`),
without peft: the tests (CI has no peft) and `bench_e2e.py --lora R` use them.

`LoraLinear.forward` spells out peft's `Linear.forward`: the base layer, then per adapter
`result + lora_B(lora_A(dropout(x))) * scaling`, then the cast back to the result's dtype. Both
factors start random (a trained adapter, not peft's zero B), on the base weight's device and dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, rank=2, scales=(0.5,), dropout=0.0, bias=False, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.base_layer, self.scales = base, scales
        self.lora_A = nn.ModuleList(nn.Linear(base.in_features, rank, bias=False, **kw) for _ in scales)
        self.lora_B = nn.ModuleList(nn.Linear(rank, base.out_features, bias=bias, **kw) for _ in scales)
        for a, b in zip(self.lora_A, self.lora_B):
            a.weight.data.copy_(torch.randn(a.weight.shape, generator=g) / base.in_features ** 0.5)
            b.weight.data.copy_(torch.randn(b.weight.shape, generator=g) * 0.3 / rank ** 0.5)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def tensor_scales(self) -> "LoraLinear":
        """Scales as 0-dim tensors, as peft's `prepare_model_for_compiled_hotswap` makes them."""
        self.scales = [torch.tensor(float(s)) for s in self.scales]
        return self

    def forward(self, x):
        result = self.base_layer(x)
        dtype = result.dtype
        for a, b, s in zip(self.lora_A, self.lora_B, self.scales):
            result = result + b(a(self.dropout(x))) * s
        return result.to(dtype)


def add_lora(module: nn.Module, names=None, **kw) -> nn.Module:
    """Wrap the named nn.Linear submodules (dotted paths; None: every nn.Linear under a path with
    "blocks" in it, as adapters trained on a DiT's blocks are) in LoraLinear, in place."""
    if names is None:
        names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and "blocks" in n]
    for i, name in enumerate(names):
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, leaf, LoraLinear(getattr(parent, leaf), seed=i, **kw))
    return module
