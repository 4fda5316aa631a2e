"""What grouping on the right grid buys when one compiled graph serves two aspect ratios.

FLUX-style models take their token grid from position ids (`img_ids`). Dynamo does not guard on
their values, so a model compiled at one aspect ratio runs the same graph at the transposed one
(768×1280 after 1280×768: the same token count). Since session 41 each generation's first call
reads the ids and groups on their grid (`chipmunk_compile/ids_regrouping.py`); before, the second
ratio was grouped on the first ratio's grid.

On the project's trained tiny DiT (FLUX layout), per class, 50 steps: dense at the second ratio,
then chipmunk compiled at the first ratio (one generation) and generating at the second, with
  regrouped — this generation's ids give the grid (the backend now);
  stale     — the first ratio's grid kept (the backend before session 41; `update` disabled);
  direct    — compiled at the second ratio itself (the reference for "regrouped").
Prints PSNR / SSIM of the images and the relative error of the final tokens against dense, and
writes benchmarks/results/aspect_grouping_<weights>.{csv,json}.

    python benchmarks/aspect_grouping.py                          # 16×64 then 64×16 tokens, CPU
    python benchmarks/aspect_grouping.py --first 32x64 --second 64x32 --weights examples/tiny_dit/weights/tiny_flux_128.safetensors
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import chipmunk_compile  # noqa: E402
from chipmunk_compile import ids_regrouping  # noqa: E402
from chipmunk_compile.metrics import psnr, relative_error, ssim  # noqa: E402
from csv_rows import write_results  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _grid(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def generate(model, transformer, labels, grid, steps, seed, compiler_note=""):
    from examples.tiny_dit.model import make_img_ids, unpatchify
    from examples.tiny_dit.sampler import sample

    c = model.config
    h, w = grid
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(labels), h * w, c.token_channels, generator=g)
    ids = model.position_ids()
    tokens = sample(transformer, model.class_condition(labels), steps=steps, seed=seed, noise=noise,
                    img_ids=make_img_ids(h, w), txt_ids=ids["txt_ids"], return_tokens=True)
    return unpatchify(tokens, h * c.patch_size, w * c.patch_size, c.patch_size).clamp(-1, 1), tokens


def compiled(model, config, compiler):
    torch._dynamo.reset()
    return torch.compile(model.transformer, backend="chipmunk",
                         options={"config": config, "compiler": compiler}, dynamic=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--first", default="16x64", help="token grid the model is compiled at (h×w)")
    ap.add_argument("--second", default="64x16", help="token grid generated after it (same token count)")
    ap.add_argument("--classes", type=int, nargs="*", default=[0, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default="default")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--compiler", default="eager")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    from examples.tiny_dit.model import WEIGHTS_PATH, load_pretrained

    first, second = _grid(args.first), _grid(args.second)
    if first[0] * first[1] != second[0] * second[1]:
        raise SystemExit("--first and --second must have the same token count (else Dynamo recompiles)")
    model = load_pretrained("cpu", torch.float32, args.weights or WEIGHTS_PATH).eval()
    labels = torch.tensor(args.classes)
    config = {"preset": args.config} if isinstance(args.config, str) else args.config
    t0 = time.time()
    dense_img, dense_tok = generate(model, model.transformer, labels, second, args.steps, args.seed)

    def arm(name):
        start = time.time()
        c = compiled(model, config, args.compiler)
        if name != "direct":
            generate(model, c, labels, first, 2, args.seed)  # compiles at the first ratio
        img, tok = generate(model, c, labels, second, args.steps, args.seed)
        stats = chipmunk_compile.stats(c)
        grouping = next((r.get("grouping_now", r["grouping"]) for r in stats["sites"] if r["kind"] == "attention"), "")
        return {"arm": name, "psnr_db": round(psnr(img, dense_img), 3), "ssim": round(ssim(img, dense_img), 4),
                "rel_err_tokens": round(relative_error(tok, dense_tok), 5), "grouping": grouping,
                "seconds": round(time.time() - start, 1)}

    rows = [arm("regrouped")]
    real_update = ids_regrouping.IdsRegrouping.update
    ids_regrouping.IdsRegrouping.update = lambda self, ids, generation: None  # the backend before session 41
    try:
        rows.append(arm("stale"))
    finally:
        ids_regrouping.IdsRegrouping.update = real_update
    rows.append(arm("direct"))

    meta = {"first": list(first), "second": list(second), "classes": args.classes, "steps": args.steps,
            "config": args.config, "weights": os.path.basename(args.weights or WEIGHTS_PATH),
            "compiler": args.compiler, "machine": platform.machine(), "torch": torch.__version__,
            "seconds": round(time.time() - t0, 1)}
    print(f"trained tiny DiT {meta['weights']}, compiled at {args.first} tokens, generating at {args.second}; "
          f"{len(args.classes)} images, {args.steps} steps, config {args.config}, CPU fp32 reference ops")
    print(f"{'arm':<10} {'PSNR dB':>8} {'SSIM':>7} {'rel err':>9}  grid of the attention sites")
    for r in rows:
        print(f"{r['arm']:<10} {r['psnr_db']:>8.2f} {r['ssim']:>7.4f} {r['rel_err_tokens']:>9.5f}  {r['grouping']}")
    write_results(os.path.join(args.out, "aspect_grouping_" + os.path.splitext(meta["weights"])[0]), rows, meta)
    return rows


if __name__ == "__main__":
    main()
