"""The pure parts of benchmarks/bench_e2e.py: step-kind labels, the coverage sequence, 50-step
totals from per-kind medians, and the linear depth extrapolation behind the video results."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_e2e as be  # noqa: E402


def test_coverage_holds_every_kind_up_to_reps():
    for preset in ("flux", "hunyuan-video", "wan", "mochi"):
        labels = be.step_labels(preset, 50)
        for reps in (1, 2, 3):
            seq = be.coverage(preset, 50, reps)
            assert seq == sorted(seq)
            for label in set(labels):
                assert sum(labels[s] == label for s in seq) == min(reps, labels.count(label)), (preset, label)


def test_flux_labels_split_index_reuse():
    labels = be.step_labels("flux", 50)
    assert labels[0] == "attn:dense/mlp:dense" and labels[1].startswith("attn:refresh")
    assert labels[11].endswith("+reuse") and labels[12].endswith("+sel") and labels[3].endswith("+sel")
    assert be.coverage("flux", 50) == [0, 1, 2, 3, 10, 11, 13, 20]


def test_total_and_extrapolation_exact_on_linear_data():
    labels = ["a", "b", "b", "a", "b"]
    med = be.medians_by_label({0: 1.0, 1: 5.0, 2: 7.0, 3: 3.0}, labels)
    assert med == {"a": 2.0, "b": 6.0}
    assert be.total_from_medians(med, labels) == 2 * 2.0 + 3 * 6.0
    cost = lambda n, fixed, per: fixed + per * n  # noqa: E731
    m1 = {"a": cost(2, 10, 3), "b": cost(2, 1, 7)}
    m2 = {"a": cost(4, 10, 3), "b": cost(4, 1, 7)}
    assert be.extrapolate(m1, 2, m2, 4, 40) == pytest.approx({"a": cost(40, 10, 3), "b": cost(40, 1, 7)})


def test_parse_blocks_rejects_bad_counts():
    assert be.parse_blocks("3,2") == [2, 3] and be.parse_blocks(None) is None
    for bad in ("2,2", "0", "1,2,3"):
        with pytest.raises(ValueError):
            be.parse_blocks(bad)
