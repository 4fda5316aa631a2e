"""Context (sequence) parallelism: diffusers' Ulysses attention through the chipmunk backend.

- The grouping of a Ulysses graph (`sequence_parallel.py`), read on one process with torch's fake
  process group: attention sites see the W ranks' shards gathered by the all-to-all
  ([text₀, image₀, text₁, image₁]), MLP sites one rank's shard. Checked against the single-process
  grouping by the tokens each query group / token block holds, simulated here from the sharding.
- Two real ranks (gloo, CPU): outputs of the sharded compiled model against the unsharded one.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist

from helpers import FULL_KEYS, cfg, flux, flux_inputs, max_rel, plan_sites

pytest.importorskip("diffusers")

H, W, TEXT, WORLD = 8, 8, 8, 2
LOOSE = cfg(step_signal="calls")


def _plan(model, kwargs):
    return plan_sites(model, kwargs, LOOSE)


@pytest.fixture
def fake_group(monkeypatch, request):
    """A fake process group of WORLD ranks with this process as rank `request.param`."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)  # diffusers' mesh setup divides by it
    dist.init_process_group("fake", rank=request.param, world_size=WORLD, store=FakeStore())
    yield request.param
    dist.destroy_process_group()
    torch._dynamo.reset()


def _ulysses(model):
    from diffusers import ContextParallelConfig

    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    return model


# Tokens by name: text t0..t7 and image i0..i63 (the image stream in raster order).
TXT = [f"t{i}" for i in range(TEXT)]
IMG = [f"i{i}" for i in range(H * W)]


def _shard(seq, r):
    n = len(seq) // WORLD
    return seq[r * n:(r + 1) * n]


def _blocks(order, size):
    return [set(order[i:i + size]) for i in range(0, len(order), size)]


