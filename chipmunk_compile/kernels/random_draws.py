"""Triton twin of ``random_draws_ref.hash_ints``: one draw, computed inside a kernel's own program.

Invariants:
- ``hash_draw(pos, hash_base(STEP, salt * SALT_MUL), high)`` equals
  ``hash_ints(step, salt, shape, high).flatten()[pos]`` for every flat position ``pos``: the same
  int64 arithmetic, every product below 2⁶², nothing overflows (``pos`` must be int64).
- ``STEP`` points at the 1-element int64 device step tensor and is read on the device, so a recorded
  CUDA graph draws new numbers at every replay. A kernel that hashes its draws needs no draws tensor
  in memory: no (rows, r) int64 tensor built by a chain of small torch kernels before its launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import random_draws_ref as hashing

# jit code reads module globals as constexpr only
_POSITION_MUL = tl.constexpr(hashing.POSITION_MUL)
_STEP_MUL = tl.constexpr(hashing.STEP_MUL)
_MIX_MUL = tl.constexpr(hashing.MIX_MUL)
_M32 = tl.constexpr(hashing.M32)


@triton.jit
def hash_base(STEP, salt_term):
    """The position-independent term: salt·SALT_MUL (given, `salt_term`) + step·STEP_MUL."""
    return salt_term + tl.load(STEP) * _STEP_MUL


@triton.jit
def hash_draw(pos, base, high):
    """The draw in [0, high) at flat int64 position(s) `pos` (random_draws_ref.hash_ints)."""
    x = (pos * _POSITION_MUL + base) & _M32
    x = (((x >> 16) ^ x) * _MIX_MUL) & _M32
    x = (((x >> 16) ^ x) * _MIX_MUL) & _M32
    return ((x >> 16) ^ x) % high
