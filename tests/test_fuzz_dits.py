"""benchmarks/fuzz_dits.py on the few seeds that together take every value of every axis: random DiTs
assembled from the spellings real code uses are matched in full and, with every key and neuron
kept, reproduce eager exactly, across a switch of resolution, under whole-model, dynamic and
regional compilation. Found with it (session 69): explicit attention that masks its scores with
`masked_fill`, and softmax written out as exp / sum, were never matched."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import fuzz_dits  # noqa: E402
from helpers import fresh_dynamo  # noqa: E402,F401


@pytest.mark.parametrize("seed", fuzz_dits.covering_seeds())
def test_fuzzed_dit_is_matched_and_exact(fresh_dynamo, seed):
    spec = fuzz_dits.spec_for(seed)
    row = fuzz_dits.check(spec)
    assert row["status"] == "ok", f"{spec.short()}: {row['note']}"
    assert row["sparse_steps"] > 0


def test_covering_seeds_take_every_value():
    seen = {(f, repr(getattr(fuzz_dits.spec_for(s), f))) for s in fuzz_dits.covering_seeds() for f in fuzz_dits.AXES}
    assert {("attn", repr(a)) for a in fuzz_dits.AXES["attn"]} <= seen
    assert {("compile", repr(c)) for c in fuzz_dits.AXES["compile"]} <= seen
    assert {("text", repr(t)) for t in fuzz_dits.AXES["text"]} <= seen


def test_check_catches_an_inexact_sparse_step(fresh_dynamo, monkeypatch):
    """The exactness check has teeth: with a quarter of the keys and neurons the sparse steps are
    approximate, and `check` says so."""
    partial = {kind: {**cfg, "top_keys": 0.25} for kind, cfg in fuzz_dits.FULL.items() if kind in ("attn", "mlp")}
    monkeypatch.setattr(fuzz_dits, "FULL", {**fuzz_dits.FULL, **partial})
    row = fuzz_dits.check(fuzz_dits.spec_for(fuzz_dits.covering_seeds()[0]))
    assert row["status"] == "mismatch" and row["note"].startswith("error"), row
