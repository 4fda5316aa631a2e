"""MLPs whose linears carry unfused LoRA adapters (as peft, diffusers' `load_lora_weights`, leaves
them) are still MLP sites: the adapted weight W + Σ s·(B @ A) is folded in the graph once per weight
and the sparse ops run on it. Before, every adapted MLP stayed dense without being reported.

`LoraLinear` (benchmarks/lora_adapters.py) spells out peft's `Linear.forward` (base layer, then
`result + lora_B(lora_A(dropout(x))) * scaling` per adapter, then the cast back) so that CI needs
no peft."""

import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import chipmunk_compile
from helpers import FULL_KEYS, cfg, chip, ccount, flux, flux_inputs, fresh_dynamo, max_rel  # noqa: F401
from test_patterns import SMALL, Gated, Mlp, ParallelBlock, SwiGLU2, check, tokens
from test_rewrite_graph import Recorder

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from lora_adapters import add_lora  # noqa: E402


def folds(mod, args, config=SMALL) -> int:
    """addmm nodes (adapter folds) in the rewritten graph."""
    rec = Recorder(config)
    with torch.no_grad():
        torch.compile(mod.eval(), backend=rec, fullgraph=True)(*args)
    return sum(n.target is torch.addmm for g in rec.graphs for n in g["gm"].graph.nodes)


def test_per_call_folds_are_warned_once(fresh_dynamo, caplog):
    from chipmunk_compile import rewrite

    rewrite._warn_per_call_folds.cache_clear()
    with caplog.at_level("WARNING", logger="chipmunk_compile"):
        folds(Mlp(lambda h: F.gelu(h, approximate="tanh")), tokens(0))  # no adapters: no warning
        assert "fold them into their weights on every call" not in caplog.text
        for _ in range(2):
            torch._dynamo.reset()
            folds(add_lora(Mlp(lambda h: F.gelu(h, approximate="tanh")), ["fc1"]), tokens(0))
    assert caplog.text.count("fold them into their weights on every call") == 1


@pytest.mark.parametrize("which", ["fc1", "fc2", "both"])
def test_plain_mlp_with_adapters_is_a_site(fresh_dynamo, which):
    names = {"fc1": ["fc1"], "fc2": ["fc2"], "both": ["fc1", "fc2"]}[which]
    mod = add_lora(Mlp(lambda h: F.gelu(h, approximate="tanh"), dropout=True), names)
    check(mod, tokens, mlp=1, pattern="mlp")
    torch._dynamo.reset()
    assert folds(mod, tokens(0)) == len(names)


def test_two_adapters_dropout_in_eval_and_a_scale_of_one(fresh_dynamo):
    mod = add_lora(Mlp(F.silu), ["fc1", "fc2"], scales=(1.0, 0.25), dropout=0.1)
    check(mod, tokens, mlp=1, pattern="mlp")
    torch._dynamo.reset()
    assert folds(mod, tokens(0)) == 4  # one addmm per adapter and weight


def test_gated_chunk_with_an_adapter_folds_once(fresh_dynamo):
    """GEGLU / SwiGLU through one adapted projection: both halves are row ranges of one fold."""
    mod = add_lora(Gated(F.silu, True), ["proj", "out"])
    check(mod, tokens, mlp=1, pattern="mlp-gated")
    torch._dynamo.reset()
    assert folds(mod, tokens(0)) == 2


def test_gated_two_linears_with_adapters(fresh_dynamo):
    check(add_lora(SwiGLU2(), ["w1", "w3", "w2"]), tokens, mlp=1, pattern="mlp-gated")


def test_parallel_block_with_adapters(fresh_dynamo):
    """Flux / HunyuanVideo single blocks: proj_mlp and proj_out adapted (and the attention's qkv)."""
    rep = check(add_lora(ParallelBlock(), ["qkv", "proj_mlp", "proj_out"]), tokens, attention=1, mlp=1)
    assert [s.pattern for s in rep.sites] == ["sdpa", "mlp-parallel"]


def test_adapter_with_a_bias_is_left_dense(fresh_dynamo):
    """peft's lora_bias: not the form folded here, so no site, and the output stays exact."""
    check(add_lora(Mlp(F.gelu), ["fc1"], bias=True), tokens, mlp=0)


def test_adapter_on_another_input_is_not_folded(fresh_dynamo):
    """A low-rank term of a different input is not an adapter of that linear."""

    class Crossed(Mlp):
        def __init__(self):
            super().__init__(F.gelu)
            self.a, self.b = nn.Linear(C_IN, 2, bias=False), nn.Linear(2, 4 * C_IN, bias=False)

        def forward(self, x, t):
            return self.fc2(F.gelu(self.fc1(x) + self.b(self.a(x * 2.0)) * 0.5))

    check(Crossed(), tokens, mlp=0)


C_IN = tokens(0)[0].shape[-1]


