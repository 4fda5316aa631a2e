"""Time to the first output of a new process: what the kernels' autotune timings kept on disk save.

    python benchmarks/bench_startup.py                 # the trained tiny DiT (1024 tokens), default preset
    python benchmarks/bench_startup.py --steps 12 --weights examples/tiny_dit/weights/tiny_flux_128.safetensors

The same generation (one image, `--steps` steps, backend="chipmunk" over Inductor) runs in three
fresh child processes, one after the other, that share one new, empty Triton and Inductor cache dir:
1. "cold": nothing on disk; Triton compiles and times every config of every tuned kernel, Inductor
   compiles the graphs;
2. "warm, timings re-measured" (CHIPMUNK_AUTOTUNE_CACHE=0): kernel binaries and Inductor's graphs
   come from disk, every config is timed again (what every process paid before session 25);
3. "warm": the timings come from disk as well (kernels/_common.autotune's cache_results).
Per process: the wall time of the first generation (compile, tuning, run: the time to the first
image after the model is loaded) and of a second one (steady state), both synchronized, plus the
process's whole wall time. Results: benchmarks/results/bench_startup_<gpu>.{csv,json}.
Needs a GPU: on a CPU the ops run their PyTorch references and nothing is tuned.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROCESSES = [("cold", {}), ("warm, timings re-measured", {"CHIPMUNK_AUTOTUNE_CACHE": "0"}), ("warm", {})]


def child(a) -> None:
    """One generation twice in this process; prints one JSON line."""
    import torch

    import chipmunk_compile  # noqa: F401  (registers the backend)
    from examples.tiny_dit.model import load_pretrained
    from examples.tiny_dit.sampler import sample_classes

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    model = load_pretrained(dev, dtype, **({"weights_path": a.weights} if a.weights else {}))
    compiled = torch.compile(model.transformer, backend="chipmunk", options={"config": a.config})
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        with torch.no_grad():
            sample_classes(model, [0], transformer=compiled, steps=a.steps, seed=0)
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    print("RESULT " + json.dumps({"first_s": times[0], "second_s": times[1]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="steps per generation (12: two refreshes and the "
                                                              "forecasting sparse steps of the default preset)")
    ap.add_argument("--config", default="default", help="chipmunk preset / YAML / JSON dict")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory(prefix="chipmunk_startup_") as cache:
        base_env = {**os.environ, "TRITON_CACHE_DIR": os.path.join(cache, "triton"),
                    "TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor")}
        base_env.pop("CHIPMUNK_AUTOTUNE_CACHE", None)
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--steps", str(a.steps), "--config", a.config]
        cmd += ["--weights", a.weights] if a.weights else []
        for name, env in PROCESSES:
            t0 = time.perf_counter()
            out = subprocess.run(cmd, env={**base_env, **env}, capture_output=True, text=True, cwd=ROOT)
            wall = time.perf_counter() - t0
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if out.returncode or line is None:
                sys.exit(f"{name}: child failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
            r = json.loads(line[len("RESULT "):])
            rows.append(dict(gpu=gpu, torch=torch.__version__, process=name, steps=a.steps, config=a.config,
                             first_generation_s=round(r["first_s"], 2), second_generation_s=round(r["second_s"], 2),
                             process_s=round(wall, 2)))
            print(f"{name:28s} first generation {r['first_s']:7.2f} s   second {r['second_s']:6.2f} s   "
                  f"process {wall:7.2f} s", flush=True)
    if gpu == "cpu":
        print("(CPU: the ops ran their PyTorch references; nothing was tuned, so the rows say nothing about it)")
    from benchmarks.bench_kernels import write_results

    write_results(rows, "bench_startup", gpu)


if __name__ == "__main__":
    main()
