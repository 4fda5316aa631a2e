"""`chipmunk_compile.calibrate` on the project's trained tiny DiT: which candidate config is the
cheapest at or above a PSNR bound against dense, at a given step count. Prints the table and writes
it to benchmarks/results/calibrate_<weights>_<steps>steps_<device>.{csv,json}.

    python benchmarks/calibrate_tiny_dit.py [--steps 50] [--images 4] [--min-psnr 30] [--compiler eager]
    python benchmarks/calibrate_tiny_dit.py --device cuda --compiler inductor --timed   # by measured speed
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import chipmunk_compile  # noqa: E402
from examples.tiny_dit.model import WEIGHTS_PATH, load_pretrained, weights_tag  # noqa: E402
from examples.tiny_dit.sampler import sample_classes  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--weights", default=None, help="another trained tiny DiT (default: the shipped 64x64 one)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--images", type=int, default=4, help="one per class, classes 0..images-1")
    ap.add_argument("--min-psnr", type=float, default=30.0)
    ap.add_argument("--compiler", default="eager", choices=("eager", "inductor"))
    ap.add_argument("--timed", action="store_true", help="pick by the measured speed of a second generation "
                    "(meaningful on a GPU with --compiler inductor)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)

    tiny = load_pretrained(device=args.device, weights_path=args.weights or WEIGHTS_PATH)
    labels = [i % tiny.config.num_classes for i in range(args.images)]
    t0 = time.perf_counter()
    found = chipmunk_compile.calibrate(
        tiny, lambda m: sample_classes(tiny, labels, transformer=m, steps=args.steps, seed=0),
        min_psnr=args.min_psnr, steps=args.steps, compiler=args.compiler, module="transformer", timed=args.timed)
    print(found)
    print(f"{time.perf_counter() - t0:.0f} s in all ({args.device}, {args.compiler})")
    rows = [dict(candidate=c.name, psnr_db=round(c.psnr, 3), flops=round(c.flops, 4),
                 site_flops=round(c.site_flops, 4),
                 seconds=round(c.seconds, 1), sites=c.sites, sparse_calls=c.sparse_calls, speedup=c.speedup,
                 chosen=c.name == found.name)
            for c in found.candidates]
    stem = os.path.join(args.out, f"calibrate{weights_tag(args.weights)}_{args.steps}steps_{args.device}"
                        + ("_timed" if args.timed else ""))
    os.makedirs(args.out, exist_ok=True)
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary = dict(chosen=found.name, met=found.met, min_psnr=found.min_psnr, psnr_db=found.psnr,
                   flops=found.flops, flops_of="model" if found.model_flops else "sites", steps=args.steps,
                   images=args.images, compiler=args.compiler,
                   device=args.device, torch=torch.__version__, candidates=rows)
    with open(stem + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {stem}.csv and .json")
    return summary


if __name__ == "__main__":
    main()
