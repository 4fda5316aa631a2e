"""The main job: the project's trained tiny DiT, generated dense and with backend="chipmunk".

    python -m examples.demo                 # defaults: 4 classes, 50 steps (about a minute on a CPU)
    python -m examples.demo --steps 50 --classes 0 3 5 9 --config flux
    python -m examples.demo --video         # the video tiny DiT (8 frames of 32x32), hunyuan-video preset

Writes out/demo.png (rows: dense | chipmunk | 4x |difference|; videos frame by frame) and prints the time of each
generation, the FLOPs ratio and the fidelity (PSNR / SSIM against dense). On a CPU the chipmunk
ops run their PyTorch references, which are slower than dense PyTorch: speedups need the GPU's
Triton kernels (see README's results table).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.fidelity import dense_call_flops, grid_png, run, TinyRunner  # noqa: E402
from chipmunk_compile.metrics import psnr, ssim  # noqa: E402
from examples.tiny_dit.model import VIDEO_WEIGHTS_PATH  # noqa: E402


def main(argv=None):
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the fidelity benchmark's 50-step sampling on every device (CPU, 4 images: 34.8 dB, ~1 min; the
    # 2-image, 25-step CPU default before session 18 read 28.1 dB, a shorter schedule than the issue's)
    ap.add_argument("--classes", type=int, nargs="*", default=[0, 3, 6, 9])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--video", action="store_true", help="the video tiny DiT (tiny_flux_video: 8 frames of 32x32 "
                    "pixels, 2048 tokens) instead of the image one")
    ap.add_argument("--config", default=None, help="chipmunk preset / YAML path (default: flux; with --video: "
                    "hunyuan-video)")
    ap.add_argument("--compiler", default="inductor" if cuda else "eager", help="inner compiler (eager: no Inductor build)")
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "demo.png"))
    args = ap.parse_args(argv)
    args.config = args.config or ("hunyuan-video" if args.video else "flux")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    runner = TinyRunner(device, dtype, args.classes, None, VIDEO_WEIGHTS_PATH if args.video else None)
    dense_flops = dense_call_flops(runner.one_dense_call())
    print(f"{runner.name} on {torch.cuda.get_device_name() if cuda else 'CPU'}: {len(args.classes)} "
          f"{'videos' if args.video else 'images'}, "
          f"{args.steps} steps, chipmunk config {args.config!r}, compiler {args.compiler}", flush=True)
    t0 = time.perf_counter()
    dense_img, _, dense_s, _ = run(runner, "dense", None, args.steps, args.seed, args.compiler, dense_flops)
    print(f"dense:    {dense_s:6.1f} s", flush=True)
    chip_img, _, chip_s, flops = run(runner, "chipmunk", args.config, args.steps, args.seed, args.compiler, dense_flops)
    print(f"chipmunk: {chip_s:6.1f} s  ({dense_s / chip_s:.2f}x; FLOPs {flops:.2f} of dense)")
    print(f"fidelity: PSNR {psnr(chip_img, dense_img):.2f} dB, SSIM {ssim(chip_img, dense_img):.4f} against dense")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if args.video:  # a row of frames per row kind: every video's frames in turn
        dense_img, chip_img = dense_img.flatten(0, 1), chip_img.flatten(0, 1)
    diff = ((chip_img - dense_img).abs() * 4 - 1).clamp(-1, 1)
    grid_png([dense_img, chip_img, diff], ["dense", "chipmunk", "4x |difference|"], args.out)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
