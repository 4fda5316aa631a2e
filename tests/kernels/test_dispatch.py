"""get_kernel: Triton vs reference choice and counted fallbacks."""

import pytest
import torch
from torch._dynamo.utils import counters

from chipmunk_compile import kernels as K


def test_cpu_tensors_fall_back_and_count(monkeypatch):
    monkeypatch.delenv("CHIPMUNK_KERNELS", raising=False)
    counters.clear()
    q = torch.zeros(1, 1, 4, 64)
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert K.get_kernel("attn_dense_colsum", q, q, q) is K.attn_dense_colsum_ref
    assert counters["chipmunk"]["kernel_fallback:attn_dense_colsum:not_cuda"] == 1


def test_forced_ref(monkeypatch):
    monkeypatch.setenv("CHIPMUNK_KERNELS", "ref")
    counters.clear()
    x = torch.zeros(2, 2, device="cuda" if torch.cuda.is_available() else "cpu")
    assert K.get_kernel("mlp_sparse_mm1", x) is K.mlp_sparse_mm1_ref
    assert counters["chipmunk"]["kernel_fallback:mlp_sparse_mm1:forced_ref"] == 1


def test_forced_triton_and_guards(monkeypatch):
    monkeypatch.setenv("CHIPMUNK_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    counters.clear()
    q = torch.zeros(1, 1, 4, 64)
    assert K.get_kernel("attn_column_sparse", q).__name__ == "attn_column_sparse"
    assert K.get_kernel("attn_column_sparse", torch.zeros(1, 1, 4, 80)) is K.attn_column_sparse_ref
    assert counters["chipmunk"]["kernel_fallback:attn_column_sparse:head_dim"] == 1
    assert K.get_kernel("mlp_sparse_mm2", q.double()) is K.mlp_sparse_mm2_ref
    assert counters["chipmunk"]["kernel_fallback:mlp_sparse_mm2:dtype"] == 1
    with pytest.raises(KeyError):
        K.get_kernel("nope")


def test_h_cache_layout():
    h = K.mlp_alloc_h_cache(2, 10, 6, torch.float16, "cpu")
    assert h.shape == (2, 10, 6) and h.stride() == (60, 1, 10)
