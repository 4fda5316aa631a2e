"""Kernel lookup for the ops: Triton when `kernels.get_kernel` allows it, else the reference."""

from __future__ import annotations

from .. import kernels


def kernel(name: str, *tensors, head_dim=None):
    return kernels.get_kernel(name, *tensors, head_dim=head_dim)
