"""benchmarks/bench_dense_mlp_step.py on the CPU at a small size: its three rows compute the same
MLP (the padded and unpadded cache steps match the eager MLP), at an odd and an aligned token count."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_dense_mlp_step as bd  # noqa: E402


@pytest.mark.parametrize("m", [37, 64])
def test_rows_compute_the_same_mlp(m):
    fns, err = bd.runs(m, 16, 24, "cpu", torch.float64)
    assert set(fns) == {"padded_cache", "unpadded_cache", "eager_mlp"}
    assert err < 1e-12
    ref = fns["eager_mlp"]()
    for name in ("padded_cache", "unpadded_cache"):
        torch.testing.assert_close(fns[name](), ref)
