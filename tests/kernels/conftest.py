"""Shared helpers for the kernel tests.

- ``triton_mode`` forces the Triton kernels (interpreter on CPU) and NaN-poisons kernel outputs;
  references never need it.
- helpers (rel_err, tolerances, DEV) live in kernel_testutils.py.
"""

import os
import sys

import pytest
import torch

try:  # make the package importable when the repo is not installed
    import chipmunk_compile  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


@pytest.fixture
def triton_mode(monkeypatch):
    monkeypatch.setenv("CHIPMUNK_KERNELS", "triton")
    monkeypatch.setenv("CHIPMUNK_KERNELS_POISON", "1")
    yield
