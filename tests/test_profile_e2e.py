"""benchmarks/profile_e2e.py's accounting (CPU): kernel kinds by name, and the GPU idle time inside a
step's span that summed kernel times miss."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from profile_e2e import KERNEL_KINDS, gpu_idle, step_timeline  # noqa: E402


def _kind(name):
    return next((k for k, rx in KERNEL_KINDS if rx.search(name)), "other")


def test_chipmunk_kernels_are_classified_as_ours():
    for name in ("_csp_pingpong_kernel", "_csp_hopper_kernel", "_attn_column_sparse_kernel", "_mlp_sparse_mm1_kernel",
                 "_select_columns_kernel"):
        assert _kind(name).startswith("chipmunk"), name
    assert _kind("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN") == "cuBLAS gemm"
    assert _kind("triton_poi_fused_gelu_view_17") == "inductor triton"


def test_gpu_idle_counts_only_uncovered_time():
    # 0-10 and 5-12 overlap (no idle), 12-20 idle, 30-31 idle; a kernel nested inside another adds none
    spans = [(20.0, 30.0), (0.0, 10.0), (5.0, 12.0), (31.0, 40.0), (32.0, 33.0)]
    line = gpu_idle(spans, n_steps=1)
    assert "0.04 ms/step" in line and "idle in it 0.01 ms/step" in line  # 40 us span, 9 us idle
    assert "idle in it 0.00" in gpu_idle([(0.0, 5000.0), (5000.0, 9000.0)], n_steps=2)
    assert gpu_idle([], 1) == "no GPU activity"


def test_step_timeline_splits_the_wall_time():
    # step 0-100 us; kernels 10-30 and 40-80: host 10 us, span 70 us with 10 us idle, 20 us after the last kernel
    line = step_timeline(0.0, 100.0, [(40.0, 80.0), (10.0, 30.0)])
    assert "step wall 0.10 ms" in line
    assert "host before the first kernel 0.01" in line
    assert "GPU span 0.07 (kernels 0.06, idle 0.01)" in line
    assert "after the last kernel 0.02" in line
    assert step_timeline(0.0, 1.0, []) == "no GPU activity"


def test_idle_by_neighbours_sums_gaps_per_kernel_pair_and_size():
    from profile_e2e import idle_by_neighbours, short_kernel_name

    kernels = [("_csp_pingpong_kernel", 0.0, 10.0), ("triton_poi_fused_add_3", 11.0, 20.0),  # 1 us gap
               ("_csp_pingpong_kernel", 50.0, 60.0),  # 30 us after triton_poi
               ("nvjet_sm90_tst_192x192", 55.0, 58.0),  # overlaps: no gap
               ("triton_poi_fused_mul_9", 63.0, 64.0)]  # 3 us after the ping-pong (whose end is latest)
    text = idle_by_neighbours(kernels)
    assert "5 kernels" in text
    assert "gaps <2 us         1 gaps    0.001 ms" in text
    assert "gaps 2-5 us        1 gaps    0.003 ms" in text
    assert "gaps >=20 us       1 gaps    0.030 ms" in text
    lines = text.splitlines()
    # the longest pair ranks first
    assert lines[5].endswith("triton_poi -> _csp_pingpong_kernel") and "0.030 ms" in lines[5]
    assert lines[6].endswith("_csp_pingpong_kernel -> triton_poi") and "0.004 ms in     2 gaps" in lines[6]
    assert short_kernel_name("nvjet_sm90_tst_192x8_64x8_4x1_v_bz_bias_TNT") == "cuBLAS gemm"
    assert idle_by_neighbours(kernels[:1]) == "fewer than two kernels"


def test_gpu_kernels_leave_out_annotations_and_host_events():
    from types import SimpleNamespace

    import torch
    from profile_e2e import gpu_kernels

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(name="profiled_step", device_type=cuda, is_user_annotation=True),
              SimpleNamespace(name="profiled_step", device_type=cpu, is_user_annotation=True),
              SimpleNamespace(name="_csp_pingpong_kernel", device_type=cuda, is_user_annotation=False),
              SimpleNamespace(name="aten::mm", device_type=cpu, is_user_annotation=False)]
    prof = SimpleNamespace(events=lambda: events)
    assert [e.name for e in gpu_kernels(prof)] == ["_csp_pingpong_kernel"]


def test_step_windows_must_not_overlap():
    import pytest
    from profile_e2e import step_windows

    assert step_windows([13, 5, 5], 1) == [5, 13]
    assert step_windows([5, 9], 4) == [5, 9]  # 5..8, then 9..12
    with pytest.raises(ValueError, match="overlaps step 8"):
        step_windows([5, 8], 4)
    with pytest.raises(ValueError, match=">= 1"):
        step_windows([5], 0)
