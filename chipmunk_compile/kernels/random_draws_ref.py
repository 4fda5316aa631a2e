"""Counter-based random draws: the hash that the ops' random key/neuron picks use (PyTorch only).

Invariants:
- ``hash_ints(step, salt, shape, high)[i]`` (flat index i) = h(i) % high with
  h(i) = mix(mix((i·0x9E3779B1 + salt·0x85EBCA6B + step·0xC2B2AE35) mod 2³²)) xor-shifted once
  more, mix(x) = (((x >> 16) ^ x)·0x45D9F3B) mod 2³². Pure int64 arithmetic on the device; every
  product stays below 2⁶², so nothing overflows.
- ``step`` is a 1-element int64 tensor on the target device, read on the device: a recorded CUDA
  graph draws new numbers at every replay, with no host seed baked in.
- ``HashDraws`` names the draws (step tensor, salt) without making them: the Triton select kernel
  computes the same h(i) in its own program (no (B, H, Gc, r) int64 tensor, gather or scatter
  through memory: 3-4 ms per HunyuanVideo-size refresh), the reference materializes them here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

M32 = 0xFFFFFFFF
POSITION_MUL, SALT_MUL, STEP_MUL, MIX_MUL = 0x9E3779B1, 0x85EBCA6B, 0xC2B2AE35, 0x45D9F3B


def hash_ints(step: torch.Tensor, salt: int, shape: tuple, high: int) -> torch.Tensor:
    """Pseudo-random ints in [0, high) of `shape` (see the module docstring)."""
    n = 1
    for d in shape:
        n *= int(d)
    x = torch.arange(n, device=step.device, dtype=torch.int64)
    x = (x * POSITION_MUL + (salt * SALT_MUL + step * STEP_MUL)) & M32
    for _ in range(2):
        x = (((x >> 16) ^ x) * MIX_MUL) & M32
    x = (x >> 16) ^ x
    return (x % int(high)).view(shape)


@dataclass(frozen=True, eq=False)  # compared by identity: a field-wise == on the step tensor is elementwise
class HashDraws:
    """Draws by ``hash_ints(step, salt, shape, high)``, made where they are used."""

    step: torch.Tensor
    salt: int

    def ints(self, shape: tuple, high: int) -> torch.Tensor:
        return hash_ints(self.step, self.salt, shape, high)

    @property
    def salt_term(self) -> int:
        """salt·SALT_MUL: what a kernel that hashes its own draws takes (random_draws.hash_base)."""
        return self.salt * SALT_MUL
