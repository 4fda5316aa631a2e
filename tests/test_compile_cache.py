"""Inductor's on-disk caches (FX graph and AOTAutograd) serve chipmunk graphs across processes, and a
hit runs the new process's config: a compiled graph names its sites only by id, and every setting
(budgets, schedules, grouping) is read from the sites at run time. One process compiles with a real
sparse budget, the next with a full budget from the same cache directory: it hits the cache and its
sparse steps equal eager."""

import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {here!r})
    import torch
    from torch._dynamo.utils import counters
    from helpers import FULL_KEYS, cfg, max_rel
    from test_numerics import Net, run
    torch.set_num_threads(1)
    budget = dict(FULL_KEYS) if sys.argv[1] == "full" else {{"top_keys": 0.25, "random_keys": 0.0}}
    config = cfg(attn=dict(budget, group=16, full_step_every=4), mlp=dict(budget, block=16, full_step_every=4))
    model = Net().eval()
    compiled = torch.compile(model, backend="chipmunk", options={{"config": config, "compiler": "inductor"}})
    outs, refs = run(model, compiled, 4)
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    print("RESULT", hits, max(max_rel(o, r) for o, r in zip(outs, refs)))
""")


def _run(tmp_path, budget: str) -> tuple[int, float]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), TORCHINDUCTOR_FX_GRAPH_CACHE="1",
               TORCHINDUCTOR_AUTOGRAD_CACHE="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(here=HERE), budget], env=env, capture_output=True,
                         text=True, timeout=600)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
    assert out.returncode == 0 and line, out.stderr[-2000:]
    _, hits, err = line[0].split()
    return int(hits), float(err)


def test_a_cache_hit_runs_the_new_processes_config(tmp_path):
    hits, sparse_err = _run(tmp_path, "sparse")
    assert hits == 0 and sparse_err > 1e-4  # compiled fresh; a real budget differs from eager
    hits, full_err = _run(tmp_path, "full")
    assert hits >= 1  # the same graph, from the cache
    assert full_err < 1e-5  # ... running the full budget this process configured
