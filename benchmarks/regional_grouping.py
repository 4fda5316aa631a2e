"""What token grouping buys under regional compilation (`compile_repeated_blocks`).

A block compiled on its own sees no patch embedding and no position ids, so until session 41 its
sites ran ungrouped; now the grid comes from the rotary tables the model passes each block
(`chipmunk_compile/rotary_grid.py`). On the project's trained tiny DiT (FLUX layout), same classes
and seeds, 50 steps, the `default` preset, per arm: PSNR / SSIM of the images and relative error of
the final tokens against dense, and the grouping the attention sites report:
  whole            — torch.compile of the whole transformer (grid from img_ids);
  regional         — compile_repeated_blocks, grouped on the decoded rotary grid (now);
  regional-ungrouped — compile_repeated_blocks with grouping off (the blocks before session 41).
Steps are pinned with `set_step` (a block sees no timestep). Writes
benchmarks/results/regional_grouping_<weights>.{csv,json}.

    python benchmarks/regional_grouping.py
    python benchmarks/regional_grouping.py --weights examples/tiny_dit/weights/tiny_flux_128.safetensors --classes 0 2
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import chipmunk_compile  # noqa: E402
from chipmunk_compile.metrics import psnr, relative_error, ssim  # noqa: E402
from csv_rows import write_results  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")


class PinnedSteps:
    """The transformer called once per step, each call pinned to its step (blocks see no timestep)."""

    def __init__(self, transformer):
        self.transformer, self.step = transformer, 0

    def __call__(self, **kw):
        if chipmunk_compile.sessions_of(self.transformer):  # (none before the very first call)
            chipmunk_compile.set_step(self.transformer, self.step)
        self.step += 1
        return self.transformer(**kw)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, nargs="*", default=[0, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="default")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--compiler", default="eager")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    from examples.tiny_dit.model import WEIGHTS_PATH, load_pretrained
    from examples.tiny_dit.sampler import sample_classes

    model = load_pretrained("cpu", torch.float32, args.weights or WEIGHTS_PATH).eval()
    labels = torch.tensor(args.classes)
    t0 = time.time()

    def generate(transformer):
        tokens = sample_classes(model, labels, transformer=transformer, steps=args.steps, seed=args.seed,
                                return_tokens=True)
        return model.unpatchify(tokens).clamp(-1, 1), tokens

    dense_img, dense_tok = generate(model.transformer)
    rows = []
    for arm in ("whole", "regional", "regional-ungrouped"):
        start = time.time()
        torch._dynamo.reset()
        config = {"preset": args.config, "step_signal": "calls"}
        if arm == "regional-ungrouped":
            config["grouping"] = {"enabled": False}
        options = {"config": config, "compiler": args.compiler}
        transformer = copy.deepcopy(model.transformer)
        if arm == "whole":
            compiled = torch.compile(transformer, backend="chipmunk", options=options, dynamic=False)
        else:
            transformer.compile_repeated_blocks(backend="chipmunk", options=options)
            compiled = transformer
        img, tok = generate(PinnedSteps(compiled))
        sites = chipmunk_compile.stats(compiled)["sites"]
        grouping = next((s["grouping"] for s in sites if s["kind"] == "attention" and s["steps"].get("sparse")), "")
        rows.append({"arm": arm, "psnr_db": round(psnr(img, dense_img), 3), "ssim": round(ssim(img, dense_img), 4),
                     "rel_err_tokens": round(relative_error(tok, dense_tok), 5),
                     "sparse_attention_calls": sum(s["steps"].get("sparse", 0) for s in sites if s["kind"] == "attention"),
                     "grouping": grouping, "seconds": round(time.time() - start, 1)})
    meta = {"classes": args.classes, "steps": args.steps, "config": args.config,
            "weights": os.path.basename(args.weights or WEIGHTS_PATH), "compiler": args.compiler,
            "machine": platform.machine(), "torch": torch.__version__, "seconds": round(time.time() - t0, 1)}
    print(f"trained tiny DiT {meta['weights']}: {len(args.classes)} images, {args.steps} steps, config {args.config}, "
          f"CPU fp32 reference ops; steps pinned with set_step")
    print(f"{'arm':<20} {'PSNR dB':>8} {'SSIM':>7} {'rel err':>9} {'sparse attn':>11}  grouping of a sparse attention site")
    for r in rows:
        print(f"{r['arm']:<20} {r['psnr_db']:>8.2f} {r['ssim']:>7.4f} {r['rel_err_tokens']:>9.5f} "
              f"{r['sparse_attention_calls']:>11}  {r['grouping']}")
    write_results(os.path.join(args.out, "regional_grouping_" + os.path.splitext(meta["weights"])[0]), rows, meta)
    return rows


if __name__ == "__main__":
    main()