@pytest.mark.parametrize("fake_group", [0, 1], indirect=True)
def test_ulysses_grouping_matches_single_process(fake_group):
    rank = fake_group
    single = {(s.kind, s.shapes["q" if s.kind == "attention" else "x"][-2]): s for s in _plan(flux(), flux_inputs(1.0))}
    sites = _plan(_ulysses(flux()), flux_inputs(1.0))
    attn = [s for s in sites if s.kind == "attention"]
    assert attn and all("2 sequence shards gathered by an all-to-all" in s.grouping for s in attn)
    for s in attn:
        # after the exchange: every rank's [text shard, image shard], rank-major
        gathered = [tok for r in range(WORLD) for tok in _shard(TXT, r) + _shard(IMG, r)]
        ref = single[("attention", TEXT + H * W)]
        ref_seq = TXT + IMG  # FLUX joins text first
        assert sorted(s.perm.tolist()) == list(range(len(gathered)))
        got = [gathered[i] for i in s.perm.tolist()]
        want = [ref_seq[i] for i in ref.perm.tolist()]
        # same query groups (and same order of tokens) as without sharding
        assert got == want
        keep = [gathered[i] for i in s.always_keep.nonzero().flatten().tolist()]
        assert sorted(keep) == sorted(TXT)
    mlp = [s for s in sites if s.kind == "mlp" and s.perm is not None]
    local_img = _shard(IMG, rank)
    assert {s.shapes["x"][-2] for s in mlp} == {H * W // WORLD, (H * W + TEXT) // WORLD}
    for s in mlp:
        n = s.shapes["x"][-2]
        assert f"chunk {rank} of 2" in s.grouping
        local = local_img if n == len(local_img) else _shard(TXT, rank) + local_img
        got = [local[i] for i in s.perm.tolist()]
        # this rank's image tokens in the single-process order of the image, then its text
        ref = single[("mlp", H * W)]
        want = [IMG[i] for i in ref.perm.tolist() if IMG[i] in set(local_img)]
        assert got[:len(local_img)] == want
        assert got[len(local_img):] == [t for t in local if t.startswith("t")]


@pytest.mark.parametrize("fake_group", [0, 1], indirect=True)
def test_ulysses_wan_groups_by_its_rotary_table(fake_group, monkeypatch):
    """Wan's split hook breaks the graph before its patch embedding (a log call in the traced hook),
    so the grid comes from the rotary table its embedder builds in a frame of its own. No text: the
    gathered order is the original one, so the attention groups equal one process's exactly, and
    each rank's MLP groups are that order restricted to its shard."""
    import functools
    import logging

    from torch.testing._internal.distributed.fake_pg import FakeStore

    # That log call is Logger.warning_once, which transformers adds to logging.Logger when it is
    # imported and diffusers (0.41-0.42.1) does not: without transformers the hook raises
    # AttributeError, in eager mode too. The same method, as transformers defines it:
    if not hasattr(logging.Logger, "warning_once"):
        monkeypatch.setattr(logging.Logger, "warning_once",
                            functools.lru_cache(None)(lambda self, *a, **k: self.warning(*a, **k)), raising=False)

    from chipmunk_compile.runtime import sessions_of
    from helpers import wan, wan_inputs

    def sites(model):
        compiled = torch.compile(model, backend="chipmunk", options={"config": LOOSE, "compiler": "eager"})
        with torch.no_grad():
            compiled(**wan_inputs(1.0))
        return [s for ses in sessions_of(model) for s in ses.sites if s.kind == "attention" or s.perm is not None]

    rank = fake_group
    sharded = sites(_ulysses(wan()))
    dist.destroy_process_group()  # the single-process reference runs without the fake group
    torch._dynamo.reset()
    single = sites(wan())
    dist.init_process_group("fake", rank=rank, world_size=WORLD, store=FakeStore())
    ref_attn = {tuple(s.perm.tolist()) for s in single if s.kind == "attention"}
    ref_mlp = {tuple(s.perm.tolist()) for s in single if s.kind == "mlp"}
    assert len(ref_attn) == len(ref_mlp) == 1  # one grid, one order per kind
    ref_attn, ref_mlp = torch.tensor(ref_attn.pop()), torch.tensor(ref_mlp.pop())
    attn = [s for s in sharded if s.kind == "attention"]
    mlp = [s for s in sharded if s.kind == "mlp"]
    assert len(attn) == 2 and len(mlp) == 2
    for s in attn:
        assert "rotary table" in s.grouping and "gathered by an all-to-all" in s.grouping, s.grouping
        assert torch.equal(s.perm.long(), ref_attn)
    n = ref_mlp.numel() // WORLD
    mine = ref_mlp[(ref_mlp >= rank * n) & (ref_mlp < (rank + 1) * n)] - rank * n
    for s in mlp:
        assert torch.equal(s.perm.long(), mine)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


STEPS = (1.0, 0.9, 0.8, 0.7, 0.6)


def _inputs(t, rank, jump_at):
    """flux_inputs(t); with `jump_at`, rank 1's latent changes at that step only (its own input)."""
    kw = flux_inputs(t)
    if jump_at is not None and rank == 1 and STEPS.index(t) >= jump_at:
        kw["hidden_states"] = kw["hidden_states"] * 1.5
    return kw


def _rank_main(rank, port, conf, jump_at, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.accelerator.device_count = lambda: 1
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import chipmunk_compile

        torch.manual_seed(0)
        model = _ulysses(flux())
        compiled = torch.compile(model, backend="chipmunk", options={"config": conf, "compiler": "eager"})
        with torch.no_grad():
            outs = torch.stack([compiled(**_inputs(t, rank, jump_at))[0] for t in STEPS])
        st = chipmunk_compile.stats(compiled)
        results[rank] = (outs, st["sites"], st.get("step_cache"))
    finally:
        dist.destroy_process_group()


def _run_ranks(conf, jump_at=None, timeout=240):
    """Each rank's (outputs, sites of stats(), step-cache summary); fails instead of hanging."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        ctx = mp.spawn(_rank_main, args=(_free_port(), conf, jump_at, results), nprocs=WORLD, join=False)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("the ranks did not finish: their collectives stopped pairing up")
        return dict(results)


def _single(conf):
    import chipmunk_compile  # noqa: F401 - registers the backend

    torch._dynamo.reset()
    compiled = torch.compile(flux(), backend="chipmunk", options={"config": conf, "compiler": "eager"})
    with torch.no_grad():
        out = torch.stack([compiled(**flux_inputs(t))[0] for t in STEPS])
    torch._dynamo.reset()
    return out


def test_ulysses_two_ranks_sparse_attention_matches_single_process():
    # sparse attention (30% of the keys, no random ones), MLPs dense: sharded or not, every query
    # group holds the same tokens and picks the same keys, so the outputs agree to rounding
    conf = cfg(attn={"top_keys": 0.3, "random_keys": 0.0, "full_step_every": 3}, mlp={"enabled": False},
               step_signal="calls")
    results = _run_ranks(conf)
    single = _single(conf)
    with torch.no_grad():
        dense = torch.stack([flux()(**flux_inputs(t))[0] for t in STEPS])
    for rank in range(WORLD):
        outs, sites, _ = results[rank]
        attn = [s for s in sites if s["kind"] == "attention"]
        assert attn and all(s["steps"].get("sparse", 0) >= 2 for s in attn)
        assert max_rel(outs, single) < 1e-5
    assert max_rel(single[2:], dense[2:]) > 1e-4  # the sparse steps do approximate


def test_ulysses_two_ranks_full_keys_is_exact():
    # every site sparse (MLPs on their rank's shard), full keys / neurons: equal to dense
    conf = cfg(attn=FULL_KEYS, mlp=FULL_KEYS, step_signal="calls")
    results = _run_ranks(conf)
    with torch.no_grad():
        dense = torch.stack([flux()(**flux_inputs(t))[0] for t in STEPS])
    for rank in range(WORLD):
        outs, sites, _ = results[rank]
        assert all(s["steps"].get("sparse", 0) >= 2 for s in sites if s["kind"] == "mlp" and s["steps"])
        assert max_rel(outs, dense) < 1e-5


def test_ulysses_adaptive_step_cache_skips_the_same_calls_on_every_rank():
    # step caching alone; rank 1's own input jumps at step 3: alone it would compute that call while
    # rank 0 skips it, and rank 1's all-to-all would wait for a rank that is not there
    conf = cfg(attn={"enabled": False}, mlp={"enabled": False}, step_signal="calls",
               step_cache={"enabled": True, "threshold": 0.3, "warmup_steps": 1, "max_consecutive": 5})
    results = _run_ranks(conf, jump_at=3)
    skipped = [results[r][2]["skipped_steps"] for r in range(WORLD)]
    assert skipped[0] == skipped[1]
    steps = next(iter(skipped[0].values()))
    assert steps and 3 not in steps  # it skips, and not where one rank's input changed


@pytest.mark.parametrize("fake_group", [0], indirect=True)
def test_collective_graphs_record_no_step_graphs(fake_group):
    from chipmunk_compile.graphs import graph_blockers

    blockers = []

    def backend(gm, example_inputs, **_):
        blockers.append(graph_blockers(gm))
        return gm.forward

    for model, collectives in ((_ulysses(flux()), True), (flux(), False)):
        blockers.clear()
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend=backend)(**flux_inputs(1.0))
        assert blockers and all(("collectives" in b) == collectives for b in blockers)
