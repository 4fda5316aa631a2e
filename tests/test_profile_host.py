"""benchmarks/profile_host.py (CPU): the marks of a call print in ms from the call's start, a mark the
call never reached prints as 'none', and the timing patches are undone on exit."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from profile_host import host_split, marked  # noqa: E402

from chipmunk_compile import graphs, runtime  # noqa: E402
from helpers import fresh_dynamo  # noqa: E402,F401


def test_host_split_reads_marks_from_the_calls_start():
    marks = {"begin_call": 10.0013, "runner": 10.0014, "launch": 10.0026}  # never launched: 'none'
    line = host_split(13, t0=9.9985, t_call=10.0, t_returned=10.0034, t_synced=10.0842, marks=marks)
    assert line.startswith("step 13: set_step 1.50 ms")
    assert "begin_call 1.30, runner 1.40, launch 2.60, launched none" in line
    assert "returned 3.40, GPU done 84.20 ms" in line


def test_marked_patches_and_restores():
    originals = (runtime.Session.begin_call, graphs.GraphRunner.__call__, graphs._CudaGraph.replay)
    marks = {}
    with marked(marks):
        assert runtime.Session.begin_call is not originals[0]
        assert graphs._CudaGraph.replay is not originals[2]
    assert (runtime.Session.begin_call, graphs.GraphRunner.__call__, graphs._CudaGraph.replay) == originals


def test_marks_a_real_call_through_the_runtime(fresh_dynamo):
    """The patched methods take what the runtime passes them (begin_call's keywords included): a
    compiled tiny FLUX's call under `marked` runs and marks the step tracker's entry."""
    pytest.importorskip("diffusers")
    from helpers import cfg, chip, flux, flux_inputs

    model = chip(flux(), cfg())
    marks = {}
    with marked(marks), torch.no_grad():
        out = model(**flux_inputs(1.0))[0]
    assert torch.isfinite(out).all() and "begin_call" in marks
