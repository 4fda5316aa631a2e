"""`inspect()` on a compiled model reports what that model runs: the config it was compiled with (read
from its sessions once it ran, else from torch.compile's options), also when it was compiled in place
(`module.compile(...)`), which it traces without running that compilation (no step taken)."""

import functools

import pytest
import torch

import chipmunk_compile
from chipmunk_compile.backend import chipmunk_backend
from chipmunk_compile.compiled_options import compiled_options

from helpers import ALL_SITES, TwoTinyBlocks, fresh_dynamo  # noqa: F401

# 64 tokens: under `default` (min_tokens 1024) every candidate is too short; under ALL_SITES each
# block has an attention and an MLP site
X = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(0))


def _compiled(how: str, config):
    model = TwoTinyBlocks().eval()
    options = {"config": config, "compiler": "eager"}
    if how == "wrapper":
        return model, torch.compile(model, backend="chipmunk", options=options)
    if how == "in_place":
        model.compile(backend="chipmunk", options=options)
        return model, model
    if how == "regional":
        for block in model.blocks:
            block.compile(backend="chipmunk", options=options)
        return model, model
    if how == "partial":  # the backend function itself, its options bound
        return model, torch.compile(model, backend=functools.partial(chipmunk_backend, options=options))
    raise ValueError(how)


@pytest.mark.parametrize("how", ["wrapper", "in_place", "regional", "partial"])
def test_inspect_uses_the_compiled_models_config_before_and_after_it_ran(fresh_dynamo, how):
    model, compiled = _compiled(how, ALL_SITES)
    before = chipmunk_compile.inspect(compiled, X)
    assert before.count("attention") == 2 and before.count("mlp") == 2, str(before)
    assert before.config == "default, changed (the compiled model's options)"
    with torch.no_grad():
        compiled(X)
    calls = chipmunk_compile.stats(compiled)["calls"]
    after = chipmunk_compile.inspect(compiled, X)
    assert after.count("attention") == 2 and after.count("mlp") == 2, str(after)
    assert after.config == "default, changed (the compiled model's)"
    assert chipmunk_compile.stats(compiled)["calls"] == calls  # inspecting is no model call
    # an explicit config wins, and the default is what it says
    explicit = chipmunk_compile.inspect(compiled, X, config="default")
    assert explicit.count("attention") == 0 and explicit.config == "default (config=)"
    assert "config: default (config=)" in str(explicit)


def test_inspect_of_a_model_compiled_in_place_takes_no_step(fresh_dynamo):
    """Before, inspect ran the in-place compilation itself: a step of the model's generation, and
    nothing traced (0 graphs, 'no softmax attention found')."""
    model, compiled = _compiled("in_place", ALL_SITES)
    with torch.no_grad():
        compiled(X)
        compiled(X)
    position = chipmunk_compile.stats(compiled)["step"], chipmunk_compile.stats(compiled)["calls"]
    report = chipmunk_compile.inspect(compiled, X)
    assert report.graphs == 1 and len(report.sites) == 4, str(report)
    assert (chipmunk_compile.stats(compiled)["step"], chipmunk_compile.stats(compiled)["calls"]) == position


def test_inspect_names_a_preset_as_written(fresh_dynamo):
    _, compiled = _compiled("wrapper", "flux")
    assert chipmunk_compile.inspect(compiled, X).config == "flux (the compiled model's options)"
    _, compiled = _compiled("wrapper", {"preset": "flux", "attn": {"top_keys": 0.2}})
    assert chipmunk_compile.inspect(compiled, X).config == "flux, changed (the compiled model's options)"


def test_options_are_not_found_where_chipmunk_did_not_compile(fresh_dynamo):
    model = TwoTinyBlocks()
    assert compiled_options(model) is None
    assert compiled_options(torch.compile(model, backend="eager")) is None
    assert compiled_options(torch.compile(model, backend="chipmunk")) == {}
    report = chipmunk_compile.inspect(model, X)
    assert report.config == "default (not compiled with chipmunk: config= sets another)"
    assert report.count("attention") == 0  # 64 tokens are too short for `default`
