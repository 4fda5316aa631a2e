"""benchmarks/arch_zoo.py on a few of its architectures: each runs through inspect and the
compiled backend, dense steps are exact, sparse steps really ran and stay close. Flux2's SwiGLU
(halves sliced out of one linear), Allegro's per-frame conv grid and CogView4's patchified
latent are the forms that were missed before."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import arch_zoo  # noqa: E402
from helpers import fresh_dynamo  # noqa: E402,F401


@pytest.mark.parametrize("name,mlp_sites,grouping", [
    ("flux2", 2, "position ids input img_ids h×w 12×12"),
    ("allegro", 3, "conv2d patch embed (per frame) t×h×w"),
    ("cogview4", 4, "patchified input hidden_states h×w"),
])
def test_zoo_rows(fresh_dynamo, name, mlp_sites, grouping):
    row = arch_zoo.measure(name)
    assert row["status"] == "ok", row["note"]
    assert row["mlp"] == mlp_sites and row["attn"] >= 1
    assert grouping in row["grouping"]
    assert float(row["dense_err"]) < 1e-5 and 0 < float(row["sparse_err"]) < 0.1
    assert row["sparse_steps"] > 0 and not row["fallbacks"]