def test_flux_with_adapters_matches_eager_and_runs_sparse(fresh_dynamo):
    """The tiny FLUX with adapters on its feed-forwards and single-block MLPs: as many MLP sites as
    without them; full-key steps equal eager (fold rounding only), sparse steps really sparse."""
    plain = chipmunk_compile.inspect(flux(), **flux_inputs(1.0), config=cfg()).count("mlp")
    model = add_lora(flux(), [f"transformer_blocks.{i}.ff.net.{j}" for i in (0, 1) for j in ("0.proj", "2")]
                     + [f"single_transformer_blocks.{i}.{n}" for i in (0, 1) for n in ("proj_mlp", "proj_out")])
    rep = chipmunk_compile.inspect(model, **flux_inputs(1.0), config=cfg())
    assert rep.count("mlp") == plain and "adapters=2" in str(rep)  # reported: two adapted weights per MLP
    for keys, bound in ((FULL_KEYS, 1e-5), ({"top_keys": 0.3, "random_keys": 0.0}, 0.05)):
        torch._dynamo.reset()
        compiled = chip(model, cfg(attn={**keys, "group": 16}, mlp={**keys, "block": 16}))
        errs = []
        with torch.no_grad():
            for step in range(5):
                x = flux_inputs(1.0 - step / 5)
                x["hidden_states"] = x["hidden_states"] + 0.03 * step
                errs.append(max_rel(compiled(**x)[0], model(**x)[0]))
        assert max(errs) < bound, errs
        if keys is not FULL_KEYS:
            assert max(errs) > 1e-6, errs  # really sparse
    assert ccount("mlp_sparse") > 0


@pytest.mark.parametrize("spelling", ["split", "plain"])
def test_fused_first_linear_with_an_adapter(fresh_dynamo, spelling):
    """Flux2's single block: q/k/v and the MLP come out of one adapted projection; the q/k/v
    ranges become dense linears over rows of the same fold (one addmm for the whole projection)."""
    from test_patterns import FusedParallel

    mod = add_lora(FusedParallel(spelling=spelling), ["proj", "out"])
    check(mod, tokens, attention=1, mlp=1)
    torch._dynamo.reset()
    assert folds(mod, tokens(0)) == 2


def test_hot_swappable_adapters_follow_a_swap_between_generations(fresh_dynamo):
    """Tensor scales (compiled hot-swapping): the MLP is still a site, and an adapter swapped in
    place between two generations (new A/B values, a new scale) changes the output like eager's,
    without a recompile: the fold is part of the graph, recomputed on every call. (Within a
    generation the caches assume fixed weights, as for any weight change.)"""
    mod = add_lora(Mlp(F.silu), ["fc1", "fc2"])
    for lin in (mod.fc1, mod.fc2):
        lin.tensor_scales()
    check(mod, tokens, mlp=1, pattern="mlp")
    torch._dynamo.reset()
    compiled = chip(mod, cfg(mlp={**FULL_KEYS, "block": 8}))
    with torch.no_grad():
        for step in range(3):
            assert max_rel(compiled(*tokens(step)), mod(*tokens(step))) < 1e-5
        graphs = ccount("graphs")
        mod.fc1.scales[0].fill_(2.0)
        mod.fc2.lora_B[0].weight.mul_(-3.0)
        chipmunk_compile.reset(compiled)  # a new generation (this toy model ignores its timestep)
        for step in range(3):
            assert max_rel(compiled(*tokens(step)), mod(*tokens(step))) < 1e-5, step
    assert ccount("graphs") == graphs and ccount("mlp_sparse") >= 4


@pytest.mark.slow
def test_freezing_folds_the_adapters_once(fresh_dynamo, monkeypatch):
    """Through Inductor: the fold is an addmm per adapted weight in the generated code on every call;
    with `torch._inductor.config.freezing` (weights as constants) Inductor folds it at compile time
    (README: LoRA), and the output is the same."""
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code

    mod = add_lora(Mlp(F.silu, hidden=256), ["fc1", "fc2"]).eval()
    x = tokens(0)
    calls = {}
    for freezing in (False, True):
        torch._dynamo.reset()
        monkeypatch.setattr(inductor_config, "freezing", freezing)
        compiled = torch.compile(mod, backend="chipmunk", options={"config": cfg(mlp={**FULL_KEYS, "block": 8})})
        with torch.no_grad():
            out, code = run_and_get_code(compiled, *x)
            assert max_rel(out, mod(*x)) < 1e-5
        calls[freezing] = sum(src.count("extern_kernels.addmm(") + src.count("extern_kernels.mm(") for src in code)
    assert calls == {False: 2, True: 0}, calls


def test_add_lora_wraps_every_block_linear_by_default():
    """bench_e2e.py --lora: adapters on every nn.Linear under the blocks, nothing else."""
    from lora_adapters import LoraLinear

    model = flux()
    block_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "blocks" in n]
    add_lora(model, rank=4)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    assert wrapped == block_linears and all(model.get_submodule(n).lora_A[0].out_features == 4 for n in wrapped)
    assert not any(isinstance(m, LoraLinear) for n, m in model.named_modules() if "blocks" not in n)
