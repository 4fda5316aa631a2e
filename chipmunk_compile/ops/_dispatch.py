"""Kernel lookup for the ops: Triton when `kernels.get_kernel` allows it, else the reference.

The choice depends only on (name, device, dtype, head dim, CHIPMUNK_KERNELS/TRITON_INTERPRET), so it
is memoized per such key: the ops call this on every step and the full check costs ~10 µs. A
memoized fallback is still counted on every call, as `kernels.get_kernel` counts it.
"""

from __future__ import annotations

import os

from torch._dynamo.utils import counters

from .. import kernels

_memo: dict = {}


def _lookup(name: str, tensors, head_dim) -> tuple:
    """(implementation, the fallback counter it bumps or None), memoized; counts nothing itself."""
    t = tensors[0]
    key = (name, t.device, t.dtype, head_dim, os.environ.get("CHIPMUNK_KERNELS"), os.environ.get("TRITON_INTERPRET"))
    hit = _memo.get(key)
    if hit is None:
        live = counters["chipmunk"]
        before = live.copy()
        impl = kernels.get_kernel(name, *tensors, head_dim=head_dim)  # counts a fallback: taken back below
        new = [k for k, v in live.items() if k.startswith("kernel_fallback") and v != before.get(k, 0)]
        live.clear()
        live.update(before)
        hit = _memo[key] = (impl, new[0] if new else None)
    return hit


def kernel(name: str, *tensors, head_dim=None):
    impl, fallback_key = _lookup(name, tensors, head_dim)
    if fallback_key:
        counters["chipmunk"][fallback_key] += 1
    return impl


def chooses_triton(name: str, *tensors, head_dim=None) -> bool:
    """Whether `kernel` gives these tensors the Triton implementation; counts nothing (a fallback
    is counted when the kernel runs)."""
    return _lookup(name, tensors, head_dim)[0] is not kernels.REFS[name]


__all__ = ["chooses_triton", "kernel"]
