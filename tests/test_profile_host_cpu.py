"""benchmarks/profile_host_cpu.py (CPU): the host path of a replayed step, timed with the replay stubbed,
over every site of a tiny FLUX; the emulation and the stub are undone afterwards."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

from chipmunk_compile import graphs  # noqa: E402


def test_times_a_replayed_call_over_every_site():
    pytest.importorskip("diffusers")
    from profile_host_cpu import measure

    replay = graphs._EmulatedGraph.replay
    r = measure(double=2, single=2, steps=8, calls=3)
    # FLUX's blocks: a double block has a joint attention and two MLPs (image, text), a single one one each
    assert r["sites"] == 2 * 3 + 2 * 2
    assert r["replays"] > 0 and r["parameters"] > 0 and r["inputs"] > r["parameters"]
    assert 0 < r["signature_ms"] < r["call_ms"] and r["address_check_ms"] > 0
    assert graphs.EMULATE is False and graphs._EmulatedGraph.replay is replay
