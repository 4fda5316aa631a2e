"""benchmarks/fuzz_dits.py on the few seeds that together take every value of every axis: random image and
video DiTs assembled from the spellings real code uses are matched in full, grouped on their latent grid
where they show it, and reproduce eager exactly, across
switches of resolution and batch (and, with every key kept, of grid at one token count) that land on
sparse steps, under whole-model (wrapped or in place), dynamic and per-block compilation, in float32, bfloat16, float16 and under
autocast, with guidance batched or as two or three calls a step: with every key and neuron kept, and with a quarter
kept and each size's inputs repeated (what shows a cache read in the wrong place). Found with it
(session 69): explicit attention that masks its scores with `masked_fill`, and softmax written out
as exp / sum, were never matched; (session 70, its cross-attention axis run with a context as long
as the image) a cross-attention of equal lengths became a site where its keys were grouped-query
heads repeated to the query heads (test_patterns.py::test_reject_cross_attention_of_equal_lengths);
(session 71, its text-keys-only axis value) image queries over cat(text keys, image keys) were
rejected as cross-attention where the joint keys went through a rotate-half rotary or a grouped-query
repeat after the concatenation (test_patterns.py::test_joint_keys_queries_over_text_and_own_keys);
(session 72, its in-place compilation axis and the check of `inspect()` on the compiled model)
`inspect` of a model compiled in place traced nothing and ran that compilation, a step of its
generation (tests/test_inspect_config.py)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import fuzz_dits  # noqa: E402
from helpers import fresh_dynamo  # noqa: E402,F401


# a float32 seed without autocast: the teeth tests below need float32's tolerance
FP32_SEED = next(s for s in range(100) if fuzz_dits.spec_for(s).dtype == "float32" and not fuzz_dits.spec_for(s).autocast)


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
    assert {("text_queries", repr(t)) for t in fuzz_dits.AXES["text_queries"]} <= seen
    assert {("frames", repr(t)) for t in (1, 3, 5)} <= seen  # an image, a video of 3 and of 5 latent frames
    assert {("dtype", repr(d)) for d in ("float32", "bfloat16", "float16")} <= seen
    assert {("guidance_calls", repr(n)) for n in (2, 3)} <= seen  # guidance as two and as three calls a step
    seen_modes = {(fuzz_dits.spec_for(s).compile, fuzz_dits.spec_for(s).compile_call) for s in fuzz_dits.covering_seeds()}
    assert ("whole", "in_place") in seen_modes or ("dynamic", "in_place") in seen_modes  # model.compile(...)


def test_check_catches_an_ungrouped_site(fresh_dynamo, monkeypatch):
    """The grouping check has teeth: packed tokens whose (h, w) position ids the rotary reads are
    grouped on the spec's grid; with two-column ids unread (as before session 71) every site runs
    ungrouped, exact all the same, and `check` says so."""
    from chipmunk_compile import grouping

    seed = next(s for s in range(100) if (sp := fuzz_dits.spec_for(s)).embed == "tokens" and sp.rope != "none"
                and sp.frames == 1 and sp.dtype == "float32" and not sp.autocast and sp.compile == "whole")
    monkeypatch.setattr(grouping, "ID_COLUMNS", (3, 4))
    row = fuzz_dits.check(fuzz_dits.spec_for(seed))
    assert row["status"] == "mismatch" and row["note"].startswith("grouping"), row


def test_check_catches_an_inspect_that_steps_the_compiled_model(fresh_dynamo, monkeypatch):
    """The compiled-model inspect check has teeth: an `inspect` that runs the model's own
    compilation (as it did for `model.compile(...)` before session 72: a step taken, nothing traced)
    is caught."""
    import chipmunk_compile

    seed = next(s for s in range(100) if (sp := fuzz_dits.spec_for(s)).compile == "whole"
                and sp.compile_call == "in_place" and sp.dtype == "float32" and not sp.autocast)
    inspect = chipmunk_compile.inspect

    def stepping(model, *args, config=None, **kw):
        model(*args, **kw)  # what running the in-place compilation did
        return inspect(model, *args, config=config, **kw)

    monkeypatch.setattr(chipmunk_compile, "inspect", stepping)
    row = fuzz_dits.check(fuzz_dits.spec_for(seed))
    assert row["status"] == "mismatch" and "inspect of the compiled model took a step" in row["note"], row


def test_check_catches_an_inexact_sparse_step(fresh_dynamo, monkeypatch):
    """The exactness check has teeth: with a quarter of the keys and neurons, inputs drifting, the
    sparse steps are approximate, and `check` says so."""
    partial = {kind: {**cfg, "top_keys": 0.25} for kind, cfg in fuzz_dits.FULL.items() if kind in ("attn", "mlp")}
    monkeypatch.setattr(fuzz_dits, "FULL", {**fuzz_dits.FULL, **partial})
    row = fuzz_dits.check(fuzz_dits.spec_for(FP32_SEED))
    assert row["status"] == "mismatch" and row["note"].startswith("full keys: error"), row


def test_frozen_inputs_catch_a_misplaced_cache(fresh_dynamo, monkeypatch):
    """With every key kept a sparse step is exact whatever its cache holds: a cache read one token
    off passes the full-key run unseen. The frozen-input run (a quarter of the keys, each size's
    inputs repeated) is what sees it."""
    from chipmunk_compile import kernels
    from chipmunk_compile.ops import _dispatch

    ref = kernels.REFS["attn_column_sparse"]

    def misplaced(*args, o_base=None, sign=1.0, out=None, **kw):
        if o_base is not None and sign == 1.0 and out is None:  # a sparse step's read of o_cache
            o_base = o_base.roll(1, -2)
        return ref(*args, o_base=o_base, sign=sign, out=out, **kw)

    monkeypatch.setitem(kernels.REFS, "attn_column_sparse", misplaced)
    monkeypatch.setattr(_dispatch, "_memo", {})  # the ops' memoized lookup would keep the reference
    row = fuzz_dits.check(fuzz_dits.spec_for(FP32_SEED))
    assert row["status"] == "mismatch" and row["note"].startswith("frozen inputs: error"), row
    assert float(row["max_err"]) < 1e-5, row  # the full-key run saw nothing


def test_frozen_inputs_catch_a_guidance_branch_sharing_another_s_caches(fresh_dynamo, monkeypatch):
    """The branch checks have teeth: where three guidance calls a step run as two branches (the
    second condition's call pinned to the prompt's branch), the frozen-input run sees the prompt's
    sparse steps read the second condition's caches (float32; 16-bit tolerances are too loose to)."""
    seed = next(s for s in range(100) if (sp := fuzz_dits.spec_for(s)).guidance_calls == 3
                and sp.compile == "regional" and sp.dtype == "float32" and not sp.autocast)
    branches = fuzz_dits._branches

    def shared(spec, calls):
        return [(c, step, "cond" if b == "cond_2" else b) for c, step, b in branches(spec, calls)]

    monkeypatch.setattr(fuzz_dits, "_branches", shared)
    row = fuzz_dits.check(fuzz_dits.spec_for(seed))
    assert row["status"] == "mismatch" and row["note"].startswith("frozen inputs: error"), row
